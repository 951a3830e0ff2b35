"""Looking for secrets where they must not be: every encoding of a secret we can think of.

A seed could leak as itself, lower-cased, as the bytes it stands for (raw, hex,
base64, URL-safe base64, with or without padding), URL-quoted (inside an otpauth://
URI) or as UTF-16; a password or a session token as itself, base64, hex or quoted.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import quote


def _byte_forms(raw: bytes) -> set[bytes]:
    forms = {raw, raw.hex().encode(), raw.hex().upper().encode()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode, base64.b32encode):
        encoded = encode(raw)
        forms |= {encoded, encoded.rstrip(b"="), encoded.lower(), encoded.rstrip(b"=").lower()}
    return forms


def encodings(secret: str) -> set[bytes]:
    """The byte strings that would betray ``secret``."""
    text = secret.strip()
    forms = {text.encode(), text.lower().encode(), text.upper().encode(), quote(text, safe="").encode(),
             text.encode("utf-16-le"), text.encode("utf-16-be")}
    forms |= _byte_forms(text.encode())
    for decode in (lambda t: base64.b32decode(t + "=" * (-len(t) % 8)),
                   lambda t: base64.urlsafe_b64decode(t + "=" * (-len(t) % 4))):
        try:
            raw = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(raw) >= 8:  # shorter byte strings could turn up by chance
            forms |= _byte_forms(raw)
    return {f for f in forms if len(f) >= 8}


def leaks(blob: bytes, secrets: dict[str, str]) -> list[str]:
    """The names of the secrets some encoding of which occurs in ``blob``."""
    return sorted(name for name, secret in secrets.items() if any(form in blob for form in encodings(secret)))
