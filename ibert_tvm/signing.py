"""Ed25519 signatures over an artifact's manifest (which hashes every other file).

A signature says which key signed the artifact: a user who keeps the private key on the build
machine can require, at load time, that an artifact came from there. It does not make an
artifact from an untrusted signer safe to load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .manifest import ArtifactError

SIGNATURE = "manifest.sig"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as err:  # the runner's install has it; a trimmed one may not
        raise ArtifactError("signatures need the 'cryptography' package (pip install cryptography)") from err
    return InvalidSignature, serialization, ed25519


def generate(private: Path, public: Path) -> None:
    """A new key pair: `private` (PEM, mode 0600) for compile --sign-key, `public` (PEM) for runners."""
    _, serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over an existing key
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    Path(public).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))


def sign(data: bytes, private_key: Path) -> bytes:
    _, serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{private_key} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{private_key} is not an Ed25519 key (ibert-tvm keygen makes one)")
    return key.sign(data)


def public_key(key: Any) -> Any:
    """An Ed25519 public key from a key object, PEM bytes, or a PEM file's path."""
    _, serialization, ed25519 = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    pem = key if isinstance(key, bytes) else Path(key).read_bytes()
    try:
        loaded = serialization.load_pem_public_key(pem)
    except ValueError as err:
        raise ValueError(f"verify key {key if not isinstance(key, bytes) else '(bytes)'} is not a PEM public key") from err
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise ValueError("verify key is not an Ed25519 public key")
    return loaded


def verify(folder: Path, data: bytes, signature: bytes, key: Any) -> None:
    """`signature` of `folder`'s manifest bytes `data` is valid for `key`."""
    invalid, _, _ = _crypto()
    pub = public_key(key)
    try:
        pub.verify(signature, data)
    except invalid as err:
        raise ArtifactError(f"{folder}: the manifest's signature does not verify with the given key "
                            "(tampered, or signed by another key)") from err
