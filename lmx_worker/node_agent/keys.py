"""CURVE key files (ZeroMQ certificates, zmq.auth): NAME.key holds the
public key, NAME.key_secret both (mode 0600)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import zmq.auth

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """NAME.key and NAME.key_secret (0600) in `directory`; refuses to
    overwrite an existing pair (a key in use would be lost)."""
    if not _NAME.match(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-'")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise FileExistsError(f"{public} already exists; choose another name")
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old)
    secret.chmod(0o600)
    public.chmod(0o644)
    return public, secret


def public_key_of(path: Path) -> str:
    """The Z85 public key in a certificate file (NAME.key or NAME.key_secret)."""
    public, _secret = zmq.auth.load_certificate(path)
    return public.decode()


def read_server_key(path: Path) -> str:
    """The supervisor's public key: a certificate file, or the bare key."""
    text = path.read_text()
    key = public_key_of(path) if "public-key" in text else text.strip()
    if len(key) != 40:
        raise ValueError(f"{path} holds no CURVE public key (40 Z85 characters)")
    return key
