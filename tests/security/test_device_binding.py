"""Credentials bound to the device they were issued through, over real mTLS on both
backends: tokens and bound API keys work only through their certificate identity, a
refresh retried from the same device gets the same pair, API keys cannot mint keys and
die with a password change or a deactivation, failed logins from one device cannot lock
the owner out on another, and reserved names cannot be signed up for.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodepool.v1 import user_manager_pb2 as pb
from pki import CertificateAuthority, IssuedCertificate
from tests.fixtures.accounts import (
    BACKENDS,
    LOGIN_FAILED,
    PASSWORD,
    USER,
    Account,
    Pool,
    api_key_metadata,
    now,
    refused,
    start_pool,
)
from tests.fixtures.server import bearer

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID = "invalid or expired credential"
GET_USER_INFO = USER + "GetUserInfo"
LOGIN = USER + "LoginUser"
WRONG = "not the password at all"


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(
        request,
        tmp_path_factory.mktemp("devices"),
        request.param,
        # Every test talks from localhost; the per-address limit has its own test.
        login_attempts_per_peer_per_minute=10_000,
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def other_device(
    pki_ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> IssuedCertificate:
    """A second client certificate from the same CA: someone else's laptop."""
    return pki_ca.issue("client", "mallory-laptop", tmp_path_factory.mktemp("other-device"))


def _who(pool: Pool, metadata: Any, device: Any | None = None) -> pb.User:
    return (
        pool.users(device).GetUserInfo(pb.GetUserInfoRequest(), metadata=metadata, timeout=10).user
    )


def _refresh(pool: Pool, token: str, device: Any | None = None) -> pb.LoginUserResponse:
    return pool.users(device).RefreshToken(pb.RefreshTokenRequest(refresh_token=token), timeout=10)


def _create_key(pool: Pool, metadata: Any, bound_device: str = "") -> pb.CreateApiKeyResponse:
    return pool.users().CreateApiKey(
        pb.CreateApiKeyRequest(name="ci", bound_device=bound_device), metadata=metadata, timeout=10
    )


# -- tokens ------------------------------------------------------------------------------


def test_a_token_replayed_through_another_device_is_refused(
    pool: Pool, other_device: IssuedCertificate
) -> None:
    alice = pool.new_user("alice")
    # Control: through the device it was issued through, it works.
    assert _who(pool, alice.auth).username == alice.username
    since = now()
    error = refused(lambda: _who(pool, alice.auth, other_device), UNAUTHENTICATED)
    assert error.details() == INVALID
    [event] = pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=INVALID)
    assert event.principal == pool.device(other_device)
    # The copy did not hurt the owner.
    assert _who(pool, alice.auth).username == alice.username


def test_a_token_issued_for_another_device_is_refused(
    pool: Pool, other_device: IssuedCertificate
) -> None:
    """Signed with the server's own key: only the confirmation claim differs."""
    bob = pool.new_user("bob")
    token = pool.issue_access(bob.username, device=pool.device(other_device))
    assert _who(pool, bearer(token), other_device).username == bob.username
    refused(lambda: _who(pool, bearer(token)), UNAUTHENTICATED)


def test_a_renewed_certificate_keeps_the_session(
    pool: Pool, pki_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The binding is to the identity (URI SAN), not to one certificate's key."""
    first = pki_ca.issue("client", pool.unique("carol-laptop"), tmp_path / "first")
    carol = Account(pool.unique("carol"))
    pool.register(carol.username)
    response = pool.users(first).LoginUser(
        pb.LoginUserRequest(username=carol.username, password=PASSWORD), timeout=10
    )
    renewed = pki_ca.issue("client", first.cert_path.stem, tmp_path / "renewed", allow_reissue=True)
    assert renewed.serial != first.serial
    assert _who(pool, bearer(response.access_token), renewed).username == carol.username
    assert _refresh(pool, response.refresh_token, renewed).access_token


def test_a_refresh_token_from_another_device_ends_the_session(
    pool: Pool, other_device: IssuedCertificate
) -> None:
    dave = pool.new_user("dave")
    since = now()
    error = refused(lambda: _refresh(pool, dave.refresh, other_device), UNAUTHENTICATED)
    assert error.details() == INVALID
    pool.expect_audit(USER + "RefreshToken", UNAUTHENTICATED, since)
    # The token leaked: the session is over for its owner too.
    refused(lambda: _refresh(pool, dave.refresh), UNAUTHENTICATED)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            _who(pool, dave.auth)
        except grpc.RpcError as error:
            assert error.code() == UNAUTHENTICATED
            break
        time.sleep(0.1)
    else:
        pytest.fail("the session's access token still works")


def test_a_refresh_retried_from_the_same_device_gets_the_same_pair(pool: Pool) -> None:
    erin = pool.new_user("erin")
    first = _refresh(pool, erin.refresh)
    # The reply was lost; the client sends the same request again, at once.
    again = _refresh(pool, erin.refresh)
    assert (again.access_token, again.refresh_token) == (first.access_token, first.refresh_token)
    assert _who(pool, bearer(again.access_token)).username == erin.username
    # The session goes on with the new refresh token.
    assert _refresh(pool, again.refresh_token).access_token


# -- API keys --------------------------------------------------------------------------------


def test_a_bound_key_works_only_through_its_device(
    pool: Pool, other_device: IssuedCertificate
) -> None:
    frank = pool.new_user("frank")
    bound = _create_key(pool, frank.auth, bound_device=pool.device())
    unbound = _create_key(pool, frank.auth)
    assert bound.api_key.bound_device == pool.device()
    assert unbound.api_key.bound_device == ""
    key = api_key_metadata(bound.secret)
    assert _who(pool, key).username == frank.username
    since = now()
    error = refused(lambda: _who(pool, key, other_device), UNAUTHENTICATED)
    assert error.details() == INVALID
    pool.expect_audit(GET_USER_INFO, UNAUTHENTICATED, since, reason=INVALID)
    # Unbound keys stay possible for automation, and are listed as such.
    assert _who(pool, api_key_metadata(unbound.secret), other_device).username == frank.username
    listing = pool.users().ListApiKeys(pb.ListApiKeysRequest(), metadata=frank.auth, timeout=10)
    assert {k.key_id: k.bound_device for k in listing.api_keys} == {
        bound.api_key.key_id: pool.device(),
        unbound.api_key.key_id: "",
    }


@pytest.mark.parametrize(
    "device",
    [
        "laptop",
        "spiffe://elsewhere.test/client/laptop",
        "spiffe://nodepool.test/node/node-a",
        "spiffe://nodepool.test/client/",
        "spiffe://nodepool.test/client/Upper",
    ],
)
def test_a_key_can_only_be_bound_to_a_client_identity(pool: Pool, device: str) -> None:
    refused(
        lambda: _create_key(pool, pool.admin.auth, bound_device=device),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_an_api_key_cannot_create_a_key(pool: Pool) -> None:
    grace = pool.new_user("grace")
    key = _create_key(pool, grace.auth).secret
    since = now()
    error = refused(lambda: _create_key(pool, api_key_metadata(key)), PERMISSION_DENIED)
    assert "session" in (error.details() or "")
    pool.expect_audit(USER + "CreateApiKey", PERMISSION_DENIED, since, username=grace.username)
    listing = pool.users().ListApiKeys(pb.ListApiKeysRequest(), metadata=grace.auth, timeout=10)
    assert len(listing.api_keys) == 1


def _change_password(pool: Pool, account: Account, new: str, *, keep: bool) -> None:
    pool.users().UpdateUserProfile(
        pb.UpdateUserProfileRequest(
            current_password=account.password, new_password=new, keep_api_keys=keep
        ),
        metadata=account.auth,
        timeout=10,
    )
    account.password = new


def _key_refused_soon(pool: Pool, key: str) -> None:
    deadline = time.monotonic() + 3
    while True:
        try:
            _who(pool, api_key_metadata(key))
        except grpc.RpcError as error:
            assert error.code() == UNAUTHENTICATED
            return
        assert time.monotonic() < deadline, "the key still works"
        time.sleep(0.1)


def test_a_password_change_revokes_the_users_api_keys(pool: Pool) -> None:
    heidi = pool.new_user("heidi")
    key = _create_key(pool, heidi.auth).secret
    _change_password(pool, heidi, "a new and long passphrase", keep=False)
    _key_refused_soon(pool, key)
    listing = pool.users().ListApiKeys(pb.ListApiKeysRequest(), metadata=heidi.auth, timeout=10)
    assert all(k.HasField("revoked_at") for k in listing.api_keys)


def test_keeping_the_keys_through_a_password_change_is_audited(pool: Pool) -> None:
    ivan = pool.new_user("ivan")
    key = _create_key(pool, ivan.auth).secret
    since = now()
    _change_password(pool, ivan, "another long passphrase", keep=True)
    assert _who(pool, api_key_metadata(key)).username == ivan.username
    [event] = pool.expect_audit(
        USER + "UpdateUserProfile",
        grpc.StatusCode.OK,
        since,
        outcome="allowed",
        username=ivan.username,
    )
    assert event.detail["api_keys"] == "kept"


def test_deactivation_revokes_the_users_api_keys(pool: Pool) -> None:
    judy = pool.new_user("judy")
    key = _create_key(pool, judy.auth).secret
    admin = pool.users()
    admin.SetUserActive(
        pb.SetUserActiveRequest(username=judy.username, is_active=False),
        metadata=pool.admin.auth,
        timeout=10,
    )
    admin.SetUserActive(
        pb.SetUserActiveRequest(username=judy.username, is_active=True),
        metadata=pool.admin.auth,
        timeout=10,
    )
    # Active again, but the key made before the deactivation stays dead.
    _key_refused_soon(pool, key)
    assert pool.login(Account(judy.username)).access


# -- failed logins ---------------------------------------------------------------------------


def test_failed_logins_from_another_device_do_not_lock_the_owner_out(
    pool: Pool, other_device: IssuedCertificate
) -> None:
    bob = Account(pool.unique("bob"))
    pool.register(bob.username)
    attacker = pool.users(other_device)
    since = now()
    answers = []
    for _ in range(8):
        with pytest.raises(grpc.RpcError) as raised:
            attacker.LoginUser(
                pb.LoginUserRequest(username=bob.username, password=WRONG), timeout=10
            )
        answers.append(raised.value.code())
    failures = 5  # LoginPolicy.max_failures, the default
    assert answers == [UNAUTHENTICATED] * failures + [EXHAUSTED] * (8 - failures)
    # The attacker's device stays locked out of bob, even with the right password...
    with pytest.raises(grpc.RpcError) as raised:
        attacker.LoginUser(pb.LoginUserRequest(username=bob.username, password=PASSWORD))
    assert raised.value.code() == EXHAUSTED
    # ...while bob logs in from his own device.
    assert pool.login(bob).access
    # Every attempt is listed under bob, the lockouts as denials.
    pool.expect_audit(LOGIN, UNAUTHENTICATED, since, username=bob.username, count=failures)
    pool.expect_audit(LOGIN, EXHAUSTED, since, username=bob.username, count=8 - failures + 1)
    pool.expect_audit(LOGIN, grpc.StatusCode.OK, since, outcome="allowed", username=bob.username)


def test_a_failed_login_answer_is_the_same_for_unknown_names(
    pool: Pool, other_device: IssuedCertificate
) -> None:
    attacker = pool.users(other_device)
    with pytest.raises(grpc.RpcError) as raised:
        attacker.LoginUser(pb.LoginUserRequest(username=pool.unique("nobody"), password=WRONG))
    assert (raised.value.code(), raised.value.details()) == (UNAUTHENTICATED, LOGIN_FAILED)


# -- reserved names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["admin", "Administrator", "support", "security", "root2"])
def test_reserved_names_cannot_be_signed_up_for(pool: Pool, name: str) -> None:
    error = refused(lambda: pool.register(name), grpc.StatusCode.INVALID_ARGUMENT)
    assert "reserved" in (error.details() or "")
