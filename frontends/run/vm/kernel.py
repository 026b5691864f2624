"""The kernel files obd reads itself: ELF64 headers, the x86 bzImage, and the PVH ``vmlinux`` inside it.

QEMU boots an ELF ``vmlinux`` through PVH when it carries the Xen ``PHYS32_ENTRY`` note, which skips
the in-guest decompression of a bzImage (a large part of a TCG boot). Debian ships only the bzImage,
so :func:`extract_vmlinux` unpacks its payload here, without ``extract-vmlinux``, ``lz4`` or binutils.
The same ELF reader lists a kernel module's sections (:func:`elf64_sections`, used for ``.modinfo``)
and tells a static executable from a dynamic one (:func:`is_static_elf`, for busybox).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.block
import zstandard

from frontends.run.vm.binary import Record
from obd.errors import FormatError, TruncatedError, UnsupportedError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
SHT_NOBITS = 8  # a section with no bytes in the file (.bss)
PT_INTERP = 3
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

BZIMAGE_MAGIC = b"HdrS"
#: The boot protocol version that added ``payload_offset``/``payload_length``.
PAYLOAD_PROTOCOL = 0x208
LZ4_LEGACY_MAGIC = 0x184C2102
#: The most an unpacked kernel may take (the Debian cloud kernel's vmlinux is about 60 MiB).
MAX_VMLINUX = 512 << 20
#: The kernel's LZ4 legacy format compresses 8 MiB blocks.
_LZ4_LEGACY_BLOCK = 8 << 20


# --- ELF64 ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElfHeader(Record):
    """The ELF64 file header (``Elf64_Ehdr``)."""

    LAYOUT = struct.Struct("<16sHHIQQQIHHHHHH")
    NAME = "elf.header"

    e_ident: bytes
    e_type: int
    e_machine: int
    e_version: int
    e_entry: int
    e_phoff: int
    e_shoff: int
    e_flags: int
    e_ehsize: int
    e_phentsize: int
    e_phnum: int
    e_shentsize: int
    e_shnum: int
    e_shstrndx: int

    @classmethod
    def parse(cls, data: bytes, *, path: Any = None) -> ElfHeader:
        """The header of a 64-bit little-endian ELF file; FormatError for anything else."""
        ident = bytes(data[:6])
        if ident[:4] != ELF_MAGIC or ident[4:5] != bytes([ELFCLASS64]) or ident[5:6] != bytes([ELFDATA2LSB]):
            raise FormatError(
                "not a 64-bit little-endian ELF file", path=path, field="elf.e_ident", value=ident
            )
        return cls.unpack(data, path=path)

    def program_headers(self, data: bytes, *, path: Any = None) -> list[ProgramHeader]:
        """The program header table (TruncatedError when it runs past the end of ``data``)."""
        if self.e_phnum and self.e_phentsize < ProgramHeader.LAYOUT.size:
            raise FormatError(
                "program headers too small", path=path, field="elf.e_phentsize", value=self.e_phentsize
            )
        return [
            ProgramHeader.unpack(data, self.e_phoff + i * self.e_phentsize, path=path)
            for i in range(self.e_phnum)
        ]

    def section_headers(self, data: bytes, *, path: Any = None) -> list[SectionHeader]:
        """The section header table, checked to lie inside ``data`` with a valid name-table index."""
        if (
            self.e_shentsize < SectionHeader.LAYOUT.size
            or self.e_shnum == 0
            or self.e_shstrndx >= self.e_shnum
            or self.e_shoff + self.e_shnum * self.e_shentsize > len(data)
        ):
            raise FormatError("bad section header table", path=path, field="elf.e_shoff", value=self.e_shoff)
        return [
            SectionHeader.unpack(data, self.e_shoff + i * self.e_shentsize, path=path)
            for i in range(self.e_shnum)
        ]


@dataclass(frozen=True)
class SectionHeader(Record):
    """One ELF64 section header (``Elf64_Shdr``)."""

    LAYOUT = struct.Struct("<IIQQQQIIQQ")
    NAME = "elf.section_header"

    sh_name: int
    sh_type: int
    sh_flags: int
    sh_addr: int
    sh_offset: int
    sh_size: int
    sh_link: int
    sh_info: int
    sh_addralign: int
    sh_entsize: int


@dataclass(frozen=True)
class ProgramHeader(Record):
    """One ELF64 program header (``Elf64_Phdr``)."""

    LAYOUT = struct.Struct("<IIQQQQQQ")
    NAME = "elf.program_header"

    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


@dataclass(frozen=True)
class NoteHeader(Record):
    """The header of one ELF note (``Elf64_Nhdr``); name and descriptor follow, each 4-byte aligned."""

    LAYOUT = struct.Struct("<III")
    NAME = "elf.note"

    n_namesz: int
    n_descsz: int
    n_type: int


def elf64_sections(elf: bytes, name: str) -> dict[str, bytes]:
    """``{section name: bytes}`` of an ELF64 file (empty bytes for ``SHT_NOBITS`` sections)."""
    header = ElfHeader.parse(elf, path=name)
    heads = header.section_headers(elf, path=name)
    for sh in heads:
        if sh.sh_type != SHT_NOBITS and sh.sh_offset + sh.sh_size > len(elf):
            raise TruncatedError(
                "section beyond the end of the file", path=name, field="elf.sh_offset", value=sh.sh_offset
            )
    strtab = heads[header.e_shstrndx]
    names = elf[strtab.sh_offset : strtab.sh_offset + strtab.sh_size]
    out = {}
    for sh in heads:
        end = names.find(b"\0", sh.sh_name)
        label = names[sh.sh_name : end if end >= 0 else None].decode("ascii", "replace")
        out[label] = b"" if sh.sh_type == SHT_NOBITS else elf[sh.sh_offset : sh.sh_offset + sh.sh_size]
    return out


def elf_has_pvh_note(elf: bytes) -> bool:
    """True when an ELF kernel carries the Xen ``PHYS32_ENTRY`` note QEMU's PVH loader needs."""
    try:
        header = ElfHeader.parse(elf)
        for ph in header.program_headers(elf):
            if ph.p_type != PT_NOTE:
                continue
            pos, end = ph.p_offset, min(ph.p_offset + ph.p_filesz, len(elf))
            while pos + NoteHeader.LAYOUT.size <= end:
                note = NoteHeader.unpack(elf, pos)
                start = pos + NoteHeader.LAYOUT.size
                if elf[start : start + note.n_namesz].rstrip(b"\0") == b"Xen" and (
                    note.n_type == XEN_ELFNOTE_PHYS32_ENTRY
                ):
                    return True
                pos = start + ((note.n_namesz + 3) & ~3) + ((note.n_descsz + 3) & ~3)
    except FormatError:
        return False
    return False


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a ``PT_INTERP`` program header (needs no dynamic loader)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        return all(ph.p_type != PT_INTERP for ph in ElfHeader.parse(head).program_headers(head))
    except (OSError, FormatError):
        return False


# --- the bzImage ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupHeader(Record):
    """The x86 boot protocol's setup header, at offset 0x1f1 of a bzImage (up to ``payload_length``)."""

    OFFSET = 0x1F1
    LAYOUT = struct.Struct("<BHIHHHHH4sHIHHBBHIIIIHBBIIIBBHIIQII")
    NAME = "bzimage.setup_header"

    setup_sects: int
    root_flags: int
    syssize: int
    ram_size: int
    vid_mode: int
    root_dev: int
    boot_flag: int
    jump: int
    header: bytes
    version: int
    realmode_swtch: int
    start_sys_seg: int
    kernel_version: int
    type_of_loader: int
    loadflags: int
    setup_move_size: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    bootsect_kludge: int
    heap_end_ptr: int
    ext_loader_ver: int
    ext_loader_type: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    hardware_subarch_data: int
    payload_offset: int
    payload_length: int

    @classmethod
    def parse(cls, bzimage: bytes, *, path: Any = None) -> SetupHeader:
        """The setup header of a bzImage new enough to locate its payload."""
        magic = bzimage[0x202:0x206]
        if magic != BZIMAGE_MAGIC:
            raise FormatError(
                "not a bzImage (no HdrS setup header)", path=path, field="bzimage.header", value=magic
            )
        head = cls.unpack(bzimage, cls.OFFSET, path=path)
        if head.version < PAYLOAD_PROTOCOL:
            raise UnsupportedError(
                "boot protocol too old to locate the payload",
                path=path,
                field="bzimage.version",
                value=hex(head.version),
            )
        return head

    @property
    def payload_start(self) -> int:
        """File offset of the compressed kernel: after the setup sectors (0 means 4) and the boot sector."""
        return ((self.setup_sects or 4) + 1) * 512 + self.payload_offset


def extract_vmlinux(bzimage: bytes, *, name: str = "vmlinuz") -> bytes:
    """Unpack the ELF kernel inside an x86 bzImage (setup header ``payload_offset``/``payload_length``).

    Handles the payload compressions Debian uses (LZ4 legacy, gzip, xz, zstd). Raises ObdError for
    anything else; callers then boot the bzImage itself.
    """
    head = SetupHeader.parse(bzimage, path=name)
    start = head.payload_start
    payload = bzimage[start : start + head.payload_length]
    if len(payload) != head.payload_length or head.payload_length < 8:
        raise TruncatedError(
            "payload beyond the end of the file", path=name, field="bzimage.payload_offset", value=start
        )
    if payload[:4] == struct.pack("<I", LZ4_LEGACY_MAGIC):
        out = _lz4_legacy(payload, name)
    elif payload[:2] == b"\x1f\x8b":
        out = zlib.decompressobj(31).decompress(payload, MAX_VMLINUX)
    elif payload[:6] == b"\xfd7zXZ\x00":
        out = lzma.LZMADecompressor().decompress(payload, MAX_VMLINUX)
    elif payload[:4] == b"\x28\xb5\x2f\xfd":
        out = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    else:
        raise UnsupportedError(
            "unsupported kernel payload compression", path=name, field="bzimage.payload", value=payload[:6]
        )
    if out[:4] != ELF_MAGIC:
        raise FormatError(
            "the unpacked payload is not an ELF file", path=name, field="vmlinux", value=out[:4]
        )
    return out


def _lz4_legacy(payload: bytes, name: str) -> bytes:
    """Decode the kernel's LZ4 legacy stream: the magic, then ``<u32 compressed size><block>`` pairs."""
    pieces = []
    total = 0
    pos = 4
    # The kernel appends the unpacked size as a 4-byte trailer, which reads as a "block" running past
    # the end; a repeated magic starts another stream.
    while pos + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, pos)
        if size == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if pos + 4 + size > len(payload):
            break
        try:
            block = lz4.block.decompress(
                payload[pos + 4 : pos + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK
            )
        except lz4.block.LZ4BlockError as exc:
            raise FormatError(
                f"corrupt LZ4 block: {exc}", path=name, field="bzimage.payload", value=pos
            ) from exc
        total += len(block)
        if total > MAX_VMLINUX:
            raise UnsupportedError("unpacked kernel too large", path=name, field="vmlinux", value=total)
        pieces.append(block)
        pos += 4 + size
    return b"".join(pieces)
