"""Writing a layer blob through the optional ZFile and tar-envelope wrappers, published atomically.

The mirror image of :mod:`obd.layer.blob`: ``LSMT bytes → ZFile (if compressing) → tar envelope (if
asked) → file``. overlaybd's ``commit -z -t`` writes exactly this: a ZFile whose header is rewritten
at the end (flag 0x1B), inside a tar envelope whose prefix is rewritten once the size is known. The
output goes to a temporary name beside the target and is renamed into place only when complete,
so a crash never leaves a half-written blob under the final name.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any, BinaryIO

from obd.errors import ObdError
from obd.formats.tar_envelope import TarEnvelopeWriter
from obd.io.publish import publish_path, temp_path
from obd.zfile import ZFileWriter


class BlobWriter:
    """``with BlobWriter(path, compress="lz4", tar=True) as out: out.write(...)``.

    ``compress`` is ``None`` (plain LSMT), ``"lz4"`` or ``"zstd"``; ``block_size`` is the ZFile
    block size in bytes; ``verify`` adds the per-block CRC; ``overwrite_header`` rewrites the ZFile
    header with the final index fields (what ``overlaybd-commit -z`` does; ``overlaybd-zfile`` does
    not). ``mode`` is the file mode recorded in the tar envelope and given to the output file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        compress: str | None = None,
        block_size: int = 4096,
        verify: bool = True,
        tar: bool = False,
        overwrite_header: bool = True,
        mode: int = 0o644,
    ):
        self.path = os.fspath(path)
        self.tmp = temp_path(self.path)
        self.mode = mode
        try:
            self._file: BinaryIO = open(self.tmp, "w+b")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise ObdError(f"cannot create: {e.strerror}", path=self.tmp) from e
        self._env = None
        self._zfile = None
        out: Any = self._file  # the innermost writer: file, tar envelope or ZFile
        if tar:
            self._env = TarEnvelopeWriter(self._file, mode=0o100000 | mode)
            out = self._env
        if compress:
            self._zfile = ZFileWriter(
                out,
                algorithm=compress,
                block_size=block_size,
                verify=verify,
                overwrite_header=overwrite_header,
            )
            out = self._zfile
        self._out = out
        self.written = 0  # bytes of the innermost (uncompressed) stream
        self.size = 0  # bytes of the final file

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        self._out.write(data)
        self.written += n
        return n

    def close(self) -> None:
        """Finish the wrappers, fsync, and rename into place (:func:`obd.io.publish.publish_path`)."""
        if self._zfile is not None:
            self._zfile.close()
        if self._env is not None:
            self._env.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.size = os.fstat(self._file.fileno()).st_size
        self._file.close()
        os.chmod(self.tmp, self.mode)
        publish_path(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the partial output."""
        try:
            self._file.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
