"""The one exception hierarchy of obd.

Every error a parser raises names the file (or reference), the field and the bad value, so that a
message such as ``L1.commit: trailer.index_size=2000000: more than the 1000000 entries a sealed
layer may hold`` tells a user exactly what is wrong without a traceback. Frontends map these to
their own error channels (nbdkit → EIO plus a log line, FUSE → EIO, CLI → one line on stderr).
"""

from __future__ import annotations

from typing import Any


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 0xFFFF:
        return f"{value} (0x{value:x})"
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return raw[:32].hex() + ("…" if len(raw) > 32 else "")
    return repr(value) if isinstance(value, str) else str(value)


class ObdError(Exception):
    """Base of every error obd raises on purpose.

    ``path`` is the file or image reference concerned, ``field`` the structure field (dotted, e.g.
    ``trailer.index_offset``) and ``value`` the offending value; all three are optional.
    """

    def __init__(self, message: str, *, path: Any = None, field: str | None = None, value: Any = None):
        self.path = None if path is None else str(path)
        self.field = field
        self.value = value
        self.detail = message
        parts = []
        if self.path:
            parts.append(self.path)
        if field:
            parts.append(field if value is None else f"{field}={_show(value)}")
        parts.append(message)
        super().__init__(": ".join(parts))


class FormatError(ObdError):
    """The bytes do not form a valid structure: bad magic, size, offset, count or flag."""


class TruncatedError(FormatError):
    """The file ends before a structure it declares."""


class ChecksumError(FormatError):
    """A stored CRC does not match the bytes it covers."""


class UnsupportedError(ObdError):
    """The structure is valid but uses a feature obd does not implement (e.g. MINI_LZO)."""


class ConfigError(ObdError):
    """A configuration file (config.v1.json, Sandboxfile, …) is malformed or inconsistent."""


class LayerStateError(ObdError):
    """An operation does not fit the layer's state: writing a read-only stack, reopening a torn file…"""


class AlignmentError(ObdError, ValueError):
    """An offset or length is not a multiple of the 512-byte sector where the format needs one."""


class RegistryError(ObdError):
    """A registry or HTTP transfer failed after the retries allowed."""


class AuthError(RegistryError):
    """The registry refused the credentials (or gave no usable token)."""


class IntegrityError(ObdError):
    """Bytes do not have the digest the image pins for them (a poisoned cache, mirror or registry),
    or an image without digest tables was read with ``--verify=require``."""


__all__ = [
    "AlignmentError",
    "AuthError",
    "ChecksumError",
    "ConfigError",
    "FormatError",
    "IntegrityError",
    "LayerStateError",
    "ObdError",
    "RegistryError",
    "TruncatedError",
    "UnsupportedError",
]
