"""obd: a pure-Python OverlayBD block engine.

Reads and writes overlaybd's on-disk formats byte-for-byte (LSMT layers, ZFile compression, the tar
envelope, ``config.v1.json``) and merges layer stacks into one virtual block device.
"""

__version__ = "0.1.0"
