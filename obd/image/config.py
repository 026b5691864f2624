"""overlaybd's per-device image config, ``config.v1.json`` (docs/formats.md §4.1).

The file is parsed strictly, as overlaybd's rapidjson reader does: keys may be missing (they take
their defaults) but present keys must have the right JSON type. Unknown keys are kept and ignored.
Written back the way the snapshotter writes it: compact JSON, empty optional fields omitted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from obd.errors import ConfigError
from obd.io.publish import publishing
from obd.lsmt.format import MAX_STACK_LAYERS

#: Default of the per-image ``download`` object (also the global default).
DEFAULT_DOWNLOAD: dict[str, Any] = {
    "enable": False,
    "delay": 300,
    "delayExtra": 30,
    "maxMBps": 100,
    "tryCnt": 5,
    "blockSize": 262144,
}


def _check(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: object, where: str) -> Any:
    value = obj[key]
    ok = isinstance(value, kind) and not (kind in (int, (int,)) and isinstance(value, bool))
    if not ok:
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"must be a JSON {_json_name(want)}", path=path, field=f"{where}{key}", value=value)
    return value


def _json_name(py: str) -> str:
    return {"str": "string", "int": "number", "bool": "boolean", "list": "array", "dict": "object"}.get(
        py, py
    )


def _private(path: str, flags: int) -> int:
    """``open()`` opener that creates the file mode 0600, as overlaybd's snapshotter writes configs."""
    return os.open(path, flags, 0o600)


@dataclass
class LowerConfig:
    """One entry of ``lowers`` (bottom first)."""

    file: str = ""
    dir: str = ""
    digest: str = ""
    size: int = 0
    targetFile: str = ""
    targetDigest: str = ""
    gzipIndex: str = ""
    #: obd's: the target's gzip index as a registry blob read by ranges (:mod:`obd.turbo.parts`).
    gzipIndexDigest: str = ""
    gzipIndexSize: int = 0

    @property
    def is_warp(self) -> bool:
        return bool(self.targetFile or self.targetDigest)

    def local_candidates(self) -> list[str]:
        """Local files overlaybd tries, in order: ``file``, then ``dir``'s commit/sealed names."""
        out = []
        if self.file:
            out.append(self.file)
        if self.dir:
            out += [os.path.join(self.dir, n) for n in ("overlaybd.commit", ".commit", "overlaybd.sealed")]
        return out


@dataclass
class UpperConfig:
    """The writable upper layer; empty ``index``/``data`` means the device is read-only."""

    index: str = ""
    data: str = ""
    target: str = ""
    gzipIndex: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.index and self.data)


@dataclass
class ImageConfig:
    """A parsed ``config.v1.json``. ``path`` is where it was read from (for resolving relative paths)."""

    lowers: list[LowerConfig] = field(default_factory=list)
    upper: UpperConfig = field(default_factory=UpperConfig)
    repoBlobUrl: str = ""
    resultFile: str = ""
    accelerationLayer: bool = False
    recordTracePath: str = ""
    download: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DOWNLOAD))
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # --- reading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ImageConfig:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", path=path) from e
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"not UTF-8 text: byte {e.start}", path=path, value=e.object[e.start : e.start + 4]
            ) from e
        return cls.loads(text, path=path)

    @classmethod
    def loads(cls, text: str, *, path: str | None = None) -> ImageConfig:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", path=path
            ) from e
        if not isinstance(obj, dict):
            raise ConfigError("must be a JSON object", path=path, field="(top level)")
        cfg = cls(path=path)
        simple = {"repoBlobUrl": str, "resultFile": str, "accelerationLayer": bool, "recordTracePath": str}
        for key, obj_value in obj.items():
            if key in simple:
                setattr(cfg, key, _check(obj, key, simple[key], path, ""))
            elif key == "lowers":
                items = _check(obj, key, list, path, "")
                cfg.lowers = [
                    _parse_entry(LowerConfig, item, path, f"lowers[{i}].") for i, item in enumerate(items)
                ]
            elif key == "upper":
                cfg.upper = _parse_entry(UpperConfig, _check(obj, key, dict, path, ""), path, "upper.")
            elif key == "download":
                dl = _check(obj, key, dict, path, "")
                merged = dict(DEFAULT_DOWNLOAD)
                for k, v in dl.items():
                    if k in DEFAULT_DOWNLOAD:
                        _check(dl, k, type(DEFAULT_DOWNLOAD[k]), path, "download.")
                    merged[k] = v
                cfg.download = merged
            else:
                cfg.extra[key] = obj_value
        if len(cfg.lowers) > MAX_STACK_LAYERS:
            raise ConfigError(
                f"overlaybd stacks at most {MAX_STACK_LAYERS} lowers",
                path=path,
                field="lowers",
                value=len(cfg.lowers),
            )
        if cfg.accelerationLayer and cfg.recordTracePath:
            raise ConfigError(
                "accelerationLayer and recordTracePath cannot be used together",
                path=path,
                field="recordTracePath",
            )
        return cfg

    # --- writing ----------------------------------------------------------------------------------
    def to_json(self) -> str:
        """Compact JSON as the snapshotter writes it (empty lower/upper fields omitted)."""
        obj: dict[str, Any] = {
            "repoBlobUrl": self.repoBlobUrl,
            "lowers": [_nonempty(lo) for lo in self.lowers],
            "upper": _nonempty(self.upper),
            "resultFile": self.resultFile,
        }
        if self.accelerationLayer:
            obj["accelerationLayer"] = True
        if self.recordTracePath:
            obj["recordTracePath"] = self.recordTracePath
        obj.update(self.extra)
        return json.dumps(obj, separators=(",", ":"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically and durably (:func:`~obd.io.publish.publishing`), mode 0600 like the
        snapshotter."""
        with publishing(path, "w", encoding="utf-8", opener=_private) as f:
            f.write(self.to_json())

    # --- paths ------------------------------------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        """Find a file named in the config.

        Absolute paths are used as they are. Relative paths are tried against the current directory
        (what overlaybd does), then the config file's directory, then that directory's parent (the
        fixture layout keeps configs in ``cfg/`` beside the blobs). Returns None if none exists.
        """
        if not name:
            return None
        if os.path.isabs(name):
            return name if os.path.exists(name) else None
        bases = [Path.cwd()]
        if self.path:
            here = Path(self.path).resolve().parent
            bases += [here, here.parent]
        for base in bases:
            candidate = base / name
            if candidate.exists():
                return str(candidate)
        return None


def _parse_entry(cls: type, obj: Any, path: object, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ConfigError("must be a JSON object", path=path, field=where.rstrip("."), value=obj)
    kwargs = {}
    known = {f.name: f for f in fields(cls)}
    for key in obj:
        if key in known:
            kind = int if known[key].type in ("int", int) else str
            kwargs[key] = _check(obj, key, kind, path, where)
    return cls(**kwargs)


def _nonempty(entry: Any) -> dict[str, Any]:
    return {f.name: getattr(entry, f.name) for f in fields(entry) if getattr(entry, f.name)}
