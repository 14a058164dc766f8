"""API keys over real mTLS: they work, and stop working when revoked, expired, malformed,
forged, out of scope or someone else's.

The RPC will not make an expired key (the shortest lifetime is one day), so the test
plants one through the store on the server's own database, the way a key created long
ago would look: only the lookup id and the secret's hash are stored.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from nodepool.auth.apikeys import generate_api_key
from nodepool.v1 import audit_pb2
from nodepool.v1 import user_manager_pb2 as pb
from tests.fixtures.accounts import (
    AUDIT,
    BACKENDS,
    USER,
    Account,
    Pool,
    api_key_metadata,
    now,
    refused,
    start_pool,
    with_checksum,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
GET_USER_INFO = USER + "GetUserInfo"
INVALID = "invalid or expired credential"
# Revocation must reach the credential cache within this (it is announced, not polled).
REVOCATION_DEADLINE = 2.0


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(request, tmp_path_factory.mktemp("apikeys"), request.param) as pool:
        yield pool


@pytest.fixture(scope="module")
def alice(pool: Pool) -> Account:
    return pool.new_user("alice")


@pytest.fixture(scope="module")
def bob(pool: Pool) -> Account:
    return pool.new_user("bob")


def _create(
    pool: Pool, owner: Account, scopes: tuple[str, ...] = (), name: str = "ci"
) -> pb.CreateApiKeyResponse:
    return pool.users().CreateApiKey(
        pb.CreateApiKeyRequest(name=name, scopes=list(scopes)), metadata=owner.auth, timeout=10
    )


def _refused_key(pool: Pool, key: str) -> None:
    error = refused(lambda: pool.who_am_i(api_key_metadata(key)), UNAUTHENTICATED)
    assert error.details() == INVALID


def test_a_key_works_in_either_header_and_its_secret_is_never_listed(
    pool: Pool, alice: Account
) -> None:
    created = _create(pool, alice)
    key = created.secret
    assert key.startswith("npk_")
    assert created.api_key.key_id in key
    assert list(created.api_key.scopes) == ["user"]
    assert pool.who_am_i(api_key_metadata(key)).username == alice.username
    # The design also allows the key as the bearer value.
    assert pool.who_am_i((("authorization", f"Bearer {key}"),)).username == alice.username

    listed = pool.users().ListApiKeys(pb.ListApiKeysRequest(), metadata=alice.auth, timeout=10)
    assert created.api_key.key_id in {k.key_id for k in listed.api_keys}
    assert key not in str(listed)
    # The secret is not in the audit log either.
    events = pool.audit().ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(page_size=500), metadata=pool.admin.auth, timeout=10
    )
    assert key not in str(events)


def test_a_revoked_key_is_refused_within_seconds(pool: Pool, alice: Account) -> None:
    created = _create(pool, alice)
    key = created.secret
    # Used first, so the server holds it in its credential cache.
    assert pool.who_am_i(api_key_metadata(key)).username == alice.username
    revoked = pool.users().RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=created.api_key.key_id), metadata=alice.auth, timeout=10
    )
    assert revoked.api_key.HasField("revoked_at")
    since = now()
    started = time.monotonic()
    while True:
        try:
            pool.who_am_i(api_key_metadata(key))
        except grpc.RpcError as error:
            assert error.code() == UNAUTHENTICATED, error.details()
            assert error.details() == INVALID
            break
        assert time.monotonic() - started < REVOCATION_DEADLINE, "revoked key still works"
        time.sleep(0.05)
    _refused_key(pool, key)
    pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=INVALID)


def test_an_expired_key_is_refused(pool: Pool, alice: Account) -> None:
    generated = generate_api_key()
    pool.store.create_api_key(
        owner=alice.username,
        lookup_id=generated.lookup_id,
        secret_hash=generated.secret_hash,
        name="old",
        scopes=["user"],
        expires_at=datetime.now(UTC) - timedelta(minutes=1),
    )
    since = now()
    _refused_key(pool, generated.key)
    pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=INVALID)


def test_a_planted_key_works_until_it_expires(pool: Pool, alice: Account) -> None:
    """The control for the expired key: the same planting, one minute the other way."""
    generated = generate_api_key()
    pool.store.create_api_key(
        owner=alice.username,
        lookup_id=generated.lookup_id,
        secret_hash=generated.secret_hash,
        name="fresh",
        scopes=["user"],
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
    )
    assert pool.who_am_i(api_key_metadata(generated.key)).username == alice.username


def _bad_checksum(key: str) -> str:
    last = key[-1]
    return key[:-1] + ("0" if last != "0" else "1")


def _wrong_secret(key: str) -> str:
    # Same lookup id, another secret, a correct checksum: only the hash comparison refuses.
    lookup_id = key.split("_")[1]
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    secret = "".join(secrets.choice(alphabet) for _ in range(43))
    return with_checksum(f"npk_{lookup_id}_{secret}")


def _unknown_lookup_id(key: str) -> str:
    _, _, secret, _ = key.split("_")
    return with_checksum(f"npk_{secrets.token_hex(8)}_{secret}")


MALFORMED = {
    "bad-checksum": _bad_checksum,
    "truncated": lambda key: key[:-3],
    "wrong-secret": _wrong_secret,
    "unknown-lookup-id": _unknown_lookup_id,
    "prefix-only": lambda key: "npk_",
}


@pytest.mark.parametrize("damage", list(MALFORMED))
def test_a_malformed_or_forged_key_is_refused(pool: Pool, alice: Account, damage: str) -> None:
    key = _create(pool, alice).secret
    _refused_key(pool, MALFORMED[damage](key))
    assert pool.who_am_i(api_key_metadata(key)).username == alice.username


def test_every_refused_key_is_audited(pool: Pool, alice: Account) -> None:
    key = _create(pool, alice).secret
    since = now()
    for damage in MALFORMED.values():
        _refused_key(pool, damage(key))
    pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=INVALID, count=len(MALFORMED))


# -- scopes -----------------------------------------------------------------------------------


def test_a_user_scoped_key_of_an_admin_cannot_call_admin_methods(pool: Pool) -> None:
    admin_key = _create(pool, pool.admin, scopes=("user", "admin")).secret
    user_key = _create(pool, pool.admin, scopes=("user",)).secret
    listing = audit_pb2.ListAuditEventsRequest(page_size=1)
    # Control: the full-scope key of the same admin may read the audit log.
    pool.audit().ListAuditEvents(listing, metadata=api_key_metadata(admin_key), timeout=10)

    since = now()
    refused(
        lambda: pool.audit().ListAuditEvents(
            listing, metadata=api_key_metadata(user_key), timeout=10
        ),
        PERMISSION_DENIED,
    )
    refused(
        lambda: pool.users().GrantRole(
            pb.ChangeRoleRequest(username=pool.admin.username, role="user"),
            metadata=api_key_metadata(user_key),
            timeout=10,
        ),
        PERMISSION_DENIED,
    )
    # Nor may it act on other accounts, though its owner could.
    refused(
        lambda: pool.users().GetUserInfo(
            pb.GetUserInfoRequest(username=pool.unique("someone")),
            metadata=api_key_metadata(user_key),
            timeout=10,
        ),
        PERMISSION_DENIED,
    )
    [event] = pool.expect_audit(
        AUDIT + "ListAuditEvents", PERMISSION_DENIED, since, username=pool.admin.username
    )
    assert event.detail["reason"] == "permission denied"
    pool.expect_audit(USER + "GrantRole", PERMISSION_DENIED, since, username=pool.admin.username)
    pool.expect_audit(GET_USER_INFO, PERMISSION_DENIED, since, username=pool.admin.username)


def test_a_user_cannot_mint_a_key_with_a_role_they_do_not_hold(pool: Pool, alice: Account) -> None:
    since = now()
    error = refused(lambda: _create(pool, alice, scopes=("admin",)), PERMISSION_DENIED)
    refused(lambda: _create(pool, alice, scopes=("user", "admin")), PERMISSION_DENIED)
    # "node" is not an account role at all: bad input, not a permission question.
    refused(lambda: _create(pool, alice, scopes=("node",)), grpc.StatusCode.INVALID_ARGUMENT)
    pool.expect_audit(USER + "CreateApiKey", PERMISSION_DENIED, since, username=alice.username)
    keys = pool.users().ListApiKeys(pb.ListApiKeysRequest(), metadata=alice.auth, timeout=10)
    assert all("admin" not in key.scopes for key in keys.api_keys), error.details()


def test_a_key_cannot_mint_keys_beyond_its_own_scope(pool: Pool) -> None:
    """An admin's user-scoped key must not be a way back to an admin-scoped key."""
    user_key = _create(pool, pool.admin, scopes=("user",)).secret
    refused(
        lambda: pool.users().CreateApiKey(
            pb.CreateApiKeyRequest(name="escalate", scopes=["admin"]),
            metadata=api_key_metadata(user_key),
            timeout=10,
        ),
        PERMISSION_DENIED,
    )


# -- someone else's keys -------------------------------------------------------------------


def test_a_user_cannot_see_or_revoke_another_users_key(
    pool: Pool, alice: Account, bob: Account
) -> None:
    bobs = _create(pool, bob)
    since = now()
    # Listing another user's keys: refused, and the same for a name that does not exist.
    answers = [
        refused(
            lambda owner=owner: pool.users().ListApiKeys(
                pb.ListApiKeysRequest(owner=owner), metadata=alice.auth, timeout=10
            ),
            PERMISSION_DENIED,
        ).details()
        for owner in (bob.username, pool.unique("nobody"))
    ]
    assert answers[0] == answers[1]
    pool.expect_audit(
        USER + "ListApiKeys", PERMISSION_DENIED, since, username=alice.username, count=2
    )

    # Revoking another user's key looks exactly like revoking a key that does not exist:
    # NOT_FOUND, so key ids cannot be probed. (Audited as "failed", not "denied": the
    # servicer cannot tell the two apart, which is the point.)
    since = now()
    errors = [
        refused(
            lambda key_id=key_id: pool.users().RevokeApiKey(
                pb.RevokeApiKeyRequest(key_id=key_id), metadata=alice.auth, timeout=10
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        for key_id in (bobs.api_key.key_id, secrets.token_hex(8))
    ]
    assert errors[0].details() == errors[1].details()
    pool.expect_audit(
        USER + "RevokeApiKey",
        grpc.StatusCode.NOT_FOUND,
        since,
        outcome="failed",
        username=alice.username,
        count=2,
    )
    # And Bob's key was not touched.
    assert pool.who_am_i(api_key_metadata(bobs.secret)).username == bob.username


def test_an_admin_may_revoke_any_key(pool: Pool, bob: Account) -> None:
    bobs = _create(pool, bob)
    pool.users().RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=bobs.api_key.key_id), metadata=pool.admin.auth, timeout=10
    )
    deadline = time.monotonic() + REVOCATION_DEADLINE
    while True:
        try:
            pool.who_am_i(api_key_metadata(bobs.secret))
        except grpc.RpcError as error:
            assert error.code() == UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "revoked key still works"
        time.sleep(0.05)
