"""The userfaultfd layer: the seed's ``Userfaultfd`` wrapper and what it stands on.

``Userfaultfd`` (userfaultfd.py), its event records and the pure parser of raw ``uffd_msg``
bytes (events.py), the typed errors of the fill ioctls (errors.py), ``Mapping``, an mmap the
project owns (memory.py), and explicit page/byte math (pagesize.py).

May import: ``vmmswap.kernel`` only. Knows nothing of guests, staging or swap files.
"""
