"""CURVE key pairs: the supervisor's own, and the node keys it admits.

Key files are ZeroMQ certificates (zmq.auth): NAME.key holds the public
key, NAME.key_secret both keys (mode 0600). The authorized set is read
again at every connection attempt, so adding or removing a key file takes
effect without a restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq.auth

from lmx_supervisor.config import NodesConfig
from lmx_supervisor.models.bundled_model import lmx_home
from lmx_worker.node_agent.keys import create_key_pair, public_key_of

log = logging.getLogger("lmx.nodes")

SERVER_KEY_NAME = "server"


def keys_dir() -> Path:
    return lmx_home() / "keys"


def server_key_pair(config: NodesConfig) -> tuple[bytes, bytes]:
    """The supervisor's (public, secret) key pair, created on first use."""
    if config.server_key_file is not None:
        secret_file = Path(config.server_key_file).expanduser()
    else:
        secret_file = keys_dir() / f"{SERVER_KEY_NAME}.key_secret"
        if not secret_file.exists():
            create_key_pair(secret_file.parent, SERVER_KEY_NAME)
            log.info("created the supervisor's key pair in %s", secret_file.parent)
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    return public, secret


class AuthorizedKeys:
    """The ZAP credentials provider: is this client's public key listed?"""

    def __init__(self, config: NodesConfig) -> None:
        self.listed = frozenset(config.authorized_keys)
        self.directory = (Path(config.authorized_keys_dir).expanduser()
                          if config.authorized_keys_dir else None)

    def allowed(self) -> set[str]:
        keys = set(self.listed)
        if self.directory is not None and self.directory.is_dir():
            for path in self.directory.glob("*.key"):
                try:
                    keys.add(public_key_of(path))
                except (OSError, ValueError) as exc:
                    log.error("authorized key file %s unreadable: %s", path, exc)
        return keys

    def callback(self, domain: str, client_key: bytes) -> bool:
        allowed = client_key.decode() in self.allowed()
        if not allowed:
            log.warning("refused a CURVE client with an unknown key %s", client_key.decode())
        return allowed
