"""The loadable segments of an x86-64 kernel ELF (``vmlinux``), by physical address.

A vmlinux links its segments at kernel virtual addresses but gives each a physical load address
(``p_paddr``) and its entry point (``e_entry``) as the physical address of ``startup_64``, the
64-bit boot protocol's entry for an uncompressed kernel. Only what loading needs is parsed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_ET_EXEC = 2
_EM_X86_64 = 62
_PT_LOAD = 1

# Elf64_Ehdr fields from e_type on, and one Elf64_Phdr.
_EHDR = struct.Struct("<HHIQQQIHHHHHH")
_EHDR_OFFSET = 16
_PHDR = struct.Struct("<IIQQQQQQ")


class ElfError(ValueError):
    """The file is not an x86-64 executable ELF this loader can place in memory."""


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD: ``data`` goes at ``paddr``; ``mem_size - len(data)`` zero bytes follow."""

    paddr: int
    data: memoryview
    mem_size: int

    @property
    def end(self) -> int:
        return self.paddr + self.mem_size


@dataclass(frozen=True)
class KernelElf:
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        """The first physical address past every segment."""
        return max(segment.end for segment in self.segments)

    @classmethod
    def parse(cls, image: bytes) -> KernelElf:
        """Validate ``image`` and list its PT_LOAD segments; ElfError says what is wrong."""
        if len(image) < _EHDR_OFFSET + _EHDR.size or not image.startswith(_ELF_MAGIC):
            raise ElfError("not an ELF file")
        if image[4] != _ELFCLASS64 or image[5] != _ELFDATA2LSB:
            raise ElfError("not a 64-bit little-endian ELF")
        (e_type, e_machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
         _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(image, _EHDR_OFFSET)
        if e_type != _ET_EXEC or e_machine != _EM_X86_64:
            raise ElfError(f"ELF type {e_type} machine {e_machine}: not an x86-64 executable")
        if phentsize != _PHDR.size or phoff + phnum * phentsize > len(image):
            raise ElfError("program headers are truncated or of an unknown size")
        view = memoryview(image)
        segments = []
        for i in range(phnum):
            p_type, _pflags, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
                image, phoff + i * phentsize)
            if p_type != _PT_LOAD:
                continue
            if offset + filesz > len(image) or filesz > memsz:
                raise ElfError(f"segment {i} at file offset {offset:#x} is truncated")
            segments.append(Segment(paddr, view[offset:offset + filesz], memsz))
        if not segments:
            raise ElfError("no loadable segment")
        if not any(s.paddr <= entry < s.end for s in segments):
            raise ElfError(f"entry point {entry:#x} is outside every loadable segment")
        return cls(entry, tuple(segments))
