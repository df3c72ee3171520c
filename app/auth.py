"""Device tokens: HMAC-SHA256 of the device id under a secret (PROTOCOL.md section 2).

The first secret mints, every secret verifies, so secrets rotate without a
flag day: add the new one first, wait for devices to re-provision, drop the old.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence


def mint(secret: bytes, device: str) -> str:
    """The token a device presents in its hello."""
    return hmac.new(secret, device.encode(), hashlib.sha256).hexdigest()


def verify(secrets: Sequence[bytes], device: str, token: str) -> bool:
    """True when `token` was minted for `device` by any of `secrets`, compared in constant time."""
    presented = token.encode("ascii", "replace")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(mint(secret, device).encode(), presented)
    return matched
