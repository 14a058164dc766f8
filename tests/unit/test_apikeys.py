"""API key format: grammar, checksum, parsing and secret hashing."""

from __future__ import annotations

import contextlib
import hashlib
import re
import string
import zlib
from collections.abc import Callable

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nodepool.auth.apikeys import (
    API_KEY_LENGTH,
    API_KEY_PREFIX,
    GeneratedApiKey,
    MalformedApiKey,
    ParsedApiKey,
    generate_api_key,
    hash_secret,
    looks_like_api_key,
    parse_api_key,
    secret_matches,
)
from nodepool.errors import UnauthenticatedError

GRAMMAR = re.compile(r"npk_[0-9a-f]{16}_[0-9A-Za-z]{43}_[0-9A-Za-z]{6}")
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def b62decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 62 + BASE62.index(char)
    return value


def test_generated_key_follows_the_grammar() -> None:
    generated = generate_api_key()
    assert GRAMMAR.fullmatch(generated.key)
    assert len(generated.key) == API_KEY_LENGTH == 71
    assert generated.key.startswith(API_KEY_PREFIX)
    _, lookup_id, secret, checksum = generated.key.split("_")
    assert lookup_id == generated.lookup_id
    # The checksum is the CRC-32 of everything before it, in base62.
    assert b62decode(checksum) == zlib.crc32(generated.key[:-7].encode())
    # The secret carries 32 random bytes.
    assert b62decode(secret) < 2**256
    assert generated.secret_hash == hashlib.sha256(secret.encode()).hexdigest()


def test_round_trip() -> None:
    generated = generate_api_key()
    parsed = parse_api_key(generated.key)
    assert parsed.lookup_id == generated.lookup_id
    assert secret_matches(parsed.secret, generated.secret_hash)
    assert hash_secret(parsed.secret) == generated.secret_hash


def test_keys_are_unique() -> None:
    keys = [generate_api_key() for _ in range(200)]
    assert len({k.key for k in keys}) == 200
    assert len({k.lookup_id for k in keys}) == 200
    secrets_seen = {parse_api_key(k.key).secret for k in keys}
    assert len(secrets_seen) == 200


def test_secrets_are_not_in_reprs() -> None:
    generated = generate_api_key()
    parsed = parse_api_key(generated.key)
    assert parsed.secret not in repr(generated)
    assert parsed.secret not in repr(parsed)
    assert generated.key not in repr(generated)
    assert generated.lookup_id in repr(generated)


def test_secret_matching() -> None:
    generated = generate_api_key()
    other = parse_api_key(generate_api_key().key)
    assert not secret_matches(other.secret, generated.secret_hash)
    assert not secret_matches("", generated.secret_hash)
    assert not secret_matches(parse_api_key(generated.key).secret, "")
    assert not secret_matches(parse_api_key(generated.key).secret, "é" * 64)
    assert not secret_matches(parse_api_key(generated.key).secret, generated.secret_hash.upper())


def test_hash_secret_is_sha256_hex() -> None:
    assert hash_secret("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_malformed_is_unauthenticated() -> None:
    assert issubclass(MalformedApiKey, UnauthenticatedError)


@pytest.fixture
def key() -> str:
    return generate_api_key().key


def test_wrong_prefix_is_refused(key: str) -> None:
    for prefix in ("npx_", "NPK_", "npk-", "xnpk_", ""):
        with pytest.raises(MalformedApiKey):
            parse_api_key(prefix + key[4:])


def test_wrong_lengths_are_refused(key: str) -> None:
    with pytest.raises(MalformedApiKey, match="length"):
        parse_api_key(key[:-1])
    with pytest.raises(MalformedApiKey, match="length"):
        parse_api_key(key + "0")
    with pytest.raises(MalformedApiKey):
        parse_api_key(key[:40])
    with pytest.raises(MalformedApiKey):
        parse_api_key(API_KEY_PREFIX)


def test_very_long_input_is_refused_early(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    # The regex must not even run on it.
    import nodepool.auth.apikeys as module

    class Boom:
        def fullmatch(self, text: str) -> None:
            raise AssertionError("parsed oversized input")

    monkeypatch.setattr(module, "_KEY_RE", Boom())
    with pytest.raises(MalformedApiKey):
        parse_api_key(key + "x" * 1000)
    with pytest.raises(MalformedApiKey):
        parse_api_key("npk_" + "a" * 253)


def b62encode(value: int, width: int) -> str:
    digits = ""
    while value:
        value, rest = divmod(value, 62)
        digits = BASE62[rest] + digits
    return digits.rjust(width, "0")


def with_checksum(body: str) -> str:
    """A key text whose checksum is right, so only the other rules can refuse it."""
    return f"{body}_{b62encode(zlib.crc32(body.encode('utf-8')), 6)}"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:5] + "g" + b[6:],  # not hex in the lookup id
        lambda b: b[:5] + "A" + b[6:],  # uppercase hex
        lambda b: b[:25] + "-" + b[26:],  # not base62 in the secret
        lambda b: b[:25] + "_" + b[26:],
        lambda b: b[:25] + "\u0661" + b[26:],  # a non-ASCII digit
        lambda b: b[:25] + "é" + b[26:],
        lambda b: b[:20] + "-" + b[21:],  # separator
        lambda b: b[:3] + "-" + b[4:],
        lambda b: " " + b[1:],
    ],
)
def test_bad_characters_are_refused(key: str, mutate: Callable[[str], str]) -> None:
    body = key[:-7]
    assert parse_api_key(with_checksum(body)).secret == key[21:64]  # control
    mutated = with_checksum(mutate(body))
    assert len(mutated) == API_KEY_LENGTH
    assert mutated != key
    with pytest.raises(MalformedApiKey) as info:
        parse_api_key(mutated)
    assert "checksum" not in str(info.value)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda k: k[:-7] + "-" + k[-6:],  # separator before the checksum
        lambda k: k[:-1] + "-",  # not base62 in the checksum
        lambda k: k[:-1] + "\n",
    ],
)
def test_bad_checksum_characters_are_refused(key: str, mutate: Callable[[str], str]) -> None:
    with pytest.raises(MalformedApiKey):
        parse_api_key(mutate(key))


def test_trailing_newline_is_refused(key: str) -> None:
    with pytest.raises(MalformedApiKey):
        parse_api_key(key + "\n")


def test_bad_checksum_is_refused(key: str) -> None:
    # A well-formed key whose secret changed: only the checksum can notice.
    position = 30
    replacement = "0" if key[position] != "0" else "1"
    changed = key[:position] + replacement + key[position + 1 :]
    assert GRAMMAR.fullmatch(changed)
    with pytest.raises(MalformedApiKey, match="checksum"):
        parse_api_key(changed)


def test_error_messages_do_not_echo_the_key(key: str) -> None:
    changed = key[:30] + ("0" if key[30] != "0" else "1") + key[31:]
    with pytest.raises(MalformedApiKey) as info:
        parse_api_key(changed)
    assert changed[21:64] not in str(info.value)


@given(position=st.integers(0, API_KEY_LENGTH - 1), replacement=st.characters())
def test_any_single_character_change_is_detected(position: int, replacement: str) -> None:
    key = generate_api_key().key
    assume(key[position] != replacement)
    changed = key[:position] + replacement + key[position + 1 :]
    with pytest.raises(MalformedApiKey):
        parse_api_key(changed)


@given(
    position=st.integers(0, API_KEY_LENGTH - 1),
    replacement=st.sampled_from(BASE62),
)
def test_any_single_alphanumeric_change_is_detected(position: int, replacement: str) -> None:
    # The harder case: the change keeps the key well-formed, so only the CRC notices.
    key = generate_api_key().key
    assume(key[position] != replacement)
    changed = key[:position] + replacement + key[position + 1 :]
    with pytest.raises(MalformedApiKey):
        parse_api_key(changed)


@given(position=st.integers(0, API_KEY_LENGTH - 1))
def test_any_deletion_is_detected(position: int) -> None:
    key = generate_api_key().key
    with pytest.raises(MalformedApiKey):
        parse_api_key(key[:position] + key[position + 1 :])


@given(text=st.text(max_size=400))
def test_parse_only_ever_raises_malformed(text: str) -> None:
    try:
        parsed = parse_api_key(text)
    except MalformedApiKey:
        return
    assert isinstance(parsed, ParsedApiKey)
    assert GRAMMAR.fullmatch(text)


@given(
    text=st.from_regex(r"npk_[0-9a-f]{16}_[0-9A-Za-z]{43}_[0-9A-Za-z]{6}", fullmatch=True)
    | st.from_regex(r"npk_[\w-]{0,80}", fullmatch=True)
)
def test_parse_near_misses_only_ever_raise_malformed(text: str) -> None:
    with contextlib.suppress(MalformedApiKey):
        parse_api_key(text)


def test_non_string_is_refused() -> None:
    for value in (None, b"npk_", 5):
        with pytest.raises(MalformedApiKey):
            parse_api_key(value)  # type: ignore[arg-type]


def test_looks_like_api_key(key: str) -> None:
    assert looks_like_api_key(key)
    assert looks_like_api_key("npk_whatever")
    assert not looks_like_api_key("eyJhbGciOiJFZERTQSJ9.eyJ9.sig")
    assert not looks_like_api_key("")
    assert not looks_like_api_key("NPK_x")


def test_generated_type() -> None:
    assert isinstance(generate_api_key(), GeneratedApiKey)
