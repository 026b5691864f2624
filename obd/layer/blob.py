"""Opening a layer blob: unwrap the tar envelope, then ZFile, down to the LSMT bytes (docs/formats.md §2.13).

overlaybd stacks its readers as ``raw bytes → tar envelope (if a ustar header is present) → ZFile
(if the magic matches) → LSMT``. :func:`open_blob` does the same and remembers each step, so that
an inspector can say what a blob is made of and a reader gets the innermost :class:`~obd.io.source.Source`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from obd.errors import FormatError, TruncatedError
from obd.formats.tar_envelope import is_tar_envelope, open_envelope
from obd.io.source import FileSource, Source
from obd.lsmt.format import MAGIC0 as LSMT_MAGIC0
from obd.lsmt.format import MAGIC1 as LSMT_MAGIC1
from obd.zfile import ZFileReader, is_zfile

GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Blob:
    """A blob and the wrappers peeled off it, outermost first."""

    path: str
    raw: Source
    source: Source  # the innermost bytes (an LSMT file, normally)
    kinds: list[str] = field(default_factory=list)  # e.g. ["tar", "zfile", "lsmt"]
    envelope: Any = None  # obd.formats.tar_envelope.TarEnvelope
    zfile: Any = None  # obd.zfile.ZFileReader

    @property
    def kind(self) -> str:
        return "+".join(self.kinds)

    def close(self) -> None:
        self.raw.close()


def open_source(source: Source, path: str | None = None) -> Blob:
    """Peel the wrappers off an already-open source."""
    path = path or source.name
    blob = Blob(path=path, raw=source, source=source)
    head = source.pread(0, 32)
    if head[:2] == GZIP_MAGIC:
        raise FormatError(
            "gzip-compressed file; overlaybd layers are never gzipped (a .tar.gz? extract the blob first, "
            "e.g. `tar -xzf`)",
            path=path,
            field="magic",
            value=head[:2],
        )
    if source.size >= 512 and is_tar_envelope(source):
        env = open_envelope(source)
        blob.envelope = env
        blob.kinds.append("tar")
        blob.source = env.payload
    if blob.source.size >= 512 and is_zfile(blob.source):
        blob.zfile = ZFileReader(blob.source)
        blob.kinds.append("zfile")
        blob.source = blob.zfile
    inner = blob.source.pread(0, 24)
    if inner[:8] == LSMT_MAGIC0 and inner[8:24] == LSMT_MAGIC1:
        blob.kinds.append("lsmt")
    elif not blob.kinds:
        blob.kinds.append("raw")
    else:
        blob.kinds.append("data")
    return blob


def open_blob(path: str | os.PathLike[str]) -> Blob:
    """Open a local blob file and peel its wrappers."""
    path = os.fspath(path)
    source = FileSource(path)
    try:
        if source.size == 0:
            raise TruncatedError("file is empty", path=path, field="size", value=0)
        return open_source(source, path)
    except BaseException:
        source.close()
        raise
