"""``vmmswap demo --linux``: boot Debian's kernel under vmm-swap and check its memory survives.

Boots the Linux guest (images from ``scripts/fetch-linux-guest.sh``), launches the swap
controller, runs enable -> trim -> out -> sha256 check -> disable -> sha256 check with the guest
running, and prints the guest console and a summary. ``--measure-boot`` also times boot to init
without swap and with guest memory swapped out before the first instruction.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from vmmswap.control.controller import SwapController
from vmmswap.vm.kvm import KvmUnavailableError, kvm_flavour
from vmmswap.vm.linux.guest import GuestImages, LinuxGuest, LinuxGuestConfig, find_images
from vmmswap.vm.linux.session import Report, Timeouts, measure_boot, run_swap_cycle

MIB = 1024 * 1024

#: Why the Linux guest cannot complete on PVM (see vmmswap.vm.linux.emulation).
PVM_LIMITATION = (
    "KVM on this machine is PVM (kvm_pvm, software virtualization): it emulates the guest "
    "kernel instruction by instruction (Debian's kernel needs ~8 minutes to reach init) and does "
    "not deliver a non-PVM guest's SYSCALL to its kernel, so init dies with SIGSEGV at "
    "entry_SYSCALL_64; run this on a host with VT-x/AMD-V (kvm_intel/kvm_amd)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmmswap demo --linux",
        description="Boot a Linux guest under vmm-swap and check its memory (sha256) survives.")
    parser.add_argument("--linux", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-mib", type=int, default=256, help="guest RAM (default 256)")
    parser.add_argument("--vcpus", type=int, default=2, help="vCPUs (default 2)")
    parser.add_argument("--data-mib", type=int, default=16,
                        help="random data the guest writes to tmpfs (default 16)")
    parser.add_argument("--period", type=int, default=2,
                        help="seconds between the guest's own re-reads on vCPU 1 (0: off)")
    parser.add_argument("--swap-dir", type=Path, default=None,
                        help="directory for the swap file (default: a temporary directory)")
    parser.add_argument("--images", type=Path, default=None,
                        help="directory holding bzImage and initramfs.cpio.gz")
    parser.add_argument("--quiet-console", action="store_true",
                        help="do not print the guest console as it comes")
    parser.add_argument("--measure-boot", action="store_true",
                        help="also time boot to init without swap and with memory swapped out")
    parser.add_argument("--allow-software-kvm", action="store_true",
                        help="try even on PVM (software KVM), where the boot takes ~8 minutes "
                             "and the guest's init dies on its first system call")
    parser.add_argument("--boot-only", choices=("plain", "swapped"), default=None,
                        help="only time one boot to init (no swap cycle): without swap, or "
                             "with guest memory swapped out before the first instruction")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        images = find_images(args.images)
    except FileNotFoundError as exc:
        print(f"vmmswap demo --linux: {exc}", file=sys.stderr)
        return 2
    config = LinuxGuestConfig(memory_size=args.memory_mib * MIB, vcpus=args.vcpus,
                              data_mb=args.data_mib, period=args.period)

    def echo(line: str) -> None:
        if not args.quiet_console:
            print(f"  | {line}", flush=True)

    def report(line: str) -> None:
        print(f"[vmmswap] {line}", flush=True)

    if kvm_flavour() == "kvm_pvm":
        if not args.allow_software_kvm:
            print(f"vmmswap demo --linux: {PVM_LIMITATION} (--allow-software-kvm tries anyway)",
                  file=sys.stderr)
            return 2
        report("KVM here is PVM (software): guest kernel code is emulated, expect minutes")
    with tempfile.TemporaryDirectory(prefix="vmmswap-linux-") as scratch:
        swap_dir = args.swap_dir if args.swap_dir is not None else Path(scratch)
        try:
            if args.boot_only is not None:
                measured = measure_boot(
                    images, config, swap_dir=swap_dir if args.boot_only == "swapped" else None,
                    echo=echo, report=report)
                report(f"boot to init ({args.boot_only}): {measured.ready.seconds:.2f} s")
                return 0
            ok = _cycle(images, config, swap_dir, echo, report)
            if args.measure_boot:
                plain = measure_boot(images, config, swap_dir=None, echo=echo, report=report)
                swapped = measure_boot(images, config, swap_dir=swap_dir, echo=echo,
                                       report=report)
                report(f"boot to init: {plain.ready.seconds:.2f} s without swap, "
                       f"{swapped.ready.seconds:.2f} s with {swapped.pages_swapped_out} pages "
                       f"swapped out before boot "
                       f"(x{swapped.ready.seconds / plain.ready.seconds:.2f})")
        except (KvmUnavailableError, OSError, RuntimeError, TimeoutError, ValueError) as exc:
            print(f"vmmswap demo --linux: {exc}", file=sys.stderr)
            return 1
    return 0 if ok else 1


def _cycle(images: GuestImages, config: LinuxGuestConfig, swap_dir: Path,
           echo: Report, report: Report) -> bool:
    guest = LinuxGuest(images, config, echo=echo)
    controller: SwapController | None = None
    try:
        controller = SwapController.launch(guest.memory, swap_dir)
        guest.start()
        limits = Timeouts.for_guest(guest)
        ready = guest.wait_ready(limits.boot)
        report(f"init started {ready.seconds:.2f} s after the first instruction "
               f"({ready.cpus} CPUs online)")
        result = run_swap_cycle(guest, controller, timeouts=limits, report=report)
        final = controller.status()
        guest.power_off(limits.command)
        report(f"final status: {final.to_json()}")
        report("summary:")
        for step in result.steps:
            ping = f"{step.ping * 1000:8.0f} ms" if step.ping is not None else "       -   "
            report(f"  {step.name:<10} {step.state:<10} {step.seconds:7.2f} s  ping {ping}  "
                   f"sha256 {step.digest}")
        report(f"  periodic re-reads on vCPU 1: {len(result.periodic_digests)}")
        verdict = "unchanged" if result.consistent else "CHANGED: guest memory was corrupted"
        report(f"sha256 {verdict} across {len(result.digests)} reads; "
               f"emulation fixups {guest.fixups.counts}")
        return result.consistent
    finally:
        guest.machine.close()
        if controller is not None:
            controller.close()
        guest.close()


if __name__ == "__main__":
    sys.exit(main())
