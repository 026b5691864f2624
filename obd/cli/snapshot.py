"""``obd snapshot`` and ``obd fork``: upper directories, the writable state of a served image.

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

import argparse
import contextlib
import fcntl
import os
import sys
import time
import uuid as _uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from obd.cli.common import progress
from obd.cli.output_args import add_output_args, output_options
from obd.errors import ConfigError, FormatError, LayerStateError, ObdError, UnsupportedError
from obd.image.config import ImageConfig, LowerConfig, UpperConfig
from obd.image.local import open_config, open_layer
from obd.lsmt.format import MAX_STACK_LAYERS
from obd.lsmt.rw import create_rw, open_rw
from obd.lsmt.stack import Stack
from obd.progress import human_bytes
from obd.tools import OutputOptions, commit_layer

CONFIG_NAME = "config.v1.json"
LOCK_NAME = "lock"
FORMAT_VERSION = 1


# --- images -------------------------------------------------------------------------------------
def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _is_config_file(path: str) -> bool:
    if path.endswith(".json"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")


def image_config(image: str | Sequence[str], *, platform: str | None = None) -> ImageConfig:
    """The config of a local image, every path in it absolute.

    ``image`` is one of: layer files, lowest first (a list, or one path); a ``config.v1.json`` (its
    upper, if any, is kept); ``oci:DIR[:TAG]``. This is the one place an image name is turned into
    files: registry references (``image=REF``) plug in here.
    """
    specs = [image] if isinstance(image, str) else list(image)
    if not specs:
        raise ConfigError("no image given (layer files, a config.v1.json or oci:DIR[:TAG])")
    if len(specs) == 1 and specs[0].startswith("oci:"):
        return _oci_config(specs[0], platform)
    if len(specs) == 1 and os.path.isfile(specs[0]) and _is_config_file(specs[0]):
        return _resolved_config(specs[0])
    lowers = []
    for i, spec in enumerate(specs):
        if spec.startswith("oci:"):
            raise ConfigError("an oci:DIR[:TAG] image is a whole stack; give it alone", field=f"image[{i}]")
        if not os.path.exists(spec):
            if _looks_like_registry_reference(spec):
                raise UnsupportedError(
                    "registry images are not served yet: give local layer files, a config.v1.json or "
                    "oci:DIR[:TAG]",
                    path=spec,
                    field="image",
                )
            raise ConfigError("no such file", path=spec, field="image")
        lowers.append(LowerConfig(file=_abs(spec)))
    return ImageConfig(lowers=lowers, path=None)


def _looks_like_registry_reference(spec: str) -> bool:
    try:
        from obd.registry.reference import parse_reference
    except ImportError:  # pragma: no cover - the registry package is optional here
        return False
    try:
        parse_reference(spec)
    except ObdError:
        return False
    return True


def _resolved_config(path: str) -> ImageConfig:
    cfg = ImageConfig.load(path)
    out = replace(cfg, lowers=[], path=_abs(path), extra=dict(cfg.extra))
    for i, lower in enumerate(cfg.lowers):
        new = replace(lower)
        found = next((f for f in (cfg.resolve(n) for n in lower.local_candidates()) if f), None)
        if found:
            new.file, new.dir = _abs(found), ""
        elif not lower.digest:
            raise ConfigError(
                f"layer file not found (tried {', '.join(lower.local_candidates()) or 'nothing'})",
                path=path,
                field=f"lowers[{i}].file",
            )
        for key in ("targetFile", "gzipIndex"):
            name = getattr(lower, key)
            if name:
                hit = cfg.resolve(name)
                if not hit:
                    raise ConfigError("file not found", path=path, field=f"lowers[{i}].{key}", value=name)
                setattr(new, key, _abs(hit))
        out.lowers.append(new)
    up = cfg.upper
    if up.enabled:
        fields = {}
        for key in ("data", "index", "target", "gzipIndex"):
            name = getattr(up, key)
            hit = cfg.resolve(name) if name else None
            fields[key] = _abs(hit) if hit else name
        out.upper = UpperConfig(**fields)
    return out


def _oci_config(reference: str, platform: str | None) -> ImageConfig:
    from obd.image.oci import OCILayout, parse_oci_reference

    root, tag = parse_oci_reference(reference)
    layout = OCILayout(root)
    image = layout.resolve(tag, platform=platform)
    lowers = []
    for i, layer in enumerate(image.overlaybd_layers()):
        if layer.is_acceleration:
            continue
        if layer.is_turbo:
            raise UnsupportedError(
                "turboOCI images are not supported from OCI layouts yet", path=reference, field=f"layers[{i}]"
            )
        path = layout.blob_path(layer.digest)
        if not os.path.exists(path):
            raise ConfigError("layer blob missing from the layout", path=path, field=f"layers[{i}]")
        size = os.path.getsize(path)
        if size != layer.size:
            raise FormatError(
                f"blob is {size} bytes, the manifest says {layer.size}",
                path=path,
                field=f"layers[{i}].size",
                value=layer.size,
            )
        lowers.append(LowerConfig(file=_abs(path), digest=layer.digest, size=layer.size))
    return ImageConfig(lowers=lowers, path=None)


def image_label(image: str | Sequence[str]) -> list[str]:
    """How an image is recorded in an upper directory: paths made absolute, ``oci:`` kept."""
    specs = [image] if isinstance(image, str) else list(image)
    out = []
    for s in specs:
        if s.startswith("oci:"):
            out.append("oci:" + _abs(s[4:]))
        elif os.path.exists(s):
            out.append(_abs(s))
        else:
            out.append(s)
    return out


# --- upper directories ----------------------------------------------------------------------------
class UpperDir:
    """A directory holding a device's writable state (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = _abs(os.fspath(path))
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
                "in use by another process (a running nbd server?); stop it first", path=self.path
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
        cfg = self._new_config(base.lowers, 1, meta)
        self._fresh_rw(1, vsize, sparse=sparse, parent_uuid=parent)
        cfg.save(self.config_path)
        _fsync_dir(self.path)
        return cfg

    def _new_config(self, lowers: list[LowerConfig], generation: int, meta: dict[str, Any]) -> ImageConfig:
        data, index = self.rw_paths(generation)
        meta = {**meta, "generation": generation}
        return ImageConfig(
            lowers=list(lowers), upper=UpperConfig(index=index, data=data), extra={"obd": meta}, path=None
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
        new = self._new_config([*cfg.lowers, LowerConfig(file=out)], gen + 1, meta)
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
        base = ImageConfig(lowers=list(cfg.lowers))
        with new.locked():
            new.create(
                base,
                image=list(meta.get("image") or []),
                sparse=meta["sparse"] if sparse is None else sparse,
                vsize=meta["vsize"],
                extra={"forked_from": {"path": self.path, "generation": meta["generation"]}},
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
    """uuid and virtual size of the top lower of an image (parent of a new RW layer)."""
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
    upper: str, image: Sequence[str] | None, *, sparse: bool = False, platform: str | None = None
) -> tuple[UpperDir, ImageConfig]:
    """Open (creating on first use) the upper directory ``upper`` over ``image``; returns it locked.

    With ``image`` None the directory must exist. With an image, an existing directory must have
    been made for the same one.
    """
    ud = UpperDir(upper)
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


# --- command line ---------------------------------------------------------------------------------
SNAPSHOT_DESCRIPTION = """\
Seal the live RW layer of an upper directory into a new read-only layer (DIR/layers/G.commit) and
start an empty RW layer on top of it. The device reads the same before and after; later writes go
to the new RW layer, and the snapshot layer can be stacked, exported, merged or pushed like any
other layer. The directory must not be in use: stop the nbd server first.

An upper directory is made by the nbd server on first use (obd nbd IMAGE --upper DIR) or by
`obd fork`; see docs/nbd.md for its layout.

examples:
  obd snapshot vm1.upper -m "after apt-get install"
  obd snapshot -z vm1.upper          # ZFile lz4 layer
  obd snapshot --list vm1.upper
"""

FORK_DESCRIPTION = """\
Make a new upper directory NEW over a committed state: over SOURCE's base image and snapshots
(SOURCE an upper directory; its uncommitted writes are not included: snapshot first), or over an
image (layer files lowest first, a config.v1.json, or oci:DIR[:TAG]). The new directory shares
SOURCE's layer files by path. SOURCE may be in use while it is forked.

examples:
  obd snapshot vm1.upper && obd fork vm1.upper vm2.upper
  obd fork base.commit app.commit --new vm3.upper --sparse
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "snapshot",
        help="seal an upper directory's RW layer into a layer and start a fresh one",
        description=SNAPSHOT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="the upper directory")
    p.add_argument("--list", action="store_true", help="list the snapshots and exit")
    add_output_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_snapshot)

    f = sub.add_parser(
        "fork",
        help="start a new upper directory over a committed state",
        description=FORK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("source", nargs="+", metavar="SOURCE", help="an upper directory, or an image")
    f.add_argument("--new", metavar="NEW", help="the new upper directory (default: the last argument)")
    flavour = f.add_mutually_exclusive_group()
    flavour.add_argument("--sparse", dest="sparse", action="store_true", default=None, help="sparse RW layer")
    flavour.add_argument("--append", dest="sparse", action="store_false", help="append-mode RW layer")
    f.add_argument("--platform", help="platform of a multi-platform oci: image (default: this machine's)")
    f.set_defaults(func=run_fork)


def run_snapshot(args: argparse.Namespace) -> int:
    ud = UpperDir(args.dir)
    if args.list:
        cfg = ud.load()
        meta = ud.meta(cfg)
        for s in meta.get("snapshots", []):
            print(f"{s['file']}\t{s['uuid']}\t{s.get('time', '')}\t{s.get('message', '')}")
        print(f"live: generation {meta['generation']} ({'sparse' if meta['sparse'] else 'append'})")
        return 0
    opts = output_options(args)
    if args.parent_uuid:
        raise ObdError("--parent-uuid: a snapshot's parent is always the layer below it")
    ud.load()  # a clear error for a directory that is not an upper directory, before locking it
    with ud.locked(), progress(args, "snapshot") as prog:
        entry = ud.snapshot(options=opts, message=args.message, uuid=args.uuid, progress_cb=prog.update)
    if not args.quiet:
        print(
            f"snapshot {os.path.join(ud.path, entry['file'])}: {human_bytes(entry['bytes'])}, "
            f"{human_bytes(entry['data_bytes'])} of data, uuid {entry['uuid']}",
            file=sys.stderr,
        )
    return 0


def run_fork(args: argparse.Namespace) -> int:
    sources = list(args.source)
    if args.new:
        new = args.new
    else:
        if len(sources) < 2:
            raise ObdError("give SOURCE... NEW (or --new NEW)")
        new = sources.pop()
    if os.path.exists(os.path.join(new, CONFIG_NAME)):
        raise ConfigError("already an upper directory", path=new)
    src = UpperDir(sources[0]) if len(sources) == 1 else None
    if src is not None and os.path.isdir(src.path) and src.exists():
        if src.has_uncommitted_data():
            print(
                f"obd: note: {src.path} has writes after its last snapshot; the fork does not include them",
                file=sys.stderr,
            )
        made = src.fork(new, sparse=args.sparse)
    else:
        made = UpperDir(new)
        with made.locked():
            made.create(
                image_config(sources, platform=args.platform),
                image=image_label(sources),
                sparse=bool(args.sparse),
            )
    meta = made.meta(made.load())
    print(
        f"new upper directory {made.path}: {meta['base_layers']} layer(s) below, "
        f"{'sparse' if meta['sparse'] else 'append'} RW layer",
        file=sys.stderr,
    )
    return 0
