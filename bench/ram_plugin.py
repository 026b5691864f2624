"""The "Python ceiling" for bench_nbd.py: the most trivial nbdkit Python plugin, serving a RAM disk.

``nbdkit python bench/ram_plugin.py file=IMAGE`` loads IMAGE into memory and serves it read-write
(writes stay in memory). Each callback is one slice copy, so its throughput is what nbdkit's Python
plugin itself costs; obd's plugin is measured against it. Same thread model as obd (PARALLEL).
"""

import builtins

import nbdkit

API_VERSION = 2
_path = None
_data = None
_view = None


def config(key, value):
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}")
    _path = value


def config_complete():
    global _data, _view
    if _path is None:
        raise RuntimeError("file= is required")
    with builtins.open(_path, "rb") as f:
        _data = bytearray(f.read())
    _view = memoryview(_data)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return len(_data)


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = _view[offset : offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _view[offset : offset + len(buf)] = buf


def flush(h, flags):
    pass
