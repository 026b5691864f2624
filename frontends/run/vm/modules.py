"""Kernel modules for the initramfs: names, ``.modinfo``, and the dependency order to load them in.

The cloud kernel builds the virtio drivers as modules. Their dependencies are read from each
module's ``.modinfo`` section (``depends=``), so neither ``depmod`` nor kmod is needed on the host.
"""

from __future__ import annotations

import gzip
import lzma
import os
from collections.abc import Iterable
from pathlib import Path

import zstandard

from frontends.run.vm.kernel import elf64_sections
from obd.errors import FormatError, ObdError

#: Compression suffixes a module file may carry after ``.ko``.
_COMPRESSED = (".xz", ".zst", ".gz")


def module_name(name: str) -> str:
    """The kernel's name of a module, from a name or file name: ``virtio-blk.ko.xz`` -> ``virtio_blk``."""
    base = os.path.basename(name)
    for suffix in _COMPRESSED:
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressed according to its suffix."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def modinfo(elf: bytes, *, name: str = "module") -> dict[str, list[str]]:
    """The ``key=value`` entries of a kernel module's ``.modinfo`` section (values listed per key)."""
    blob = elf64_sections(elf, name).get(".modinfo")
    if blob is None:
        raise FormatError("no .modinfo section: not a kernel module", path=name, field="elf.sections")
    info: dict[str, list[str]] = {}
    for item in blob.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            info.setdefault(key.decode("ascii", "replace"), []).append(value.decode("utf-8", "replace"))
    return info


def resolve_modules(mod_dir: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """``(name, file)`` of ``wanted`` and their dependencies, dependencies first; built-ins skipped.

    ``mod_dir`` is a ``lib/modules/<version>`` tree. Raises ObdError for a module that is neither a
    ``.ko`` file nor built in, and for a dependency cycle.
    """
    files: dict[str, Path] = {}
    for path in (mod_dir / "kernel").rglob("*.ko*"):
        files.setdefault(module_name(path.name), path)
    builtin: set[str] = set()
    builtin_list = mod_dir / "modules.builtin"
    if builtin_list.is_file():
        builtin = {module_name(line) for line in builtin_list.read_text().split() if line}

    order: list[tuple[str, Path]] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2 or name in builtin:
            return
        if state.get(name) == 1:
            raise ObdError("circular module dependency", field="modules", value=" -> ".join((*chain, name)))
        path = files.get(name)
        if path is None:
            raise ObdError("module is neither a .ko file nor built into the kernel", path=mod_dir, value=name)
        state[name] = 1
        info = modinfo(read_module(path), name=str(path))
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(module_name(dep), (*chain, name))
        state[name] = 2
        order.append((name, path))

    for name in wanted:
        visit(module_name(name), ())
    return order
