"""The built-in guest's physical memory map.

```
0x0000_1000  GDT (kernel and user segments, one TSS descriptor per vCPU)
0x0000_2000  one TSS per vCPU (RSP0 = its kernel stack, an I/O bitmap for ports < 0x1000)
0x0001_0000  identity page tables (PML4, PDPT, one PD per GiB mapped)
0x0010_0000  the workload program (text, data, bss): at most 256 KiB
0x0014_0000  vCPU stacks, 16 KiB each: 4 KiB ring-0 stack, then the 12 KiB ring-3 stack
0x0020_0000  data area of region 0 (what the workload fills) ...
             the gap below 4 GiB (0xFFFB_C000 holds KVM's TSS/identity-map pages)
0x1_0000_0000 region 1 (all data), when the layout has two regions
```

The data area is presented to users as one linear space of *data offsets* (region 0's data,
then region 1's) so that "fill the first 300 MiB" does not depend on where the gap falls;
:meth:`GuestLayout.span` turns a linear range into guest-physical pieces, one per region.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmswap.uffd.pagesize import PAGE_SIZE, check_page_range

MIB = 1 << 20
GIB = 1 << 30

GDT_ADDR = 0x1000
TSS_ADDR = 0x2000
PAGE_TABLES_ADDR = 0x1_0000
PAGE_TABLES_END = 0x10_0000
PROGRAM_ADDR = 0x10_0000
PROGRAM_MAX_SIZE = 0x4_0000
STACKS_BASE = PROGRAM_ADDR + PROGRAM_MAX_SIZE
STACK_SIZE = 0x4000
KERNEL_STACK_SIZE = 0x1000
SYSTEM_SIZE = 2 * MIB
MAX_VCPUS = (SYSTEM_SIZE - STACKS_BASE) // STACK_SIZE

HIGH_MEMORY_START = 4 * GIB
LOW_MEMORY_MAX = 3 * GIB
REGION_ALIGN = 2 * MIB


@dataclass(frozen=True)
class GuestLayout:
    """Guest RAM regions ``(guest_addr, size)``, sorted, the first one starting at 0."""

    regions: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.regions or self.regions[0][0] != 0:
            raise ValueError("the first region must start at guest address 0")
        if self.regions[0][1] <= SYSTEM_SIZE:
            raise ValueError(f"region 0 must be larger than the {SYSTEM_SIZE // MIB} MiB "
                             "system area (GDT, page tables, program, stacks)")
        for addr, size in self.regions:
            check_page_range(addr, size, "guest region")

    @classmethod
    def for_size(cls, memory_size: int, regions: int = 2) -> GuestLayout:
        """A layout of ``memory_size`` bytes of RAM in one region, or two split by the gap.

        With two regions the data is halved between low memory and memory above 4 GiB, so the
        multi-region paths (KVM slots, vmm-swap regions) carry equal weight.
        """
        if memory_size % REGION_ALIGN or memory_size < 2 * SYSTEM_SIZE:
            raise ValueError(f"guest memory must be a multiple of 2 MiB and at least "
                             f"{2 * SYSTEM_SIZE // MIB} MiB, got {memory_size} bytes")
        if regions not in (1, 2):
            raise ValueError(f"the built-in layout has 1 or 2 regions, not {regions}")
        if regions == 1:
            if memory_size > LOW_MEMORY_MAX:
                raise ValueError("a one-region guest must fit below 3 GiB; use two regions")
            return cls(((0, memory_size),))
        data = memory_size - SYSTEM_SIZE
        low = SYSTEM_SIZE + (data // 2) // REGION_ALIGN * REGION_ALIGN
        low = min(low, LOW_MEMORY_MAX)
        high = memory_size - low
        if high == 0:
            return cls(((0, low),))
        return cls(((0, low), (HIGH_MEMORY_START, high)))

    @property
    def memory_size(self) -> int:
        return sum(size for _, size in self.regions)

    @property
    def map_limit(self) -> int:
        """The end of the highest region: what the identity page tables must cover."""
        return max(addr + size for addr, size in self.regions)

    @property
    def data_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(guest_addr, size)`` of the workload's data area in each region."""
        out = []
        for addr, size in self.regions:
            if addr == 0:
                out.append((SYSTEM_SIZE, size - SYSTEM_SIZE))
            else:
                out.append((addr, size))
        return tuple(out)

    @property
    def data_size(self) -> int:
        return sum(size for _, size in self.data_ranges)

    def span(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Guest-physical ``(addr, size)`` pieces of the linear data range ``[offset, +length)``.

        Raises ValueError unless the range is page aligned and inside the data area.
        """
        check_page_range(offset, length, "data range")
        if offset < 0 or offset + length > self.data_size:
            raise ValueError(f"data range [{offset:#x}, {offset + length:#x}) is outside the "
                             f"{self.data_size // MIB} MiB data area")
        pieces = []
        base = 0
        for addr, size in self.data_ranges:
            lo = max(offset, base)
            hi = min(offset + length, base + size)
            if lo < hi:
                pieces.append((addr + lo - base, hi - lo))
            base += size
        return pieces

    def data_offset(self, guest_addr: int) -> int:
        """The linear data offset of a guest-physical address in the data area."""
        base = 0
        for addr, size in self.data_ranges:
            if addr <= guest_addr < addr + size:
                return base + guest_addr - addr
            base += size
        raise ValueError(f"guest address {guest_addr:#x} is not in the data area")


def _check_vcpu(vcpu: int) -> None:
    if not 0 <= vcpu < MAX_VCPUS:
        raise ValueError(f"the built-in guest supports at most {MAX_VCPUS} vCPUs")


def kernel_stack_top(vcpu: int) -> int:
    """vCPU ``vcpu``'s ring-0 stack pointer at entry and in its TSS (stacks grow down)."""
    _check_vcpu(vcpu)
    return STACKS_BASE + vcpu * STACK_SIZE + KERNEL_STACK_SIZE


def user_stack_top(vcpu: int) -> int:
    """vCPU ``vcpu``'s ring-3 stack pointer, where the workload runs."""
    _check_vcpu(vcpu)
    return STACKS_BASE + (vcpu + 1) * STACK_SIZE


assert PAGE_SIZE <= KERNEL_STACK_SIZE < STACK_SIZE
assert TSS_ADDR + MAX_VCPUS * 617 <= PAGE_TABLES_ADDR  # longmode.TSS_SIZE
