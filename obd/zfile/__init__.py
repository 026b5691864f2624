"""ZFile: overlaybd's seekable block-compressed container (LZ4 raw blocks or zstd frames).

- :mod:`obd.zfile.format`: the 512-byte header/trailer record, flags, algorithm ids, limits;
- :mod:`obd.zfile.codecs`: the codec table (lz4, zstd; MINI_LZO is unsupported);
- :mod:`obd.zfile.layout`: :class:`ZFileLayout`, the records and jump table checked at open;
- :mod:`obd.zfile.reader`: :func:`is_zfile` and :class:`ZFileReader`, a random-access
  :class:`~obd.io.source.Source` of the original bytes;
- :mod:`obd.zfile.writer`: :class:`ZFileWriter` and the whole-file helpers.
"""

from obd.zfile.codecs import LZ4, ZSTD, Codec, codec_by_name, get_codec
from obd.zfile.format import (
    DATA_OFFSET,
    DEFAULT_BLOCK_SIZE,
    FLAGS_HEADER,
    FLAGS_HEADER_OVERWRITTEN,
    FLAGS_TRAILER,
    MAGIC0,
    MAGIC1,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    RECORD_SIZE,
    Algorithm,
    Flag,
    ZFileRecord,
    algorithm_name,
    flag_names,
    record_digest,
)
from obd.zfile.layout import ZFileLayout
from obd.zfile.reader import VerifyReport, ZFileReader, is_zfile
from obd.zfile.writer import ZFileWriter, compress_file, decompress_file, default_threads

__all__ = [
    "DATA_OFFSET",
    "DEFAULT_BLOCK_SIZE",
    "FLAGS_HEADER",
    "FLAGS_HEADER_OVERWRITTEN",
    "FLAGS_TRAILER",
    "LZ4",
    "MAGIC0",
    "MAGIC1",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "RECORD_SIZE",
    "ZSTD",
    "Algorithm",
    "Codec",
    "Flag",
    "VerifyReport",
    "ZFileLayout",
    "ZFileReader",
    "ZFileRecord",
    "ZFileWriter",
    "algorithm_name",
    "codec_by_name",
    "compress_file",
    "decompress_file",
    "default_threads",
    "flag_names",
    "get_codec",
    "is_zfile",
    "record_digest",
]
