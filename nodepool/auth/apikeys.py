"""API keys: a recognisable, checksummed, high-entropy format; only a hash is stored.

Grammar (every key is exactly 71 ASCII characters)::

    api-key   = "npk_" lookup-id "_" secret "_" checksum
    lookup-id = 16 * HEXLOWER         ; 8 random bytes, lowercase hex; stored in clear, indexed
    secret    = 43 * BASE62           ; 32 random bytes as a big-endian number, zero-padded
    checksum  =  6 * BASE62           ; CRC-32 of "npk_" lookup-id "_" secret, zero-padded
    HEXLOWER  = "0"-"9" / "a"-"f"
    BASE62    = "0"-"9" / "A"-"Z" / "a"-"z"   ; digit values in that order

Why this shape: the ``npk_`` prefix lets secret scanners and our own metadata parsing spot
a key (a JWT starts with ``eyJ``); base62 and ``_`` keep the whole key one "word" that a
double-click selects; the lookup id finds the stored row without a scan; the CRC-32 (as in
GitHub's tokens) catches typos and truncation offline, before any database read. A CRC-32
detects every error burst of up to 32 bits, so any single changed character is caught.
The checksum is not a secret and adds no security; the 256-bit secret does.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass, field
from typing import Final

from nodepool.errors import UnauthenticatedError

__all__ = [
    "API_KEY_LENGTH",
    "API_KEY_PREFIX",
    "GeneratedApiKey",
    "MalformedApiKey",
    "ParsedApiKey",
    "generate_api_key",
    "hash_secret",
    "looks_like_api_key",
    "parse_api_key",
    "secret_matches",
]

API_KEY_PREFIX: Final = "npk_"
_LOOKUP_BYTES: Final = 8
_SECRET_BYTES: Final = 32
_LOOKUP_LEN: Final = 2 * _LOOKUP_BYTES
_SECRET_LEN: Final = 43  # 62**43 > 2**256 > 62**42: the shortest base62 width for 32 bytes
_CHECKSUM_LEN: Final = 6  # 62**6 > 2**32
API_KEY_LENGTH: Final = len(API_KEY_PREFIX) + _LOOKUP_LEN + 1 + _SECRET_LEN + 1 + _CHECKSUM_LEN
# Anything longer than this is refused before any other work (it is far above the 71 of a
# real key, so error messages can still say "wrong length" for near misses).
_MAX_INPUT: Final = 256

_BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_INDEX: Final = {c: i for i, c in enumerate(_BASE62)}
_KEY_RE: Final = re.compile(
    rf"npk_([0-9a-f]{{{_LOOKUP_LEN}}})_([0-9A-Za-z]{{{_SECRET_LEN}}})_([0-9A-Za-z]{{{_CHECKSUM_LEN}}})"
)


class MalformedApiKey(UnauthenticatedError):
    """The text is not a well-formed API key (prefix, length, characters or checksum)."""

    default_message = "malformed API key"


@dataclass(frozen=True, slots=True)
class GeneratedApiKey:
    # The full key is shown to its owner once and never stored or logged.
    key: str = field(repr=False)
    lookup_id: str
    secret_hash: str


@dataclass(frozen=True, slots=True)
class ParsedApiKey:
    lookup_id: str
    secret: str = field(repr=False)


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(_BASE62[rest])
    if len(digits) > width:
        raise ValueError("number too large for width")
    return "".join(reversed(digits)).rjust(width, "0")


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECKSUM_LEN)


def generate_api_key() -> GeneratedApiKey:
    lookup_id = secrets.token_hex(_LOOKUP_BYTES)
    secret = _base62(int.from_bytes(secrets.token_bytes(_SECRET_BYTES), "big"), _SECRET_LEN)
    body = f"{API_KEY_PREFIX}{lookup_id}_{secret}"
    return GeneratedApiKey(f"{body}_{_checksum(body)}", lookup_id, hash_secret(secret))


def parse_api_key(text: str) -> ParsedApiKey:
    """Splits a key into lookup id and secret; ``MalformedApiKey`` if it is not one."""
    if not isinstance(text, str) or len(text) > _MAX_INPUT:
        raise MalformedApiKey()
    if not text.startswith(API_KEY_PREFIX):
        raise MalformedApiKey("not an API key")
    if len(text) != API_KEY_LENGTH:
        raise MalformedApiKey("malformed API key: wrong length")
    # fullmatch, not match + "$": "$" would accept a trailing newline.
    match = _KEY_RE.fullmatch(text)
    if match is None:
        raise MalformedApiKey("malformed API key: unexpected characters")
    lookup_id, secret, checksum = match.groups()
    if _checksum(text[: -_CHECKSUM_LEN - 1]) != checksum:
        raise MalformedApiKey("malformed API key: checksum mismatch (mistyped or truncated?)")
    return ParsedApiKey(lookup_id, secret)


def hash_secret(secret: str) -> str:
    # A single SHA-256 is enough here, unlike for passwords: the secret is 256 random bits,
    # so there is no dictionary to try and brute force is 2**256 work however fast the hash.
    # A slow KDF would only add cost to every API-key call.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    # Constant-time comparison; bytes so that a non-ASCII stored value cannot raise TypeError.
    return hmac.compare_digest(
        hash_secret(secret).encode("ascii"), stored_hash.encode("utf-8", "surrogatepass")
    )


def looks_like_api_key(text: str) -> bool:
    """Cheap test used to tell API keys from JWTs in call metadata; not a validation."""
    return text.startswith(API_KEY_PREFIX)
