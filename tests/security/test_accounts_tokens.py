"""Access and refresh tokens over real mTLS: every bad token is refused and audited.

Each module server has a data dir of its own, so its JWT signing key is created there and
tests can read it: forged tokens are made with the server's real key (expired, not yet
valid, wrong issuer or audience) or with the public half of it (HS256 key confusion), which
is what an attacker who knows the public key or stole the key directory could try.
Every refusal is UNAUTHENTICATED with a message that says nothing internal, and appears in
the audit log (read through the admin RPC) as "denied" with that code.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from nodepool.auth.tokens import SigningKeys, TokenConfig
from nodepool.server.auth import token_config
from nodepool.v1 import user_manager_pb2 as pb
from tests.fixtures.accounts import (
    BACKENDS,
    USER,
    Account,
    Pool,
    compact_jwt,
    jwt_parts,
    now,
    refused,
    start_pool,
)
from tests.fixtures.server import bearer

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
GET_USER_INFO = USER + "GetUserInfo"
# The pipeline's one answer to any unusable token (nodepool/auth/credentials.py).
INVALID = "invalid or expired credential"
# The refresh reuse interval of this module's servers: short, so a test can outwait it.
REUSE_SECONDS = 1.0


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(
        request,
        tmp_path_factory.mktemp("tokens"),
        request.param,
        refresh_reuse_seconds=REUSE_SECONDS,
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def alice(pool: Pool) -> Account:
    return pool.new_user("alice")


def _who(pool: Pool, token: str) -> pb.User:
    return pool.who_am_i(bearer(token))


def _refused_token(pool: Pool, token: str) -> None:
    """The token is refused on a USER method with the one generic message."""
    error = refused(lambda: _who(pool, token), UNAUTHENTICATED)
    assert error.details() == INVALID


# -- the control ------------------------------------------------------------------------


def test_control_a_real_access_token_works(pool: Pool, alice: Account) -> None:
    """Every forgery below starts from this token or its claims."""
    assert _who(pool, alice.access).username == alice.username
    assert _who(pool, pool.issue_access(alice.username)).username == alice.username


# -- no credential ------------------------------------------------------------------------


def test_missing_token_on_a_user_method(pool: Pool) -> None:
    since = now()
    error = refused(lambda: pool.who_am_i(()), UNAUTHENTICATED)
    [event] = pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=error.details())
    assert event.username == ""


MALFORMED_HEADERS = {
    "basic-scheme": "Basic YWxpY2U6c2VjcmV0",
    "empty-bearer": "Bearer ",
    "garbage": "Bearer not-a-jwt",
}


@pytest.mark.parametrize("value", MALFORMED_HEADERS.values(), ids=list(MALFORMED_HEADERS))
def test_malformed_authorization_header(pool: Pool, value: str) -> None:
    refused(lambda: pool.who_am_i((("authorization", value),)), UNAUTHENTICATED)


# -- forged or unusable tokens ------------------------------------------------------------


def _tamper_payload(pool: Pool, alice: Account) -> str:
    """Alice's token with ``sub`` changed to the administrator, signature kept."""
    header, payload, signature = jwt_parts(alice.access)
    payload["sub"] = pool.admin.username
    forged = compact_jwt(header, payload, None)
    return forged + signature


def _tamper_signature(pool: Pool, alice: Account) -> str:
    head, body, signature = alice.access.split(".")
    # A character in the middle: every one of its 6 bits is part of the signature (the
    # last character of an Ed25519 signature carries 2 padding bits that may not count).
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    return f"{head}.{body}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


def _alg_none(pool: Pool, alice: Account) -> str:
    header, payload, _ = jwt_parts(alice.access)
    header["alg"] = "none"
    return compact_jwt(header, payload, None)


def _public_key(pool: Pool) -> Any:
    keys = pool.signing_keys()
    return keys.public_key(keys.current_kid)


def _hs256_with(secret: bytes, alice: Account) -> str:
    header, payload, _ = jwt_parts(alice.access)
    header["alg"] = "HS256"
    return compact_jwt(
        header, payload, lambda data: hmac.new(secret, data, hashlib.sha256).digest()
    )


def _hs256_public_pem(pool: Pool, alice: Account) -> str:
    pem = _public_key(pool).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _hs256_with(pem, alice)


def _hs256_public_raw(pool: Pool, alice: Account) -> str:
    raw = _public_key(pool).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _hs256_with(raw, alice)


def _other_key_same_kid(pool: Pool, alice: Account) -> str:
    """Signed with a key the server never had, under the server's own kid."""
    header, payload, _ = jwt_parts(alice.access)
    impostor = SigningKeys.in_memory("EdDSA")
    private = impostor._signing_key().private_key
    return compact_jwt(header, payload, private.sign)


def _unknown_kid(pool: Pool, alice: Account) -> str:
    impostor = SigningKeys.in_memory("EdDSA")
    header, payload, _ = jwt_parts(alice.access)
    header["kid"] = impostor.current_kid
    return compact_jwt(header, payload, impostor._signing_key().private_key.sign)


def _expired(pool: Pool, alice: Account) -> str:
    # Issued two hours ago with the real key: lived its 10 minutes long ago.
    return pool.issue_access(alice.username, clock=lambda: time.time() - 7200)


def _not_yet_valid(pool: Pool, alice: Account) -> str:
    # nbf and iat an hour ahead, far beyond the 5 s leeway.
    return pool.issue_access(alice.username, clock=lambda: time.time() + 3600)


def _wrong_issuer(pool: Pool, alice: Account) -> str:
    base = token_config(pool.settings)
    config = TokenConfig(issuer="someone-else", audience=base.audience)
    return pool.issue_access(alice.username, config=config)


def _wrong_audience(pool: Pool, alice: Account) -> str:
    base = token_config(pool.settings)
    config = TokenConfig(issuer=base.issuer, audience="another-service")
    return pool.issue_access(alice.username, config=config)


def _refresh_as_access(pool: Pool, alice: Account) -> str:
    return alice.refresh


def _unknown_user(pool: Pool, alice: Account) -> str:
    # A perfectly signed token for an account that does not exist.
    return pool.issue_access(pool.unique("ghost"))


FORGERIES = {
    "tampered-payload": _tamper_payload,
    "tampered-signature": _tamper_signature,
    "alg-none": _alg_none,
    "hs256-public-key-pem": _hs256_public_pem,
    "hs256-public-key-raw": _hs256_public_raw,
    "other-key-same-kid": _other_key_same_kid,
    "unknown-kid": _unknown_kid,
    "expired": _expired,
    "not-yet-valid": _not_yet_valid,
    "wrong-issuer": _wrong_issuer,
    "wrong-audience": _wrong_audience,
    "refresh-token-as-access-token": _refresh_as_access,
    "unknown-user": _unknown_user,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_unusable_token_is_refused(pool: Pool, alice: Account, forgery: str) -> None:
    _refused_token(pool, FORGERIES[forgery](pool, alice))
    # The genuine token is untouched by the attempt.
    assert _who(pool, alice.access).username == alice.username


def test_every_refused_token_is_audited(pool: Pool, alice: Account) -> None:
    """One audit entry per refusal, "denied" with the code and the public reason.

    Sent together and checked with one read: the log is flushed every 0.5 s, and one
    wait per forgery would dominate the module's run time.
    """
    since = now()
    for forgery in FORGERIES.values():
        _refused_token(pool, forgery(pool, alice))
    pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=INVALID, count=len(FORGERIES))
    since = now()
    for value in MALFORMED_HEADERS.values():
        refused(lambda v=value: pool.who_am_i((("authorization", v),)), UNAUTHENTICATED)
    pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, count=len(MALFORMED_HEADERS))


def test_an_access_token_is_not_a_refresh_token(pool: Pool, alice: Account) -> None:
    since = now()
    error = refused(
        lambda: pool.users().RefreshToken(
            pb.RefreshTokenRequest(refresh_token=alice.access), timeout=10
        ),
        UNAUTHENTICATED,
    )
    assert error.details() == INVALID
    pool.expect_audit(USER + "RefreshToken", UNAUTHENTICATED, since)


# -- refresh rotation and reuse detection -------------------------------------------------


def _refresh(pool: Pool, token: str) -> pb.LoginUserResponse:
    return pool.users().RefreshToken(pb.RefreshTokenRequest(refresh_token=token), timeout=10)


def test_refresh_rotates_and_a_reused_refresh_token_ends_the_family(pool: Pool) -> None:
    bob = pool.new_user("bob")
    bystander = pool.login(Account(bob.username))  # another session of the same user

    rotated = _refresh(pool, bob.refresh)
    assert rotated.access_token
    assert rotated.refresh_token != bob.refresh
    assert _who(pool, rotated.access_token).username == bob.username

    # The old refresh token presented again, after the reuse interval: someone copied it.
    time.sleep(REUSE_SECONDS + 0.3)
    since = now()
    error = refused(lambda: _refresh(pool, bob.refresh), UNAUTHENTICATED)
    assert error.details() == INVALID

    # The whole family is dead: the new refresh token and every access token of it.
    refused(lambda: _refresh(pool, rotated.refresh_token), UNAUTHENTICATED)
    pool.expect_audit(USER + "RefreshToken", UNAUTHENTICATED, since, count=2)
    since = now()
    _refused_token(pool, rotated.access_token)
    _refused_token(pool, bob.access)
    pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=INVALID, count=2)

    # Only that session: the same user's other login goes on.
    assert _who(pool, bystander.access).username == bob.username
    assert _refresh(pool, bystander.refresh).access_token


# -- logout ----------------------------------------------------------------------------------


def test_logout_ends_the_session(pool: Pool) -> None:
    carol = pool.new_user("carol")
    other = pool.login(Account(carol.username))
    response = pool.users().LogoutUser(pb.LogoutUserRequest(), metadata=carol.auth, timeout=10)
    assert response.success

    since = now()
    _refused_token(pool, carol.access)
    refused(lambda: _refresh(pool, carol.refresh), UNAUTHENTICATED)
    # Logging out twice with the dead token is just another refused credential.
    refused(
        lambda: pool.users().LogoutUser(pb.LogoutUserRequest(), metadata=carol.auth, timeout=10),
        UNAUTHENTICATED,
    )
    assert _who(pool, other.access).username == carol.username
    pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=INVALID)
    pool.expect_audit(USER + "RefreshToken", UNAUTHENTICATED, since)
    pool.expect_audit(USER + "LogoutUser", UNAUTHENTICATED, since, reason=INVALID)
