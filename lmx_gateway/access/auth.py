"""API keys, checked for the scope a route declares (`access.scopes`), never
by path: `security.admin_key` for ADMIN routes; `security.inference_api_key`
and the named `security.inference_api_keys` for INFERENCE routes.

- Profile `lan`: a key is required only when one is configured.
- Profile `cloud`: keys are required; startup refuses without them
  (config.load_config), and should one be missing anyway the routes fail
  closed rather than open.

The keys are read from the live config on every request, so a config reload
that adds or removes one takes effect on the next request. Comparison is
constant time and visits every configured key; neither a configured key nor
what the client sent is ever logged, published or echoed. A named key's
name (never the key) is the client's identity.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.types import Scope

from lmx_supervisor.config import SecurityConfig

ADMIN_KEY_HEADERS = (b"x-admin-key",)
INFERENCE_KEY_HEADERS = (b"x-api-key",)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # The name of the named inference key that matched; None otherwise.
    identity: str | None = None


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def presented_keys(scope: Scope, extra_headers: tuple[bytes, ...]) -> list[bytes]:
    """Every credential the request carries: `Authorization: Bearer` plus the
    family's own header."""
    found: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"authorization":
            token = _bearer(value)
            if token is not None:
                found.append(token)
        elif name in extra_headers and value.strip():
            found.append(bytes(value).strip())
    return found


def key_matches(expected: str, presented: list[bytes]) -> bool:
    want = expected.encode("utf-8")
    matched = False
    for candidate in presented:
        # No early exit: every candidate is compared, in constant time.
        matched |= hmac.compare_digest(want, candidate)
    return matched


def check_admin(security: SecurityConfig, scope: Scope) -> Verdict:
    key = security.admin_key or None  # an empty key is no key, as for the cloud check
    if key is None:
        return Verdict(security.profile != "cloud")
    return Verdict(key_matches(key, presented_keys(scope, ADMIN_KEY_HEADERS)))


def inference_required(security: SecurityConfig) -> bool:
    return (bool(security.inference_api_key) or bool(security.inference_api_keys)
            or security.profile == "cloud")


def check_inference(security: SecurityConfig, scope: Scope) -> Verdict:
    if not inference_required(security):
        return Verdict(True)
    presented = presented_keys(scope, INFERENCE_KEY_HEADERS)
    allowed = bool(security.inference_api_key) and key_matches(
        security.inference_api_key or "", presented)
    identity: str | None = None
    for name, key in sorted(security.inference_api_keys.items()):
        if key_matches(key, presented) and identity is None:
            identity = name
    return Verdict(allowed or identity is not None, identity)
