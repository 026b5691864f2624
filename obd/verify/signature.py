"""``--verify-signature KEY``: a cosign signature of the image manifest, checked with the public key.

cosign keeps a signature of image ``sha256:H`` in the same repository under the tag ``sha256-H.sig``:
an OCI manifest whose layers are "simple signing" payloads (JSON naming the signed manifest digest
in ``critical.image.docker-manifest-digest``), each carrying its base64 signature in the
``dev.cosignproject.cosign/signature`` annotation. A manifest passes when one payload names its
digest and its signature verifies with ``KEY`` (a PEM public key as ``cosign generate-key-pair``
writes: ECDSA P-256, or RSA / Ed25519). Keyless (Fulcio/Rekor) signatures are not checked.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from obd.errors import ConfigError, IntegrityError, ObdError
from obd.registry.client import RegistryClient
from obd.registry.reference import Reference

log = logging.getLogger("obd.verify")

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
#: Payloads are small JSON documents; refuse anything larger before reading it.
MAX_PAYLOAD_BYTES = 1 << 20


def signature_tag(manifest_digest: str) -> str:
    """cosign's tag for the signatures of ``manifest_digest``: ``sha256-<hex>.sig``."""
    return manifest_digest.replace(":", "-") + ".sig"


def load_public_key(path: str) -> Any:
    """The PEM public key at ``path`` (ECDSA, RSA or Ed25519); ConfigError naming the file."""
    # lazy: cryptography costs ~60 ms to import and only --verify-signature needs it
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as f:
            return load_pem_public_key(f.read())
    except OSError as e:
        raise ConfigError(
            f"cannot read the key: {e.strerror}", path=path, field="--verify-signature"
        ) from None
    except ValueError as e:
        raise ConfigError(f"not a PEM public key: {e}", path=path, field="--verify-signature") from None


def signature_ok(key: Any, signature: bytes, payload: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature of ``payload`` (SHA-256, as cosign signs)."""
    # lazy, as in load_public_key
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
        else:
            raise ConfigError(f"unsupported key type {type(key).__name__}", field="--verify-signature")
    except InvalidSignature:
        return False
    return True


async def check_signature(client: RegistryClient, ref: Reference, digests: list[str], key_path: str) -> str:
    """The first of ``digests`` (the platform manifest's, then the index's) with a signature that
    ``key_path`` verifies; IntegrityError saying what was found otherwise."""
    key = load_public_key(key_path)
    found: list[str] = []
    for digest in dict.fromkeys(digests):
        try:
            raw = await client.fetch_manifest(ref, signature_tag(digest))
        except ObdError as e:
            found.append(f"{signature_tag(digest)}: {e.detail}")
            continue
        layers = raw.json().get("layers")
        for i, layer in enumerate(layers if isinstance(layers, list) else []):
            sig = (
                (layer.get("annotations") or {}).get(SIGNATURE_ANNOTATION)
                if isinstance(layer, dict)
                else None
            )
            if not sig:
                continue
            payload = await client.get_blob(ref, layer["digest"], max_bytes=MAX_PAYLOAD_BYTES)
            try:
                signed = json.loads(payload)["critical"]["image"]["docker-manifest-digest"]
                signature = base64.b64decode(sig, validate=True)
            except (ValueError, KeyError, TypeError):
                found.append(f"{signature_tag(digest)} layers[{i}]: malformed payload or signature")
                continue
            if signed != digest:
                found.append(f"{signature_tag(digest)} layers[{i}]: signs {signed}")
            elif signature_ok(key, signature, payload):
                log.info("%s@%s: cosign signature verified with %s", ref.name, digest, key_path)
                return digest
            else:
                found.append(f"{signature_tag(digest)} layers[{i}]: signature does not verify with this key")
    raise IntegrityError(
        "no valid signature: " + ("; ".join(found) or "no signature layers"),
        path=ref.name,
        field="--verify-signature",
        value=digests[0],
    )


async def verify_image_signature(
    client: RegistryClient, ref: Reference, manifest_digest: str, key_path: str
) -> str:
    """:func:`check_signature` of a resolved image: a signature of its platform manifest
    ``manifest_digest``, or of the index the reference names (cosign signs either)."""
    top = ref.digest or (await client.fetch_manifest(ref)).digest
    return await check_signature(client, ref, [manifest_digest, top], key_path)


__all__ = [
    "SIGNATURE_ANNOTATION",
    "SIMPLE_SIGNING",
    "check_signature",
    "load_public_key",
    "signature_tag",
    "verify_image_signature",
]
