"""Upper directories: the writable state of a served image (snapshots and forks build on them).

An *upper directory* is what ``nbdkit python plugin.py image=… upper=DIR`` (or ``obd nbd … --upper
DIR``) writes to. It is self-describing: ``DIR/config.v1.json`` is an ordinary overlaybd image
config naming every file the device is made of, so ``obd export --config DIR/config.v1.json`` or
overlaybd itself can open it too::

    DIR/config.v1.json     lowers: the base image's layers, then DIR's snapshots (oldest first);
                           upper: the live RW layer; plus an "obd" object (below)
    DIR/rw/G.data          the live RW layer of generation G (append mode: also DIR/rw/G.index;
    DIR/rw/G.index         sparse mode: G.index is an empty placeholder, as overlaybd-create -s makes)
    DIR/layers/G.commit    sealed snapshot layers, one per ``obd snapshot`` (G = the generation committed)
    DIR/lock               flock()ed by the server using DIR; snapshot refuses to run while it is held

The ``"obd"`` object of the config records ``version`` (1), ``image`` (the base image as given),
``base_layers`` (how many of ``lowers`` are the base image's), ``generation`` (G of the live RW
layer), ``sparse``, ``vsize``, ``snapshots`` (one entry per snapshot layer: file, uuid, message,
time) and, for a fork, ``forked_from``. All paths in the config are absolute: overlaybd resolves
relative ones against its working directory, which is not DIR.

* **snapshot** seals the live RW layer into ``layers/G.commit`` (plain, or ZFile with ``-z``), starts
  an empty ``rw/G+1`` whose parent uuid is the new layer's, and switches the config over with one
  atomic rename; only then is ``rw/G`` deleted. A crash at any point leaves the old config valid.
* **fork** makes a new upper directory over a committed state: over the lowers of another upper
  directory (its base image plus snapshots — not its uncommitted RW layer), or over an image. The
  source's snapshot layers are shared by path, not copied: do not delete them while forks use them.

Upper directories are created by the server on first use; :class:`UpperDir` is the API the nbd
frontend and these commands share, and :func:`image_config` turns a local image (layer files, a
``config.v1.json`` or ``oci:DIR[:TAG]``) into the config both start from.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid as _uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from obd.errors import ConfigError, LayerStateError
from obd.image.accel import META_KEY as ACCEL_META_KEY
from obd.image.config import ImageConfig, LowerConfig, UpperConfig
from obd.image.local import open_config, open_layer
from obd.image.resolve import abs_path, image_config, image_label
from obd.layer.tools import OutputOptions, commit_layer
from obd.lsmt.format import MAX_STACK_LAYERS
from obd.lsmt.rw import create_rw, open_rw
from obd.lsmt.stack import Stack

CONFIG_NAME = "config.v1.json"
LOCK_NAME = "lock"
FORMAT_VERSION = 1
#: The ``obd`` metadata keys an upper directory keeps for itself; any other key was recorded by a
#: user of the directory (``obd run``'s ``run``, an image's acceleration layer) and a fork keeps it.
_OWN_META = frozenset(
    {"version", "image", "base_layers", "generation", "sparse", "vsize", "snapshots", "forked_from"}
)


class UpperDir:
    """A directory holding a device's writable state (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = abs_path(os.fspath(path))
        self.config_path = os.path.join(self.path, CONFIG_NAME)
        self._lock_fd: int | None = None

    # --- state ------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.isfile(self.config_path)

    def load(self) -> ImageConfig:
        if not self.exists():
            raise ConfigError(f"not an upper directory (no {CONFIG_NAME})", path=self.path)
        cfg = ImageConfig.load(self.config_path)
        meta = cfg.extra.get("obd")
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f'not an obd upper directory config (no "obd" object of version {FORMAT_VERSION})',
                path=self.config_path,
                field="obd",
            )
        for key, kind in (("generation", int), ("base_layers", int), ("sparse", bool), ("vsize", int)):
            if not isinstance(meta.get(key), kind):
                raise ConfigError("missing or mistyped", path=self.config_path, field=f"obd.{key}")
        if not 0 <= meta["base_layers"] <= len(cfg.lowers) or meta["generation"] < 1:
            raise ConfigError("inconsistent with lowers", path=self.config_path, field="obd", value=meta)
        if not cfg.upper.enabled:
            raise ConfigError("upper directory config has no upper layer", path=self.config_path)
        return cfg

    @staticmethod
    def meta(cfg: ImageConfig) -> dict[str, Any]:
        return cfg.extra["obd"]

    def rw_paths(self, generation: int) -> tuple[str, str]:
        base = os.path.join(self.path, "rw", str(generation))
        return base + ".data", base + ".index"

    def layer_path(self, generation: int) -> str:
        return os.path.join(self.path, "layers", f"{generation}.commit")

    # --- locking ----------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory's exclusive lock (held until :meth:`unlock` or process exit)."""
        if self._lock_fd is not None:
            return
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LayerStateError(
                "in use by another process (a running obd nbd, mount or run?); stop it first", path=self.path
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[UpperDir]:
        self.lock()
        try:
            yield self
        finally:
            self.unlock()

    # --- create / open ----------------------------------------------------------------------------
    def create(
        self,
        base: ImageConfig,
        *,
        image: list[str],
        sparse: bool = False,
        vsize: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ImageConfig:
        """Start the directory over ``base`` (lowers only) with an empty RW layer of generation 1."""
        if self.exists():
            raise ConfigError("already an upper directory", path=self.path)
        if base.upper.enabled:
            raise ConfigError(
                "the image already has an upper layer; serve its config without upper=", path=base.path
            )
        if len(base.lowers) > MAX_STACK_LAYERS:
            raise ConfigError(f"more than {MAX_STACK_LAYERS} lowers", field="lowers", value=len(base.lowers))
        os.makedirs(os.path.join(self.path, "rw"), exist_ok=True)
        os.makedirs(os.path.join(self.path, "layers"), exist_ok=True)
        parent, size = _top_of(base)
        if vsize is None:
            vsize = size
        if not vsize:
            raise ConfigError("cannot tell the image's virtual size (no lowers)", path=self.path)
        meta = {
            "version": FORMAT_VERSION,
            "image": image,
            "base_layers": len(base.lowers),
            "generation": 1,
            "sparse": sparse,
            "vsize": vsize,
            "snapshots": [],
            **(extra or {}),
        }
        accel = (base.extra.get("obd") or {}).get(ACCEL_META_KEY)
        if accel:  # the image's shipped prefetch trace stays with every state made from it
            meta[ACCEL_META_KEY] = accel
        cfg = self._new_config(base.lowers, 1, meta, repo_blob_url=base.repoBlobUrl)
        self._fresh_rw(1, vsize, sparse=sparse, parent_uuid=parent)
        cfg.save(self.config_path)
        _fsync_dir(self.path)
        return cfg

    def _new_config(
        self, lowers: list[LowerConfig], generation: int, meta: dict[str, Any], *, repo_blob_url: str = ""
    ) -> ImageConfig:
        data, index = self.rw_paths(generation)
        meta = {**meta, "generation": generation}
        # repoBlobUrl: lowers of a registry image are digests read from there
        return ImageConfig(
            lowers=list(lowers),
            upper=UpperConfig(index=index, data=data),
            extra={"obd": meta},
            path=None,
            repoBlobUrl=repo_blob_url,
        )

    def _fresh_rw(self, generation: int, vsize: int, *, sparse: bool, parent_uuid: str | None) -> None:
        data, index = self.rw_paths(generation)
        for stale in (data, index):  # left by a crash between creating it and switching the config
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        create_rw(data, index, vsize, sparse=sparse, parent_uuid=parent_uuid).close()
        _fsync_dir(os.path.dirname(data))

    def open(self, *, readonly: bool = False) -> Stack:
        """The device: base image, snapshots, and the live RW layer (read-only if asked)."""
        return open_config(self.load(), readonly=readonly)

    def check_image(self, cfg: ImageConfig, base: ImageConfig, image: list[str]) -> None:
        """Refuse to reuse the directory over a different base image."""
        meta = self.meta(cfg)
        have = [lo.file for lo in cfg.lowers[: meta["base_layers"]]]
        want = [lo.file for lo in base.lowers]
        if have != want:
            raise ConfigError(
                f"was made for image {' '.join(meta.get('image') or have)}, not {' '.join(image)}",
                path=self.path,
                field="obd.image",
            )

    # --- snapshot / fork --------------------------------------------------------------------------
    def snapshot(
        self,
        *,
        options: OutputOptions | None = None,
        message: str = "",
        uuid: str | None = None,
        progress_cb: Any = None,
    ) -> dict[str, Any]:
        """Seal the live RW layer into a new lower and start an empty one on top. Needs the lock."""
        if self._lock_fd is None:
            raise LayerStateError("snapshot needs the directory lock", path=self.path)
        cfg = self.load()
        meta = dict(self.meta(cfg))
        if len(cfg.lowers) + 1 > MAX_STACK_LAYERS:
            raise ConfigError(
                f"{MAX_STACK_LAYERS} lowers already: flatten with `obd merge` and fork over the result",
                path=self.path,
                field="lowers",
                value=len(cfg.lowers),
            )
        gen = meta["generation"]
        data, index = cfg.resolve(cfg.upper.data), cfg.resolve(cfg.upper.index)
        if not data:
            raise ConfigError("RW data file missing", path=self.config_path, field="upper.data")
        out = self.layer_path(gen)
        new_uuid = str(uuid or _uuid.uuid4())
        layer = open_rw(data, index, readonly=True)
        try:
            res = commit_layer(
                layer,
                out,
                uuid=new_uuid,
                message=message,
                options=options or OutputOptions(),
                progress=progress_cb,
            )
        finally:
            layer.close()
        sealed = open_layer(out)  # proves the result opens before the config points at it
        try:
            uuid_written = sealed.header.uuid
        finally:
            sealed.close()
        self._fresh_rw(gen + 1, meta["vsize"], sparse=meta["sparse"], parent_uuid=uuid_written)
        entry = {
            "file": os.path.relpath(out, self.path),
            "uuid": uuid_written,
            "message": message,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bytes": res.file_bytes,
            "data_bytes": res.info.data_bytes,
        }
        meta["snapshots"] = [*meta.get("snapshots", []), entry]
        new = self._new_config(
            [*cfg.lowers, LowerConfig(file=out)], gen + 1, meta, repo_blob_url=cfg.repoBlobUrl
        )
        new.save(self.config_path)
        _fsync_dir(self.path)
        for old in (data, index):
            if old:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)
        return entry

    def fork(self, new_path: str, *, sparse: bool | None = None) -> UpperDir:
        """A new upper directory over this one's committed state (lowers), with an empty RW layer."""
        cfg = self.load()
        meta = self.meta(cfg)
        new = UpperDir(new_path)
        base = ImageConfig(lowers=list(cfg.lowers), repoBlobUrl=cfg.repoBlobUrl)
        # what others recorded about the image (how to run it, its acceleration layer) goes along
        carried = {k: v for k, v in meta.items() if k not in _OWN_META}
        with new.locked():
            new.create(
                base,
                image=list(meta.get("image") or []),
                sparse=meta["sparse"] if sparse is None else sparse,
                vsize=meta["vsize"],
                extra={**carried, "forked_from": {"path": self.path, "generation": meta["generation"]}},
            )
        return new

    def has_uncommitted_data(self) -> bool:
        cfg = self.load()
        layer = open_rw(cfg.resolve(cfg.upper.data) or "", cfg.resolve(cfg.upper.index), readonly=True)
        try:
            return bool(layer.dump())
        finally:
            layer.close()


def _top_of(cfg: ImageConfig) -> tuple[str | None, int]:
    """uuid and virtual size of the top lower of an image (parent of a new RW layer).

    Only the top lower is opened when it has a virtual size (it always has, for what overlaybd and
    obd write): for a registry image that is one layer's round trips instead of every layer's, on
    the way to ``obd run``'s first boot."""
    lowers = cfg.lowers[:-1] if cfg.accelerationLayer else cfg.lowers
    if lowers:
        one = replace(cfg, lowers=lowers[-1:], accelerationLayer=False, upper=UpperConfig())
        stack = open_config(one, readonly=True)
        try:
            only = stack.lowers[-1]
            if only.virtual_size > 0:
                return only.header.uuid, stack.size  # type: ignore[attr-defined]
        finally:
            stack.close()
    stack = open_config(replace(cfg, upper=UpperConfig()), readonly=True)
    try:
        top = stack.lowers[-1] if stack.lowers else None
        return (top.header.uuid if top is not None else None), stack.size  # type: ignore[attr-defined]
    finally:
        stack.close()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_upper(
    upper: str,
    image: Sequence[str] | None,
    *,
    sparse: bool = False,
    platform: str | None = None,
    create: bool = True,
) -> tuple[UpperDir, ImageConfig]:
    """Open (creating on first use, unless not ``create``) the upper directory ``upper`` over
    ``image``; returns it locked.

    With ``image`` None the directory must exist. With an image, an existing directory must have
    been made for the same one.
    """
    ud = UpperDir(upper)
    if not create and not ud.exists():
        raise ConfigError(
            f"not an upper directory (no {CONFIG_NAME}); a read-only open creates none", path=ud.path
        )
    ud.lock()
    try:
        if ud.exists():
            cfg = ud.load()
            if image:
                ud.check_image(cfg, image_config(image, platform=platform), image_label(image))
            return ud, cfg
        if not image:
            raise ConfigError(f"not an upper directory (no {CONFIG_NAME}) and no image given", path=ud.path)
        cfg = ud.create(image_config(image, platform=platform), image=image_label(image), sparse=sparse)
        return ud, cfg
    except BaseException:
        ud.unlock()
        raise
