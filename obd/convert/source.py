"""Where images come from and go to, in skopeo's transport syntax.

* ``docker://REF`` (or a bare ``REF``): a registry; layers are downloaded (digest-verified), and
  only those a conversion really needs.
* ``oci:DIR[:TAG]``: an OCI image layout (an index is resolved to ``--platform``).
* ``docker-archive:FILE[:REF]``: a ``docker save`` tarball (``manifest.json`` plus layer tars, the
  classic layout or Docker 25's OCI-flavoured one), source only. ``REF`` picks one of several images
  by its repo tag, or ``@N`` by position.

A source is read into a :class:`SourceImage`: the image config, and for each layer its descriptor
and ``diff_id``; :meth:`SourceImage.fetch` makes a layer blob available as a local file.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from obd.convert.layertar import SYMLINK, clean_name, detect_compression, read_layer
from obd.errors import ConfigError, FormatError, UnsupportedError
from obd.image.remote import RemoteOptions, default_remote_options
from obd.oci.layout import OCILayout, file_digest, parse_oci_reference
from obd.oci.model import BLOB_DIGEST, MAX_JSON_BYTES
from obd.registry.reference import Reference, parse_reference, validate_digest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
#: How many layer downloads run at once.
PARALLEL_DOWNLOADS = 4
DOWNLOAD_TIMEOUT = 6 * 3600.0


@dataclass(frozen=True)
class Transport:
    """A parsed ``transport:location`` name."""

    kind: str  # "docker", "oci" or "docker-archive"
    location: str  # reference, directory or file
    tag: str | None = None  # oci tag / archive image

    def __str__(self) -> str:
        if self.kind == "docker":
            return f"docker://{self.location}"
        return f"{self.kind}:{self.location}" + (f":{self.tag}" if self.tag else "")


def parse_transport(text: str) -> Transport:
    """``docker://REF``, ``oci:DIR[:TAG]``, ``docker-archive:FILE[:REF]``, or a bare registry reference."""
    if text.startswith("docker://"):
        return Transport("docker", text[len("docker://") :])
    if text.startswith("oci:"):
        root, tag = parse_oci_reference(text)
        if not root:
            raise ConfigError("oci: needs a directory", field="transport", value=text)
        return Transport("oci", root, tag)
    if text.startswith("docker-archive:"):
        rest = text[len("docker-archive:") :]
        if os.path.isfile(rest):
            return Transport("docker-archive", rest)
        # the reference may hold colons itself (name:tag): the file is the shortest existing prefix
        cut = rest.find(":")
        while cut >= 0:
            if os.path.isfile(rest[:cut]):
                return Transport("docker-archive", rest[:cut], rest[cut + 1 :] or None)
            cut = rest.find(":", cut + 1)
        return Transport("docker-archive", rest)
    scheme = text.split(":", 1)[0]
    if scheme in ("oci-archive", "dir", "docker-daemon", "containers-storage", "ostree", "sif"):
        raise UnsupportedError(f"the {scheme}: transport is not supported", field="transport", value=text)
    return Transport("docker", text)


@dataclass(frozen=True)
class SourceLayer:
    index: int
    digest: str
    size: int
    media_type: str
    diff_id: str


@dataclass
class SourceImage:
    """A source image: config, layers, and how to get a layer blob onto the local disk."""

    name: str
    config: dict[str, Any]
    layers: list[SourceLayer]
    manifest_annotations: dict[str, str] = field(default_factory=dict)
    registry: Reference | None = None
    _fetch_many: Callable[[list[int], str, Callable[[int], None] | None], dict[int, str]] | None = None

    def fetch(
        self, indices: list[int], workdir: str, progress: Callable[[int], None] | None = None
    ) -> dict[int, str]:
        """Local files holding the blobs of layers ``indices`` (``progress(bytes)`` as they land)."""
        assert self._fetch_many is not None
        return self._fetch_many(indices, workdir, progress)


def _check_layer_type(media: str, where: str, name: str) -> None:
    if "encrypted" in media:
        raise UnsupportedError("encrypted layers are not supported", path=name, field=where, value=media)
    if media and not any(t in media for t in ("tar", "layer")):
        raise UnsupportedError("not a filesystem layer", path=name, field=where, value=media)


def _layers_from(
    name: str, descriptors: list[Any], config: dict[str, Any], *, layer_annotations: list[dict[str, str]]
) -> list[SourceLayer]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(descriptors):
        raise FormatError(
            f"config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff_ids for "
            f"{len(descriptors)} layers",
            path=name,
            field="config.rootfs.diff_ids",
        )
    layers = []
    for i, (d, diff_id) in enumerate(zip(descriptors, diff_ids, strict=True)):
        if BLOB_DIGEST in layer_annotations[i]:
            raise UnsupportedError(
                "this is already an overlaybd image (its layers carry overlaybd annotations)",
                path=name,
                field=f"layers[{i}]",
            )
        if not isinstance(diff_id, str):
            raise FormatError("diff_id is not a string", path=name, field=f"config.rootfs.diff_ids[{i}]")
        validate_digest(diff_id, what=f"config.rootfs.diff_ids[{i}]")
        _check_layer_type(d.media_type, f"layers[{i}].mediaType", name)
        layers.append(SourceLayer(i, d.digest, d.size, d.media_type, diff_id))
    return layers


# -- registry -----------------------------------------------------------------------------------


def open_registry(reference: str, remote: RemoteOptions, platform: str | None) -> SourceImage:
    ref = parse_reference(reference)
    client = remote.client()
    image = remote.runner.run(client.get_image(ref, platform or remote.platform), 300)
    layers = _layers_from(
        str(ref), image.layers, image.config, layer_annotations=[d.annotations for d in image.layers]
    )

    def fetch(indices: list[int], workdir: str, progress: Callable[[int], None] | None) -> dict[int, str]:
        async def all_() -> dict[int, str]:
            sem = asyncio.Semaphore(PARALLEL_DOWNLOADS)

            async def one(i: int) -> tuple[int, str]:
                layer = layers[i]
                path = os.path.join(workdir, f"src-{i}.blob")
                async with sem:
                    await client.download_blob(ref, layer.digest, path)
                if progress is not None:
                    progress(layer.size)
                return i, path

            return dict(await asyncio.gather(*(one(i) for i in indices)))

        return remote.runner.run(all_(), DOWNLOAD_TIMEOUT)

    return SourceImage(
        str(ref),
        image.config,
        layers,
        dict(image.manifest.get("annotations") or {}),
        registry=ref,
        _fetch_many=fetch,
    )


# -- OCI layout -----------------------------------------------------------------------------------


def open_oci(root: str, tag: str | None, platform: str | None) -> SourceImage:
    layout = OCILayout(root)
    image = layout.resolve(tag, platform=platform)
    layers = _layers_from(
        image.reference, image.layers, image.config, layer_annotations=[d.annotations for d in image.layers]
    )

    def fetch(indices: list[int], workdir: str, progress: Callable[[int], None] | None) -> dict[int, str]:
        out = {}
        for i in indices:
            layer = layers[i]
            path = layout.blob_path(layer.digest)
            try:
                digest, size = file_digest(path)
            except OSError as e:
                raise ConfigError(f"layer blob missing: {e.strerror}", path=path) from None
            if digest != layer.digest or size != layer.size:
                raise FormatError(
                    f"blob is {size} bytes with digest {digest}; "
                    f"the manifest says {layer.size}, {layer.digest}",
                    path=path,
                )
            out[i] = path
            if progress is not None:
                progress(size)
        return out

    return SourceImage(
        image.reference,
        image.config,
        layers,
        dict(image.manifest.get("annotations") or {}),
        _fetch_many=fetch,
    )


# -- docker save archives ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Desc:
    digest: str
    size: int
    media_type: str


def open_docker_archive(path: str, ref: str | None, workdir: str) -> SourceImage:
    """Unpack a ``docker save`` tarball (into ``workdir``, by our own file names) and read its image."""
    spool = os.path.join(workdir, "archive")
    os.makedirs(spool, exist_ok=True)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ConfigError(f"cannot open: {e.strerror}", path=path) from None
    with f:
        parsed = read_layer(f, spool, name=path)
    files = {e.name: e for e in parsed.entries}

    def member(name: str, what: str) -> str:
        key = clean_name(name.encode())
        for _ in range(8):
            e = files.get(key)
            if e is None:
                break
            if e.kind == SYMLINK:  # Docker 25 links the legacy paths to blobs/sha256/…
                base = key.rsplit(b"/", 1)[0] if b"/" in key else b""
                key = clean_name(e.link if e.link.startswith(b"/") else base + b"/" + e.link).lstrip(b"/")
                continue
            if e.data is None:
                break
            return e.data
        raise FormatError(f"{what} {name!r} is not a file in the archive", path=path)

    def load_json(name: str, what: str) -> Any:
        p = member(name, what)
        if os.path.getsize(p) > MAX_JSON_BYTES:
            raise FormatError(f"{what} is too large", path=path, field=name)
        try:
            with open(p, "rb") as fh:
                return json.load(fh)
        except ValueError as e:
            raise FormatError(f"{what} is not valid JSON: {e}", path=path, field=name) from None

    manifest = load_json("manifest.json", "manifest.json")
    if not isinstance(manifest, list) or not manifest or not all(isinstance(m, dict) for m in manifest):
        raise FormatError("manifest.json is not a list of images", path=path)
    if ref is None:
        if len(manifest) != 1:
            tags = [t for m in manifest for t in (m.get("RepoTags") or [])]
            raise ConfigError(
                f"{len(manifest)} images in the archive; pick one with docker-archive:FILE:REF or :@N "
                f"(tags: {', '.join(tags) or 'none'})",
                path=path,
            )
        entry = manifest[0]
    elif ref.startswith("@") and ref[1:].isdigit():
        n = int(ref[1:])
        if n >= len(manifest):
            raise ConfigError(f"the archive holds {len(manifest)} images", path=path, value=ref)
        entry = manifest[n]
    else:
        wanted = {ref, ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest"}
        with_ref = [m for m in manifest if wanted & set(m.get("RepoTags") or [])]
        if not with_ref:
            raise ConfigError(f"no image tagged {ref!r} in the archive", path=path)
        entry = with_ref[0]
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise FormatError("manifest.json entry lacks Config or Layers", path=path)
    config = load_json(config_name, "image config")
    if not isinstance(config, dict):
        raise FormatError("image config is not an object", path=path)
    descs = []
    blobs = []
    for i, name in enumerate(layer_names):
        if not isinstance(name, str):
            raise FormatError("layer name is not a string", path=path, field=f"Layers[{i}]")
        blob = member(name, "layer")
        digest, size = file_digest(blob)
        with open(blob, "rb") as fh:
            kind = detect_compression(fh.read(4))
        media = {"gzip": DOCKER_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}.get(kind, DOCKER_LAYER)
        descs.append(_Desc(digest, size, media))
        blobs.append(blob)
    layers = _layers_from(path, descs, config, layer_annotations=[{} for _ in descs])

    def fetch(indices: list[int], _workdir: str, progress: Callable[[int], None] | None) -> dict[int, str]:
        if progress is not None:
            for i in indices:
                progress(layers[i].size)
        return {i: blobs[i] for i in indices}

    return SourceImage(f"docker-archive:{path}", config, layers, _fetch_many=fetch)


def open_source(
    transport: Transport, *, remote: RemoteOptions | None, platform: str | None, workdir: str
) -> SourceImage:
    """The image a source transport names."""
    if transport.kind == "docker":
        if remote is None:
            remote = default_remote_options()
        return open_registry(transport.location, remote, platform)
    if transport.kind == "oci":
        return open_oci(transport.location, transport.tag, platform)
    if transport.kind == "docker-archive":
        return open_docker_archive(transport.location, transport.tag, workdir)
    raise UnsupportedError(f"unknown transport {transport.kind}")  # pragma: no cover


__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_MANIFEST",
    "OCI_CONFIG",
    "OCI_LAYER",
    "OCI_MANIFEST",
    "SourceImage",
    "SourceLayer",
    "Transport",
    "open_source",
    "parse_transport",
]
