"""Who a device is: tokens (HMAC-SHA256 of the device id under a secret) and certificate names (PROTOCOL.md sections 1-2).

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


OTHER_DEVICE = "the client certificate names another device"  # MQTT 5 refuses it 0x87, a bad token 0x86


def refusal(secrets: Sequence[bytes], certificate_names: Sequence[str], device: str, token: str | None) -> str | None:
    """None when the device proved who it is, else why not.

    A verified TLS client certificate names the device (exactly); with one, the token may be
    omitted, but a token that is sent must be valid too."""
    if certificate_names and device not in certificate_names:
        return OTHER_DEVICE
    if token is None:
        return None if certificate_names else "'token' is missing"
    if not verify(secrets, device, token):
        return "the token does not match this device"
    return None
