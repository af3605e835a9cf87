"""The KVM micro-VM: vmm-swap's real client.

:mod:`~vmmswap.vm.machine` runs guests (KVM fds, vCPU threads, a port-I/O bus); the built-in guest
(:mod:`~vmmswap.vm.micro`, C source under ``vm/guest``) fills and re-touches memory on command;
:mod:`~vmmswap.vm.demo` is ``vmmswap demo``; :mod:`~vmmswap.vm.scenarios` holds the end-to-end
swap scenarios; :mod:`vmmswap.vm.linux` boots a Linux guest on the same Machine.
"""
