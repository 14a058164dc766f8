"""JWT keys, issuing and verification: every rejection rule has a test that fails without it."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Callable
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

import nodepool.auth.tokens as tokens_module
from nodepool.auth.tokens import (
    MAX_TOKEN_LENGTH,
    AccessClaims,
    InvalidToken,
    RefreshClaims,
    SigningKeyError,
    SigningKeys,
    TokenConfig,
    TokenIssuer,
    TokenVerifier,
)
from nodepool.errors import UnauthenticatedError

DEVICE = "spiffe://nodepool.test/client/alice-laptop"
T0 = 1_700_000_000.0
CONFIG = TokenConfig(issuer="nodepool-test", audience="nodepool-api", leeway=5.0)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(obj: object) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def unb64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": CONFIG.issuer,
        "aud": CONFIG.audience,
        "sub": "alice",
        "sid": "session-1",
        "jti": "jti-1",
        "iat": int(T0),
        "nbf": int(T0),
        "exp": int(T0) + 600,
        "cnf": {"spiffe_id": DEVICE},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def private_key_of(directory: Path, kid: str) -> Any:
    return serialization.load_pem_private_key((directory / f"{kid}.pem").read_bytes(), None)


def sign(
    directory: Path,
    kid: str,
    payload: dict[str, Any],
    *,
    typ: str = "at+jwt",
    algorithm: str | None = None,
    extra_headers: dict[str, Any] | None = None,
) -> str:
    """Signs an arbitrary payload with one of our real keys (PyJWS: no claim checks)."""
    key = private_key_of(directory, kid)
    alg = algorithm or ("EdDSA" if isinstance(key, Ed25519PrivateKey) else "ES256")
    headers = {"kid": kid, "typ": typ, **(extra_headers or {})}
    return jwt.PyJWS().encode(json.dumps(payload).encode(), key, algorithm=alg, headers=headers)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "jwt-keys"


@pytest.fixture(params=["EdDSA", "ES256"])
def algorithm(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def keys(key_dir: Path, algorithm: str) -> SigningKeys:
    return SigningKeys.load_or_create(key_dir, algorithm)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer(keys: SigningKeys, clock: FakeClock) -> TokenIssuer:
    return TokenIssuer(keys, CONFIG, clock=clock)


@pytest.fixture
def verifier(keys: SigningKeys, clock: FakeClock) -> TokenVerifier:
    return TokenVerifier(keys, CONFIG, clock=clock)


def assert_invalid(call: Callable[[], object]) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        call()
    # Generic message, no token content.
    assert str(info.value) == "invalid or expired token"
    assert info.value.public_message == "invalid or expired token"
    return info.value


# --------------------------------------------------------------------------- round trips


def test_access_token_round_trip(
    issuer: TokenIssuer, verifier: TokenVerifier, keys: SigningKeys, algorithm: str
) -> None:
    issued = issuer.issue_access("alice", "session-1", device=DEVICE)
    assert issued.expires_at.tzinfo is UTC
    assert issued.expires_at.timestamp() == int(T0) + 600
    result = verifier.verify_access(issued.token)
    assert result == AccessClaims("alice", "session-1", issued.jti, float(int(T0) + 600), DEVICE)
    header = jwt.get_unverified_header(issued.token)
    assert header == {"alg": algorithm, "kid": keys.current_kid, "typ": "at+jwt"}
    payload = unb64json(issued.token.split(".")[1])
    assert set(payload) == {"iss", "aud", "sub", "sid", "jti", "iat", "nbf", "exp", "cnf"}
    assert payload["iss"] == CONFIG.issuer
    assert payload["aud"] == CONFIG.audience


def test_refresh_token_round_trip(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    issued = issuer.issue_refresh("alice", "session-1", device=DEVICE)
    assert issued.expires_at.timestamp() == int(T0) + 30 * 86400
    result = verifier.verify_refresh(issued.token)
    assert result == RefreshClaims(
        "alice", "session-1", issued.jti, float(int(T0) + 30 * 86400), DEVICE
    )
    assert jwt.get_unverified_header(issued.token)["typ"] == "rt+jwt"


def test_each_token_gets_a_fresh_jti(issuer: TokenIssuer) -> None:
    jtis = {issuer.issue_access("alice", "s", device=DEVICE).jti for _ in range(50)}
    assert len(jtis) == 50


def test_invalid_token_is_unauthenticated() -> None:
    assert issubclass(InvalidToken, UnauthenticatedError)


def test_issuer_refuses_empty_subject(issuer: TokenIssuer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        issuer.issue_access("", "s", device=DEVICE)
    with pytest.raises(ValueError, match="non-empty"):
        issuer.issue_access("alice", "", device=DEVICE)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        TokenConfig(issuer="", audience="a")
    with pytest.raises(ValueError, match="positive"):
        TokenConfig(issuer="i", audience="a", access_ttl=timedelta(0))
    with pytest.raises(ValueError, match="negative"):
        TokenConfig(issuer="i", audience="a", leeway=-1)
    assert TokenConfig(issuer="i", audience="a").access_ttl == timedelta(minutes=10)
    assert TokenConfig(issuer="i", audience="a").refresh_ttl == timedelta(days=30)


# --------------------------------------------------------------------------- rejections


def test_type_confusion_is_rejected(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    access = issuer.issue_access("alice", "s", device=DEVICE).token
    refresh = issuer.issue_refresh("alice", "s", device=DEVICE).token
    assert_invalid(lambda: verifier.verify_refresh(access))
    assert_invalid(lambda: verifier.verify_access(refresh))


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "AT+JWT", "at+jwt ", ""])
def test_other_typ_headers_are_rejected(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier, typ: str | None
) -> None:
    good = sign(key_dir, keys.current_kid, claims())
    assert verifier.verify_access(good).username == "alice"
    token = sign(key_dir, keys.current_kid, claims(), typ=typ)  # type: ignore[arg-type]
    assert_invalid(lambda: verifier.verify_access(token))


def test_tampered_signature_is_rejected(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.issue_access("alice", "s", device=DEVICE).token
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[0] ^= 0x01
    assert_invalid(lambda: verifier.verify_access(f"{head}.{body}.{b64(bytes(raw))}"))
    assert_invalid(lambda: verifier.verify_access(f"{head}.{body}."))


def test_tampered_payload_is_rejected(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    token = issuer.issue_access("alice", "s", device=DEVICE).token
    head, body, sig = token.split(".")
    payload = unb64json(body)
    payload["sub"] = "admin"
    assert_invalid(lambda: verifier.verify_access(f"{head}.{b64json(payload)}.{sig}"))


def test_tampered_header_is_rejected(
    issuer: TokenIssuer, verifier: TokenVerifier, keys: SigningKeys
) -> None:
    # Turning a refresh token into an access token by rewriting typ breaks the signature.
    token = issuer.issue_refresh("alice", "s", device=DEVICE).token
    _, body, sig = token.split(".")
    header = {"alg": keys.current_algorithm, "kid": keys.current_kid, "typ": "at+jwt"}
    assert_invalid(lambda: verifier.verify_access(f"{b64json(header)}.{body}.{sig}"))


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_is_rejected(keys: SigningKeys, verifier: TokenVerifier, alg: str) -> None:
    header = {"alg": alg, "kid": keys.current_kid, "typ": "at+jwt"}
    token = f"{b64json(header)}.{b64json(claims())}."
    assert_invalid(lambda: verifier.verify_access(token))


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_with_public_key_as_secret_is_rejected(
    keys: SigningKeys, verifier: TokenVerifier, alg: str
) -> None:
    public_pem = keys.public_key(keys.current_kid).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": alg, "kid": keys.current_kid, "typ": "at+jwt"}
    signing_input = f"{b64json(header)}.{b64json(claims())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    for secret in (public_pem, public_pem.strip()):
        mac = hmac.new(secret, signing_input.encode(), digest).digest()
        token = f"{signing_input}.{b64(mac)}"
        assert_invalid(lambda token=token: verifier.verify_access(token))


def test_algorithm_is_pinned_to_the_key(tmp_path: Path) -> None:
    # A P-256 key and an Ed25519 key coexist; a token signed with the P-256 key but naming
    # the Ed25519 kid (or claiming the other alg) must not verify.
    directory = tmp_path / "keys"
    ed = SigningKeys.load_or_create(directory, "EdDSA")
    es_kid = SigningKeys.rotate(directory, "ES256")
    keys = SigningKeys.load(directory)
    verifier = TokenVerifier(keys, CONFIG, clock=FakeClock())
    es_key = private_key_of(directory, es_kid)
    forged = jwt.PyJWS().encode(
        json.dumps(claims()).encode(),
        es_key,
        algorithm="ES256",
        headers={"kid": ed.current_kid, "typ": "at+jwt"},
    )
    assert_invalid(lambda: verifier.verify_access(forged))
    # Header claims ES384 (and EdDSA), signature made with the P-256 key: alg must match.
    for claimed in ("ES384", "ES512", "EdDSA"):
        header = {"alg": claimed, "kid": es_kid, "typ": "at+jwt"}
        signing_input = f"{b64json(header)}.{b64json(claims())}".encode()
        sig = jwt.get_algorithm_by_name("ES256").sign(signing_input, es_key)
        wrong_alg = f"{signing_input.decode()}.{b64(sig)}"
        assert_invalid(lambda wrong_alg=wrong_alg: verifier.verify_access(wrong_alg))
    # Control: properly signed with either key verifies.
    assert verifier.verify_access(sign(directory, es_kid, claims())).username == "alice"
    assert verifier.verify_access(sign(directory, ed.current_kid, claims())).username == "alice"


def test_expired_token_is_rejected(
    issuer: TokenIssuer, verifier: TokenVerifier, clock: FakeClock
) -> None:
    token = issuer.issue_access("alice", "s", device=DEVICE).token
    exp = int(T0) + 600
    clock.now = exp + CONFIG.leeway - 0.001
    verifier.verify_access(token)  # inside leeway (cold path)
    verifier.clear_cache()
    clock.now = exp + CONFIG.leeway
    error = assert_invalid(lambda: verifier.verify_access(token))
    assert error.reason == "expired"
    refresh = issuer.issue_refresh("alice", "s", device=DEVICE).token
    clock.now += 31 * 86400
    assert_invalid(lambda: verifier.verify_refresh(refresh))


def test_not_yet_valid_token_is_rejected(keys: SigningKeys, clock: FakeClock) -> None:
    future_issuer = TokenIssuer(keys, CONFIG, clock=FakeClock(T0 + 60))
    verifier = TokenVerifier(keys, CONFIG, clock=clock)
    token = future_issuer.issue_access("alice", "s", device=DEVICE).token
    error = assert_invalid(lambda: verifier.verify_access(token))
    assert error.reason == "not-yet-valid"
    clock.now = T0 + 60 - CONFIG.leeway
    assert verifier.verify_access(token).username == "alice"


def test_future_iat_is_rejected(key_dir: Path, keys: SigningKeys, verifier: TokenVerifier) -> None:
    token = sign(key_dir, keys.current_kid, claims(iat=int(T0) + 3600))
    assert_invalid(lambda: verifier.verify_access(token))


def test_future_nbf_is_rejected(key_dir: Path, keys: SigningKeys, verifier: TokenVerifier) -> None:
    token = sign(key_dir, keys.current_kid, claims(nbf=int(T0) + 3600))
    assert_invalid(lambda: verifier.verify_access(token))


def test_wrong_issuer_is_rejected(keys: SigningKeys, clock: FakeClock) -> None:
    other = TokenIssuer(keys, TokenConfig(issuer="evil", audience=CONFIG.audience), clock=clock)
    verifier = TokenVerifier(keys, CONFIG, clock=clock)
    assert_invalid(
        lambda: verifier.verify_access(other.issue_access("alice", "s", device=DEVICE).token)
    )


def test_wrong_audience_is_rejected(
    key_dir: Path, keys: SigningKeys, clock: FakeClock, verifier: TokenVerifier
) -> None:
    other = TokenIssuer(keys, TokenConfig(issuer=CONFIG.issuer, audience="other"), clock=clock)
    assert_invalid(
        lambda: verifier.verify_access(other.issue_access("alice", "s", device=DEVICE).token)
    )
    # A list that contains our audience is not our single-audience token either.
    listed = sign(key_dir, keys.current_kid, claims(aud=[CONFIG.audience, "other"]))
    assert_invalid(lambda: verifier.verify_access(listed))


def test_unknown_kid_is_rejected(tmp_path: Path, clock: FakeClock) -> None:
    ours = SigningKeys.load_or_create(tmp_path / "ours")
    theirs = SigningKeys.load_or_create(tmp_path / "theirs")
    token = TokenIssuer(theirs, CONFIG, clock=clock).issue_access("alice", "s", device=DEVICE).token
    verifier = TokenVerifier(ours, CONFIG, clock=clock)
    error = assert_invalid(lambda: verifier.verify_access(token))
    assert error.reason == "unknown-key"
    # Their key signing under our kid is a bad signature.
    theirs_key = private_key_of(tmp_path / "theirs", theirs.current_kid)
    forged = jwt.PyJWS().encode(
        json.dumps(claims()).encode(),
        theirs_key,
        algorithm="EdDSA",
        headers={"kid": ours.current_kid, "typ": "at+jwt"},
    )
    assert_invalid(lambda: verifier.verify_access(forged))


@pytest.mark.parametrize("kid", [None, 1, ["x"], {"a": 1}, ""])
def test_missing_or_non_string_kid_is_rejected(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier, kid: object
) -> None:
    key = private_key_of(key_dir, keys.current_kid)
    header_kid = {} if kid is None else {"kid": kid}
    # Built by hand: PyJWS refuses to encode a non-string kid.
    header = {"alg": keys.current_algorithm, "typ": "at+jwt", **header_kid}
    signing_input = f"{b64json(header)}.{b64json(claims())}".encode()
    algorithm = jwt.get_algorithm_by_name(keys.current_algorithm)
    token = f"{signing_input.decode()}.{b64(algorithm.sign(signing_input, key))}"
    assert_invalid(lambda: verifier.verify_access(token))


@pytest.mark.parametrize("missing", ["iss", "aud", "sub", "sid", "jti", "iat", "nbf", "exp"])
def test_every_required_claim_is_required(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier, missing: str
) -> None:
    assert verifier.verify_access(sign(key_dir, keys.current_kid, claims())).jti == "jti-1"
    token = sign(key_dir, keys.current_kid, claims(**{missing: ...}))
    assert_invalid(lambda: verifier.verify_access(token))


@pytest.mark.parametrize(
    "cnf",
    [{}, {"x5t#S256": "abc"}, {"spiffe_id": ""}, {"spiffe_id": 5}, "spiffe://x", None],
)
def test_a_token_without_a_device_binding_is_refused(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier, cnf: Any
) -> None:
    token = sign(key_dir, keys.current_kid, claims(cnf=cnf))
    assert assert_invalid(lambda: verifier.verify_access(token)).reason in {"unbound", "malformed"}


def test_tokens_carry_the_device_they_were_issued_through(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    access = issuer.issue_access("alice", "s", device=DEVICE).token
    refresh = issuer.issue_refresh("alice", "s", device=DEVICE).token
    assert unb64json(access.split(".")[1])["cnf"] == {"spiffe_id": DEVICE}
    assert verifier.verify_access(access).device == DEVICE
    assert verifier.verify_refresh(refresh).device == DEVICE
    with pytest.raises(ValueError, match="device"):
        issuer.issue_access("alice", "s", device="")


@pytest.mark.parametrize(
    "overrides",
    [
        {"sub": 5},
        {"sub": ""},
        {"sid": None},
        {"jti": ["x"]},
        {"exp": True},
        {"iat": True},
        {"nbf": False},
        {"exp": float("nan")},
        {"exp": float("inf")},
        {"nbf": float("-inf")},
        {"exp": 10**400},
        {"iat": -(10**400)},
        {"exp": "9999999999"},
        {"nbf": None},
        {"iat": "0"},
    ],
)
def test_badly_typed_claims_are_rejected(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier, overrides: dict[str, Any]
) -> None:
    token = sign(key_dir, keys.current_kid, claims(**overrides))
    assert_invalid(lambda: verifier.verify_access(token))


def test_payload_that_is_not_an_object_is_rejected(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier
) -> None:
    key = private_key_of(key_dir, keys.current_kid)
    for body in (b"[1,2]", b'"x"', b"not json", b"\xff\xfe"):
        token = jwt.PyJWS().encode(
            body,
            key,
            algorithm=keys.current_algorithm,
            headers={"kid": keys.current_kid, "typ": "at+jwt"},
        )
        assert_invalid(lambda token=token: verifier.verify_access(token))


def test_unknown_critical_header_is_rejected(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier
) -> None:
    token = sign(key_dir, keys.current_kid, claims(), extra_headers={"crit": ["exp-magic"]})
    assert_invalid(lambda: verifier.verify_access(token))


def test_oversized_token_is_rejected_before_parsing(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validly signed, so only the size rule can refuse it.
    token = sign(key_dir, keys.current_kid, claims(pad="x" * 6000))
    assert len(token) > MAX_TOKEN_LENGTH
    small = sign(key_dir, keys.current_kid, claims(pad="x" * 100))
    assert verifier.verify_access(small).username == "alice"

    def no_parsing(*args: object, **kwargs: object) -> object:
        raise AssertionError("parsed an oversized token")

    monkeypatch.setattr(tokens_module, "_peek_header", no_parsing)
    monkeypatch.setattr(verifier._jws, "decode_complete", no_parsing)
    error = assert_invalid(lambda: verifier.verify_access(token))
    assert error.reason == "oversized"
    assert_invalid(lambda: verifier.verify_refresh(token))


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        ".",
        "..",
        "a.b.c",
        "eyJ",
        "Bearer x",
        "x" * 100,
        "é.é.é",
        "\ud800.a.b",
        "eyJhbGciOiJFZERTQSJ9",
        f"{b64json([1])}.{b64json({})}.",
        f"{b64(b'not json')}.{b64json({})}.",
    ],
)
def test_garbage_is_rejected(verifier: TokenVerifier, garbage: str) -> None:
    assert_invalid(lambda: verifier.verify_access(garbage))
    assert_invalid(lambda: verifier.verify_refresh(garbage))


def test_non_string_is_rejected(verifier: TokenVerifier) -> None:
    for value in (None, b"abc", 5, ["x"]):
        assert_invalid(lambda value=value: verifier.verify_access(value))  # type: ignore[arg-type]
        assert_invalid(lambda value=value: verifier.verify_refresh(value))  # type: ignore[arg-type]


@given(text=st.text(max_size=300))
def test_arbitrary_text_only_ever_raises_invalid_token(text: str) -> None:
    keys = shared_keys()
    verifier = TokenVerifier(keys, CONFIG, clock=FakeClock())
    for verify in (verifier.verify_access, verifier.verify_refresh):
        with pytest.raises(InvalidToken):
            verify(text)


_HEADER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(["EdDSA", "ES256", "none", "HS256", "at+jwt", "rt+jwt", "b64"]),
    st.text(max_size=10),
    st.lists(st.text(max_size=5), max_size=3),
)


@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64"]), _HEADER_VALUES),
    body=st.binary(max_size=100),
    real_kid=st.booleans(),
)
def test_arbitrary_structured_tokens_only_raise_invalid_token(
    header: dict[str, Any], body: bytes, real_kid: bool
) -> None:
    keys = shared_keys()
    if real_kid:
        header = {**header, "kid": keys.current_kid}
    token = f"{b64(json.dumps(header).encode())}.{b64(body)}.{b64(body[:64])}"
    verifier = TokenVerifier(keys, CONFIG, clock=FakeClock())
    with pytest.raises(InvalidToken):
        verifier.verify_access(token)


@functools.cache
def shared_keys() -> SigningKeys:
    return SigningKeys.in_memory()


# --------------------------------------------------------------------------- cache


@pytest.fixture
def decode_calls(verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = verifier._jws.decode_complete

    def counting(token: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(verifier._jws, "decode_complete", counting)
    return calls


def test_cache_hit_returns_the_same_claims_without_reverifying(
    issuer: TokenIssuer, verifier: TokenVerifier, decode_calls: list[str]
) -> None:
    token = issuer.issue_access("alice", "s", device=DEVICE).token
    first = verifier.verify_access(token)
    second = verifier.verify_access(token)
    assert second is first
    assert len(decode_calls) == 1
    assert verifier.cache_len() == 1


def test_cached_token_still_expires(
    issuer: TokenIssuer, verifier: TokenVerifier, clock: FakeClock, decode_calls: list[str]
) -> None:
    token = issuer.issue_access("alice", "s", device=DEVICE).token
    verifier.verify_access(token)
    clock.now = T0 + 600 + CONFIG.leeway - 1
    verifier.verify_access(token)
    assert len(decode_calls) == 1  # served from the cache
    clock.now = T0 + 600 + CONFIG.leeway
    error = assert_invalid(lambda: verifier.verify_access(token))
    assert error.reason == "expired"
    assert verifier.cache_len() == 0  # evicted
    assert_invalid(lambda: verifier.verify_access(token))


def test_cache_is_bounded_and_evicts_the_oldest(
    keys: SigningKeys, issuer: TokenIssuer, clock: FakeClock
) -> None:
    verifier = TokenVerifier(keys, CONFIG, clock=clock, cache_size=3)
    tokens = [issuer.issue_access("alice", f"s{i}", device=DEVICE).token for i in range(5)]
    for token in tokens:
        verifier.verify_access(token)
    assert verifier.cache_len() == 3
    assert list(verifier._cache) == tokens[2:]
    # Evicted tokens still verify (cold), they are just not cached any more.
    assert verifier.verify_access(tokens[0]).session_id == "s0"
    assert verifier.cache_len() == 3


def test_cache_can_be_disabled(keys: SigningKeys, issuer: TokenIssuer, clock: FakeClock) -> None:
    verifier = TokenVerifier(keys, CONFIG, clock=clock, cache_size=0)
    token = issuer.issue_access("alice", "s", device=DEVICE).token
    assert verifier.verify_access(token) == verifier.verify_access(token)
    assert verifier.cache_len() == 0
    with pytest.raises(ValueError, match="cache_size"):
        TokenVerifier(keys, CONFIG, cache_size=-1)


def test_failures_are_not_cached(
    issuer: TokenIssuer, verifier: TokenVerifier, keys: SigningKeys
) -> None:
    for i in range(500):
        assert_invalid(lambda i=i: verifier.verify_access(f"garbage-{i}"))
    refresh = issuer.issue_refresh("alice", "s", device=DEVICE).token
    assert_invalid(lambda: verifier.verify_access(refresh))
    verifier.verify_refresh(refresh)  # refresh tokens are not cached either
    assert verifier.cache_len() == 0


def test_refresh_verification_does_not_use_the_access_cache(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    access = issuer.issue_access("alice", "s", device=DEVICE).token
    verifier.verify_access(access)
    assert_invalid(lambda: verifier.verify_refresh(access))


# --------------------------------------------------------------------------- keys on disk


def test_first_key_is_created_private(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "jwt-keys"
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        keys = SigningKeys.load_or_create(directory)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    key_file = directory / f"{keys.current_kid}.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (directory / "current").read_text().strip() == keys.current_kid
    assert len(keys.current_kid) == 16
    int(keys.current_kid, 16)
    assert keys.current_algorithm == "EdDSA"
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


def test_load_or_create_reuses_existing_keys(key_dir: Path) -> None:
    first = SigningKeys.load_or_create(key_dir)
    second = SigningKeys.load_or_create(key_dir)
    assert second.current_kid == first.current_kid
    assert second.kids == first.kids


def test_es256_keys(key_dir: Path) -> None:
    keys = SigningKeys.load_or_create(key_dir, "ES256")
    assert keys.current_algorithm == "ES256"
    assert isinstance(private_key_of(key_dir, keys.current_kid), ec.EllipticCurvePrivateKey)


def test_unsupported_algorithm_is_refused(key_dir: Path) -> None:
    for alg in ("HS256", "RS256", "none", "ES384"):
        with pytest.raises(ValueError, match="unsupported"):
            SigningKeys.load_or_create(key_dir, alg)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606])
def test_key_files_readable_by_others_are_refused(key_dir: Path, mode: int) -> None:
    keys = SigningKeys.load_or_create(key_dir)
    key_file = key_dir / f"{keys.current_kid}.pem"
    key_file.chmod(mode)
    with pytest.raises(SigningKeyError, match="0600"):
        SigningKeys.load_or_create(key_dir)
    key_file.chmod(0o600)
    assert SigningKeys.load_or_create(key_dir).current_kid == keys.current_kid


def test_symlinked_key_file_is_refused(key_dir: Path, tmp_path: Path) -> None:
    keys = SigningKeys.load_or_create(key_dir)
    key_file = key_dir / f"{keys.current_kid}.pem"
    elsewhere = tmp_path / "elsewhere.pem"
    key_file.rename(elsewhere)
    key_file.symlink_to(elsewhere)
    with pytest.raises(SigningKeyError):
        SigningKeys.load(key_dir)


def test_missing_or_dangling_current_is_refused(key_dir: Path) -> None:
    keys = SigningKeys.load_or_create(key_dir)
    (key_dir / "current").unlink()
    with pytest.raises(SigningKeyError, match="current"):
        SigningKeys.load_or_create(key_dir)
    (key_dir / "current").write_text("0123456789abcdef\n")
    with pytest.raises(SigningKeyError, match="no key file"):
        SigningKeys.load(key_dir)
    (key_dir / "current").write_text(keys.current_kid)
    assert SigningKeys.load(key_dir).current_kid == keys.current_kid


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
)
def test_foreign_key_types_are_refused(key_dir: Path, make_key: Callable[[], Any]) -> None:
    SigningKeys.load_or_create(key_dir)
    pem = make_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = key_dir / "feedfacefeedface.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match="neither"):
        SigningKeys.load(key_dir)


def test_unparsable_key_file_is_refused(key_dir: Path) -> None:
    SigningKeys.load_or_create(key_dir)
    path = key_dir / "feedfacefeedface.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match="PEM"):
        SigningKeys.load(key_dir)


def test_rotation_keeps_old_tokens_valid(key_dir: Path) -> None:
    clock = FakeClock()
    before = SigningKeys.load_or_create(key_dir)
    old_token = (
        TokenIssuer(before, CONFIG, clock=clock).issue_access("alice", "s", device=DEVICE).token
    )
    old_refresh = (
        TokenIssuer(before, CONFIG, clock=clock).issue_refresh("alice", "s", device=DEVICE).token
    )

    new_kid = SigningKeys.rotate(key_dir)
    assert new_kid != before.current_kid
    after = SigningKeys.load_or_create(key_dir)
    assert after.current_kid == new_kid
    assert after.kids == {before.current_kid, new_kid}

    verifier = TokenVerifier(after, CONFIG, clock=clock)
    assert verifier.verify_access(old_token).username == "alice"
    assert verifier.verify_refresh(old_refresh).username == "alice"
    new_token = (
        TokenIssuer(after, CONFIG, clock=clock).issue_access("bob", "s2", device=DEVICE).token
    )
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert verifier.verify_access(new_token).username == "bob"
    # The process that loaded before the rotation does not know the new key yet.
    assert_invalid(lambda: TokenVerifier(before, CONFIG, clock=clock).verify_access(new_token))


def test_algorithm_change_rotates_and_both_kinds_coexist(key_dir: Path) -> None:
    clock = FakeClock()
    ed = SigningKeys.load_or_create(key_dir, "EdDSA")
    ed_token = TokenIssuer(ed, CONFIG, clock=clock).issue_access("alice", "s", device=DEVICE).token
    es = SigningKeys.load_or_create(key_dir, "ES256")
    assert es.current_algorithm == "ES256"
    assert es.current_kid != ed.current_kid
    assert es.algorithm_of(ed.current_kid) == "EdDSA"
    es_token = TokenIssuer(es, CONFIG, clock=clock).issue_access("bob", "s", device=DEVICE).token
    assert jwt.get_unverified_header(es_token)["alg"] == "ES256"
    verifier = TokenVerifier(es, CONFIG, clock=clock)
    assert verifier.verify_access(ed_token).username == "alice"
    assert verifier.verify_access(es_token).username == "bob"


def test_prune_keeps_current_and_newest(key_dir: Path) -> None:
    first = SigningKeys.load_or_create(key_dir).current_kid
    kids = [first]
    for i in range(3):
        kid = SigningKeys.rotate(key_dir)
        # Distinct mtimes without sleeping.
        os.utime(key_dir / f"{kid}.pem", (T0 + i + 1, T0 + i + 1))
        kids.append(kid)
    os.utime(key_dir / f"{first}.pem", (T0, T0))
    removed = SigningKeys.prune(key_dir, keep=2)
    assert sorted(removed) == sorted(kids[:2])
    assert SigningKeys.load(key_dir).kids == set(kids[2:])
    assert SigningKeys.prune(key_dir, keep=1) == [kids[2]]
    assert SigningKeys.load(key_dir).kids == {kids[3]}
    with pytest.raises(ValueError, match="keep"):
        SigningKeys.prune(key_dir, keep=0)


def test_in_memory_keys(clock: FakeClock) -> None:
    for alg in ("EdDSA", "ES256"):
        keys = SigningKeys.in_memory(alg)
        token = (
            TokenIssuer(keys, CONFIG, clock=clock).issue_access("alice", "s", device=DEVICE).token
        )
        assert TokenVerifier(keys, CONFIG, clock=clock).verify_access(token).username == "alice"


def test_unwritable_key_directory_is_a_signing_key_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(SigningKeyError, match="cannot write"):
        SigningKeys.load_or_create(blocker / "jwt-keys")


def test_a_lifetime_longer_than_we_issue_is_rejected(
    key_dir: Path, keys: SigningKeys, verifier: TokenVerifier
) -> None:
    # Signed with our key but living a year: only a leaked key makes such a token.
    token = sign(key_dir, keys.current_kid, claims(exp=int(T0) + 365 * 86400))
    assert assert_invalid(lambda: verifier.verify_access(token)).reason == "lifetime"
    refresh = sign(key_dir, keys.current_kid, claims(exp=int(T0) + 400 * 86400), typ="rt+jwt")
    assert assert_invalid(lambda: verifier.verify_refresh(refresh)).reason == "lifetime"


def test_removing_a_key_drops_the_tokens_it_verified_from_the_cache(
    key_dir: Path, algorithm: str, clock: FakeClock
) -> None:
    old = SigningKeys.load_or_create(key_dir, algorithm)
    verifier = TokenVerifier(old, CONFIG, clock=clock)
    token = TokenIssuer(old, CONFIG, clock=clock).issue_access("alice", "s1", device=DEVICE).token
    verifier.verify_access(token)
    new_kid = SigningKeys.rotate(key_dir, algorithm)
    verifier.use_keys(SigningKeys.load(key_dir))
    assert verifier.verify_access(token).username == "alice"  # a rotation keeps old keys
    (key_dir / f"{old.current_kid}.pem").unlink()
    verifier.use_keys(SigningKeys.load(key_dir))
    assert new_kid in SigningKeys.load(key_dir).kids
    assert_invalid(lambda: verifier.verify_access(token))
