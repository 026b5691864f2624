"""Reading images from OCI registries on demand: references, auth, the HTTP client, remote blobs, push.

- :mod:`~obd.registry.reference`: ``parse_reference("python:3.12")`` → :class:`Reference`.
- :mod:`~obd.registry.auth`: challenges, Bearer tokens, credentials (flags, env, docker config).
- :mod:`~obd.registry.client`: :class:`RegistryClient`, the async aiohttp client, built from
  :mod:`~obd.registry.http` (transport, retries, redirects), :mod:`~obd.registry.manifests`,
  :mod:`~obd.registry.ranges` (blob reads) and :mod:`~obd.registry.uploads`.
- :mod:`~obd.registry.loop`: :class:`AsyncRunner`, the event-loop thread sync code submits to.
- :mod:`~obd.registry.blob`: :class:`RemoteBlob`, a blob as an :class:`obd.io.source.Source`; the one
  owner of readahead, range merging and sharing of fetches in flight.
- :mod:`~obd.registry.push`: pushing OCI layouts and single-layer images.

``docs/registry.md`` describes the options, environment variables and credential lookup.

aiohttp is imported inside the functions that use it, never at a module's top: it costs 0.2 s (its
connector loads the system CA bundle twice at import), half of what nbdkit spent starting obd's
plugin. Opening a registry image whose blocks are all cached never loads it, and ``obd run`` has the
plugin import it while it waits for the launcher's parameters (frontends/nbd/backend.py).
"""

from obd.registry.auth import CredentialResolver, Credentials
from obd.registry.blob import RemoteBlob
from obd.registry.client import RawManifest, RegistryClient
from obd.registry.loop import AsyncRunner, default_runner
from obd.registry.push import PushResult, push_layout
from obd.registry.reference import Reference, parse_reference

__all__ = [
    "AsyncRunner",
    "CredentialResolver",
    "Credentials",
    "PushResult",
    "RawManifest",
    "Reference",
    "RegistryClient",
    "RemoteBlob",
    "default_runner",
    "parse_reference",
    "push_layout",
]
