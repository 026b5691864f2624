"""Image references the way docker writes them, and the registry API URLs they lead to.

``python:3.12`` is ``docker.io/library/python:3.12``; ``ghcr.io/org/app@sha256:…`` names a digest;
``localhost:5000/app`` and ``10.0.0.1:5000/app`` name a registry by host and port. The rules are
docker's (``distribution/reference``): the first path component is a registry when it contains a
``.`` or a ``:`` or is ``localhost``; otherwise the image lives on Docker Hub, whose API host is
``registry-1.docker.io`` and whose one-component names are under ``library/``. Without a tag or
digest the tag is ``latest``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from obd.errors import ConfigError

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
#: Names docker treats as Docker Hub (the legacy index host included).
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([0-9a-fA-F]{32,})")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
#: Digest algorithms and their hex lengths obd can verify.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}


def validate_digest(digest: str, *, what: str = "digest") -> str:
    """``digest`` if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>`` (lowercase); else ConfigError."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if not m:
        raise ConfigError("malformed digest (want sha256:<64 hex digits>)", field=what, value=digest)
    alg, hexpart = m.groups()
    if alg not in DIGEST_HEX_LENGTHS:
        raise ConfigError(f"unsupported digest algorithm {alg!r}", field=what, value=digest)
    if len(hexpart) != DIGEST_HEX_LENGTHS[alg] or hexpart != hexpart.lower():
        raise ConfigError(
            f"a {alg} digest has {DIGEST_HEX_LENGTHS[alg]} lowercase hex digits", field=what, value=digest
        )
    return digest


@dataclass(frozen=True)
class Reference:
    """A parsed image reference: where the image lives and which version of it.

    ``registry`` is the name as written (``docker.io`` for Docker Hub), ``repository`` the path
    inside it (``library/python``), and at least one of ``tag`` and ``digest`` is set (a digest wins
    when both are). ``api_root`` is set on references that :mod:`obd.registry.hosts` points at a
    mirror or a configured ``server``: the API root URL (``http://mirror:5000/v2``) used instead of
    ``https://<api host>/v2``. It is not part of the reference's identity.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    api_root: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def target(self) -> str:
        """What to ask the manifests endpoint for: the digest when known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """The host (and port) the registry API is served on."""
        if self.api_root:
            return self.api_root.split("://", 1)[-1].split("/", 1)[0]
        return DOCKER_HUB_API if self.registry in DOCKER_HUB_ALIASES else self.registry

    def familiar(self) -> str:
        """The short form docker prints: ``python:3.12`` for ``docker.io/library/python:3.12``."""
        text = str(self)
        if self.registry in DOCKER_HUB_ALIASES:
            text = text.split("/", 1)[1]
            if text.startswith("library/") and "/" not in self.repository[len("library/") :]:
                text = text[len("library/") :]
        return text

    def base_url(self, insecure: bool = False) -> str:
        """``api_root``, else ``https://<api host>/v2/`` (``http://`` when the registry is insecure)."""
        if self.api_root:
            return self.api_root.rstrip("/") + "/"
        return f"{'http' if insecure else 'https'}://{self.api_host}/v2/"

    def with_target(self, *, tag: str | None = None, digest: str | None = None) -> Reference:
        """The same repository with another tag or digest."""
        return dataclasses.replace(self, tag=tag, digest=digest)


def _split_registry(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        return first, rest
    return DEFAULT_REGISTRY, name


def parse_reference(text: str) -> Reference:
    """Parse a docker-style image reference; raise :class:`~obd.errors.ConfigError` saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise ConfigError("empty image reference", field="reference", value=text)
    original = text
    if text != text.strip() or any(c.isspace() for c in text):
        raise ConfigError("image reference contains whitespace", field="reference", value=original)
    text = text.removeprefix("docker://")
    if "://" in text:
        raise ConfigError(
            "an image reference has no URL scheme (write host:port/repo:tag)",
            field="reference",
            value=original,
        )
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        validate_digest(digest, what="reference.digest")
    registry, path = _split_registry(text)
    tag = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ConfigError(
                "invalid tag (letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')",
                field="reference.tag",
                value=tag,
            )
    if not _HOST.fullmatch(registry):
        raise ConfigError("invalid registry host", field="reference.registry", value=registry)
    if not path:
        raise ConfigError("missing repository name", field="reference", value=original)
    if any(c.isupper() for c in path):
        raise ConfigError("repository name must be lowercase", field="reference.repository", value=path)
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise ConfigError(
                "invalid repository path component (lowercase letters, digits and single '.', '_', '__' "
                "or '-' runs between them)",
                field="reference.repository",
                value=component or path,
            )
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry in DOCKER_HUB_ALIASES and "/" not in path:
        path = f"library/{path}"
    if len(f"{registry}/{path}") > MAX_NAME_LENGTH:
        raise ConfigError(
            f"repository name longer than {MAX_NAME_LENGTH} characters", field="reference", value=original
        )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


__all__ = [
    "DEFAULT_REGISTRY",
    "DOCKER_HUB_API",
    "Reference",
    "parse_reference",
    "validate_digest",
]
