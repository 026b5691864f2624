"""A stack of LSMT layers seen as one virtual block device (docs/formats.md §1.10, §1.11).

Lowers are given **bottom first** (the order of ``config.v1.json``'s ``lowers``); their indexes are
merged once so that, for every sector, the top-most layer with a mapping (data or zeroed) wins. An
optional RW upper sits above them: lookups take its mappings first and fill the gaps from the
merged lower index; writes, trims and zeroes go to it.

Each mapping's ``tag`` is the slot, in :attr:`Stack.files`, of the file its data lives in, so a
read is: look up the range, then ``readinto`` each data piece straight from its file into the
caller's buffer and zero-fill the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from obd.errors import ConfigError, LayerStateError
from obd.io.source import Source, fill_zero
from obd.lsmt.format import MAX_STACK_LAYERS, SECTOR
from obd.lsmt.index import Index, Mapping, merge_indexes
from obd.lsmt.rw import RWLayer


class Layer(Protocol):
    """What a stack needs of a read-only layer."""

    name: str
    index: Index  # tags are slots into ``files``
    files: list[Source]

    @property
    def virtual_size(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Extent:
    """A run of the device with one kind: ``data`` (mapped), ``zero`` (discarded) or ``hole``."""

    offset: int
    length: int
    kind: str
    layer: int | None = None  # for data/zero: position in the stack, 0 = bottom lower, len(lowers) = upper


class Stack(Source):
    """N read-only lowers plus an optional RW upper, read and written as one device."""

    def __init__(
        self,
        lowers: Sequence[Layer],
        upper: RWLayer | None = None,
        *,
        name: str | None = None,
        virtual_size: int | None = None,
    ):
        if len(lowers) > MAX_STACK_LAYERS:
            raise ConfigError(
                f"{len(lowers)} lowers; overlaybd stacks at most {MAX_STACK_LAYERS}",
                field="lowers",
                value=len(lowers),
            )
        self.lowers = list(lowers)
        self.upper = upper
        self.files: list[Source] = []
        #: for each file slot, the position of its layer in the stack (0 = bottom lower)
        self.slot_layer: list[int] = []
        per_layer: list[Index] = []
        for pos in range(len(self.lowers) - 1, -1, -1):
            layer = self.lowers[pos]
            base = len(self.files)
            self.files.extend(layer.files)
            self.slot_layer.extend([pos] * len(layer.files))
            per_layer.append(layer.index.with_tag(layer.index.tag + base) if base else layer.index)
        self.lower_index = merge_indexes(per_layer)
        lower_vsize = next((ly.virtual_size for ly in reversed(self.lowers) if ly.virtual_size > 0), 0)
        if upper is not None:
            upper.index.tag = len(self.files)
            upper.record_tag = len(self.lowers)
            self.files.extend(upper.files)  # a warp (turboOCI) upper brings [fs-meta, target]
            self.slot_layer.extend([len(self.lowers)] * len(upper.files))
            if upper.virtual_size == 0 and lower_vsize and not upper.readonly:
                upper.update_vsize(lower_vsize)
            vsize = upper.virtual_size or lower_vsize
        else:
            vsize = lower_vsize
        self.size = virtual_size if virtual_size is not None else vsize
        self.name = name or (self.lowers[-1].name if self.lowers else upper.data_path if upper else "<empty>")
        self._write_lock = threading.Lock()

    # --- identity ---------------------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return self.size

    @property
    def readonly(self) -> bool:
        return self.upper is None or self.upper.readonly

    def __len__(self) -> int:
        return len(self.lowers) + (self.upper is not None)

    # --- lookups ----------------------------------------------------------------------------------
    def lookup(self, start: int, end: int) -> list[Mapping]:
        """Mappings of the merged device over sectors ``[start, end)``, upper first, gaps from lowers."""
        if self.upper is None:
            return self.lower_index.lookup(start, end)
        top = self.upper.index.lookup(start, end)
        if not top:
            return self.lower_index.lookup(start, end)
        out: list[Mapping] = []
        pos = start
        lower = self.lower_index.lookup
        for m in top:
            if m[0] > pos:
                out.extend(lower(pos, m[0]))
            out.append(m)
            pos = m[0] + m[1]
        if pos < end:
            out.extend(lower(pos, end))
        return out

    # --- reads ------------------------------------------------------------------------------------
    def readinto(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` with device bytes from ``offset`` (any alignment); short only past the end."""
        if offset >= self.size:
            return 0
        n = min(len(buf), self.size - offset)
        stop = offset + n
        pos = offset
        files = self.files
        for o, ln, m, z, t in self.lookup(offset // SECTOR, -(-stop // SECTOR)):
            a = o * SECTOR
            b = a + ln * SECTOR
            if a < offset:
                a = offset
            if b > stop:
                b = stop
            if a > pos:
                fill_zero(buf[pos - offset : a - offset])
            if z:
                fill_zero(buf[a - offset : b - offset])
            else:
                want = b - a
                got = files[t].readinto(buf[a - offset : b - offset], m * SECTOR + (a - o * SECTOR))
                if got < want:  # past the end of the backing file: zeros, as overlaybd does
                    fill_zero(buf[a - offset + got : b - offset])
            pos = b
        if pos < stop:
            fill_zero(buf[pos - offset : n])
        return n

    # --- extents ----------------------------------------------------------------------------------
    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Runs of data, zeroed and unmapped ranges over ``[offset, offset+length)`` bytes.

        Neighbouring runs of the same kind *and layer* are joined. Offsets are bytes.
        """
        if length is None:
            length = self.size - offset
        stop = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset

        def add(a: int, b: int, kind: str, layer: int | None) -> None:
            if b <= a:
                return
            if (
                out
                and out[-1].kind == kind
                and out[-1].layer == layer
                and out[-1].offset + out[-1].length == a
            ):
                last = out.pop()
                out.append(Extent(last.offset, b - last.offset, kind, layer))
            else:
                out.append(Extent(a, b - a, kind, layer))

        if stop <= offset:
            return out
        for o, ln, _m, z, t in self.lookup(offset // SECTOR, -(-stop // SECTOR)):
            a = max(o * SECTOR, offset)
            b = min((o + ln) * SECTOR, stop)
            add(pos, a, "hole", None)
            add(a, b, "zero" if z else "data", self.slot_layer[t])
            pos = b
        add(pos, stop, "hole", None)
        return out

    # --- writes -----------------------------------------------------------------------------------
    def _need_upper(self) -> RWLayer:
        if self.upper is None:
            raise LayerStateError("the stack is read-only (no upper layer)", path=self.name)
        return self.upper

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise LayerStateError(
                f"range [{offset}, {offset + length}) is outside the {self.size}-byte device", path=self.name
            )

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``; unaligned edges are read, patched and written whole."""
        upper = self._need_upper()
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if not view:
            return
        head = offset % SECTOR
        tail = (offset + len(view)) % SECTOR
        if not head and not tail:
            upper.pwrite(view, offset)
            return
        start = offset - head
        stop = offset + len(view) + ((SECTOR - tail) if tail else 0)
        with self._write_lock:  # read-modify-write must not interleave with another one
            buf = bytearray(stop - start)
            mv = memoryview(buf)
            if head:
                self.readinto(mv[:SECTOR], start)
            if tail:
                self.readinto(mv[-SECTOR:], stop - SECTOR)
            mv[head : head + len(view)] = view
            upper.pwrite(mv, start)

    def trim(self, offset: int, length: int) -> None:
        """Discard the whole sectors inside the range (they read as zeros); edges are zeroed by writing."""
        self.zero(offset, length)

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros, hiding lower data."""
        upper = self._need_upper()
        self._check_range(offset, length)
        if not length:
            return
        a = -(-offset // SECTOR) * SECTOR
        b = (offset + length) // SECTOR * SECTOR
        if b <= a:
            self.pwrite(bytes(length), offset)
            return
        if a > offset:
            self.pwrite(bytes(a - offset), offset)
        upper.trim(a, b - a)
        if offset + length > b:
            self.pwrite(bytes(offset + length - b), b)

    def flush(self) -> None:
        if self.upper is not None:
            self.upper.flush()

    def close(self) -> None:
        if self.upper is not None:
            self.upper.close()
        for layer in self.lowers:
            layer.close()

    def __repr__(self) -> str:
        return (
            f"<Stack {self.name!r} lowers={len(self.lowers)} upper={self.upper is not None} size={self.size}>"
        )
