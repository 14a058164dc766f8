"""Who may do what to which account, over real mTLS: refusals, their audit, and the
positive paths that prove the refusals are not just a broken server.

Roles are read live from the account on each call (cached, forgotten when changed), so a
granted or revoked role takes effect on the very token the user already holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nodepool.v1 import audit_pb2
from nodepool.v1 import user_manager_pb2 as pb
from tests.fixtures.accounts import (
    AUDIT,
    BACKENDS,
    LOGIN_FAILED,
    USER,
    Account,
    Pool,
    api_key_metadata,
    now,
    refused,
    start_pool,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = "invalid or expired credential"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
NEW_PASSWORD = "another horse, another battery"
# Session ends are announced to the credential cache; two seconds is the promise.
PROPAGATION_DEADLINE = 2.0


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(request, tmp_path_factory.mktemp("access"), request.param) as pool:
        yield pool


@pytest.fixture(scope="module")
def alice(pool: Pool) -> Account:
    return pool.new_user("alice")


@pytest.fixture(scope="module")
def bob(pool: Pool) -> Account:
    return pool.new_user("bob")


def _list_audit(pool: Pool, metadata: Any) -> audit_pb2.ListAuditEventsResponse:
    return pool.audit().ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(page_size=1), metadata=metadata, timeout=10
    )


def _until_refused(call: Callable[[], Any], code: grpc.StatusCode) -> None:
    """Polls ``call`` until it fails with ``code``; fails after the propagation deadline."""
    deadline = time.monotonic() + PROPAGATION_DEADLINE
    while True:
        try:
            call()
        except grpc.RpcError as error:
            assert error.code() == code, f"{error.code()}: {error.details()}"
            return
        assert time.monotonic() < deadline, "still accepted"
        time.sleep(0.05)


# -- administration is for administrators ----------------------------------------------------


def _admin_calls(pool: Pool, target: str) -> dict[str, Callable[[Any], Any]]:
    users = pool.users()
    return {
        USER + "GrantRole": lambda md: users.GrantRole(
            pb.ChangeRoleRequest(username=target, role="admin"), metadata=md, timeout=10
        ),
        USER + "RevokeRole": lambda md: users.RevokeRole(
            pb.ChangeRoleRequest(username=target, role="user"), metadata=md, timeout=10
        ),
        USER + "SetUserActive": lambda md: users.SetUserActive(
            pb.SetUserActiveRequest(username=target, is_active=False), metadata=md, timeout=10
        ),
        AUDIT + "ListAuditEvents": lambda md: _list_audit(pool, md),
    }


def test_a_user_cannot_call_admin_methods(pool: Pool, alice: Account) -> None:
    since = now()
    # Granting oneself admin is the obvious first try.
    for method, call in _admin_calls(pool, alice.username).items():
        error = refused(lambda call=call: call(alice.auth), PERMISSION_DENIED)
        assert error.details() == "permission denied", method
    for method in _admin_calls(pool, alice.username):
        pool.expect_audit(method, PERMISSION_DENIED, since, username=alice.username)
    info = pool.who_am_i(alice.auth)
    assert list(info.roles) == ["user"]
    assert info.is_active


# -- other users' data -------------------------------------------------------------------------


def _other_user_calls(pool: Pool) -> dict[str, Callable[[str, Any], Any]]:
    users = pool.users()
    return {
        USER + "GetUserInfo": lambda name, md: users.GetUserInfo(
            pb.GetUserInfoRequest(username=name), metadata=md, timeout=10
        ),
        USER + "UpdateUserProfile": lambda name, md: users.UpdateUserProfile(
            pb.UpdateUserProfileRequest(username=name, email="mallory@example.com"),
            metadata=md,
            timeout=10,
        ),
        # Setting someone else's password without knowing theirs.
        USER + "UpdateUserProfile#password": lambda name, md: users.UpdateUserProfile(
            pb.UpdateUserProfileRequest(username=name, new_password=NEW_PASSWORD),
            metadata=md,
            timeout=10,
        ),
        USER + "ListApiKeys": lambda name, md: users.ListApiKeys(
            pb.ListApiKeysRequest(owner=name), metadata=md, timeout=10
        ),
        USER + "CreateApiKey": lambda name, md: users.CreateApiKey(
            pb.CreateApiKeyRequest(name="mine-now", owner=name), metadata=md, timeout=10
        ),
    }


def test_a_user_cannot_touch_another_users_account(
    pool: Pool, alice: Account, bob: Account
) -> None:
    """Refused the same way whether the other account exists or not: nothing leaks."""
    ghost = pool.unique("ghost")
    since = now()
    calls = _other_user_calls(pool)
    for name, call in calls.items():
        existing = refused(lambda call=call: call(bob.username, alice.auth), PERMISSION_DENIED)
        missing = refused(lambda call=call: call(ghost, alice.auth), PERMISSION_DENIED)
        assert existing.details() == missing.details(), name
        assert bob.username not in existing.details()
    for method in {name.partition("#")[0] for name in calls}:
        count = sum(1 for name in calls if name.startswith(method)) * 2
        pool.expect_audit(method, PERMISSION_DENIED, since, username=alice.username, count=count)
    # Bob's account is as it was, and still his.
    bob_now = pool.who_am_i(bob.auth)
    assert bob_now.email == ""
    keys = pool.users().ListApiKeys(pb.ListApiKeysRequest(), metadata=bob.auth, timeout=10)
    assert not keys.api_keys
    pool.login(Account(bob.username))


def test_an_admin_may_read_another_account(pool: Pool, bob: Account) -> None:
    info = (
        pool.users()
        .GetUserInfo(pb.GetUserInfoRequest(username=bob.username), metadata=pool.admin.auth)
        .user
    )
    assert info.username == bob.username
    # For an admin a missing account is simply not found (admins may know who exists).
    refused(
        lambda: pool.users().GetUserInfo(
            pb.GetUserInfoRequest(username=pool.unique("ghost")), metadata=pool.admin.auth
        ),
        grpc.StatusCode.NOT_FOUND,
    )


# -- certificates without a user -----------------------------------------------------------


def test_a_node_certificate_cannot_call_user_methods(
    pool: Pool, node_cert: Any, alice: Account
) -> None:
    node_users = pool.users(node_cert)
    request = pb.GetUserInfoRequest()
    since = now()
    error = refused(lambda: node_users.GetUserInfo(request, timeout=10), PERMISSION_DENIED)
    # A stolen user token does not turn a node into that user.
    with_token = refused(
        lambda: node_users.GetUserInfo(request, metadata=alice.auth, timeout=10),
        PERMISSION_DENIED,
    )
    key = (
        pool.users()
        .CreateApiKey(pb.CreateApiKeyRequest(name="k"), metadata=alice.auth, timeout=10)
        .secret
    )
    refused(
        lambda: node_users.GetUserInfo(request, metadata=api_key_metadata(key), timeout=10),
        PERMISSION_DENIED,
    )
    refused(lambda: node_users.LogoutUser(pb.LogoutUserRequest(), timeout=10), PERMISSION_DENIED)
    pool.expect_audit(USER + "GetUserInfo", PERMISSION_DENIED, since, reason=error.details())
    pool.expect_audit(
        USER + "GetUserInfo", PERMISSION_DENIED, since, reason=with_token.details(), count=2
    )
    pool.expect_audit(USER + "LogoutUser", PERMISSION_DENIED, since)


def _reflect(channel: grpc.Channel, metadata: Any = ()) -> list[Any]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    return list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))


def test_a_bare_device_may_only_sign_up_log_in_refresh_and_probe(
    pool: Pool, alice: Account
) -> None:
    channel = pool.channel()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Control: the same device with a user's token may describe the API.
    assert _reflect(channel, alice.auth)

    since = now()
    refused(lambda: _reflect(channel), PERMISSION_DENIED)
    refused(lambda: pool.who_am_i(()), UNAUTHENTICATED)
    for call in _admin_calls(pool, alice.username).values():
        refused(lambda call=call: call(()), UNAUTHENTICATED)
    pool.expect_audit(REFLECTION, PERMISSION_DENIED, since)
    pool.expect_audit(USER + "GetUserInfo", UNAUTHENTICATED, since)
    pool.expect_audit(USER + "GrantRole", UNAUTHENTICATED, since)
    pool.expect_audit(AUDIT + "ListAuditEvents", UNAUTHENTICATED, since)


# -- positive paths -----------------------------------------------------------------------------


def test_register_login_read_and_update_own_profile(pool: Pool) -> None:
    erin = pool.new_user("Erin")
    info = pool.who_am_i(erin.auth)
    # Usernames are stored lower-case; sign-up gets the user role and nothing more.
    assert info.username == erin.username.lower()
    assert list(info.roles) == ["user"]
    assert info.HasField("last_login")
    updated = pool.users().UpdateUserProfile(
        pb.UpdateUserProfileRequest(email="erin@Example.COM"), metadata=erin.auth, timeout=10
    )
    assert updated.user.email == "erin@example.com"
    assert pool.who_am_i(erin.auth).email == "erin@example.com"
    # A remote sign-up can never be an admin, whatever name it picks.
    refused(lambda: _list_audit(pool, erin.auth), PERMISSION_DENIED)


def test_a_password_change_needs_the_old_one_and_ends_the_other_sessions(pool: Pool) -> None:
    frank = pool.new_user("frank")
    elsewhere = pool.login(Account(frank.username))
    since = now()
    error = refused(
        lambda: pool.users().UpdateUserProfile(
            pb.UpdateUserProfileRequest(
                current_password="not my password", new_password=NEW_PASSWORD
            ),
            metadata=frank.auth,
            timeout=10,
        ),
        PERMISSION_DENIED,
    )
    assert error.details() == "current password is wrong"
    pool.expect_audit(USER + "UpdateUserProfile", PERMISSION_DENIED, since, username=frank.username)
    # Nothing changed: the other session is alive.
    assert pool.who_am_i(elsewhere.auth).username == frank.username

    pool.users().UpdateUserProfile(
        pb.UpdateUserProfileRequest(current_password=frank.password, new_password=NEW_PASSWORD),
        metadata=frank.auth,
        timeout=10,
    )
    _until_refused(lambda: pool.who_am_i(elsewhere.auth), UNAUTHENTICATED)
    refused(
        lambda: pool.users().RefreshToken(
            pb.RefreshTokenRequest(refresh_token=elsewhere.refresh), timeout=10
        ),
        UNAUTHENTICATED,
    )
    # The session that changed it goes on.
    assert pool.who_am_i(frank.auth).username == frank.username
    old = refused(lambda: pool.login(Account(frank.username)), UNAUTHENTICATED)
    assert old.details() == LOGIN_FAILED
    assert pool.login(Account(frank.username, NEW_PASSWORD)).access


def test_granting_and_revoking_admin_takes_effect_on_the_current_token(
    pool: Pool, bob: Account
) -> None:
    refused(lambda: _list_audit(pool, bob.auth), PERMISSION_DENIED)
    granted = pool.users().GrantRole(
        pb.ChangeRoleRequest(username=bob.username, role="admin"),
        metadata=pool.admin.auth,
        timeout=10,
    )
    assert sorted(granted.user.roles) == ["admin", "user"]
    _list_audit(pool, bob.auth)
    pool.users().RevokeRole(
        pb.ChangeRoleRequest(username=bob.username, role="admin"),
        metadata=pool.admin.auth,
        timeout=10,
    )
    _until_refused(lambda: _list_audit(pool, bob.auth), PERMISSION_DENIED)
    assert list(pool.who_am_i(bob.auth).roles) == ["user"]


def test_only_account_roles_held_by_the_granter_can_be_granted(pool: Pool, bob: Account) -> None:
    since = now()
    # "node" belongs to node certificates, never to a person.
    error = refused(
        lambda: pool.users().GrantRole(
            pb.ChangeRoleRequest(username=bob.username, role="node"),
            metadata=pool.admin.auth,
            timeout=10,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.details() == "role must be one of: admin, user"
    pool.expect_audit(USER + "GrantRole", grpc.StatusCode.INVALID_ARGUMENT, since, outcome="failed")
    # An admin acting through a key scoped to "admin" alone does not hold "user" in that
    # call, so cannot hand it out: the check is on the caller's effective roles.
    admin_only = (
        pool.users()
        .CreateApiKey(
            pb.CreateApiKeyRequest(name="admin-only", scopes=["admin"]),
            metadata=pool.admin.auth,
            timeout=10,
        )
        .secret
    )
    error = refused(
        lambda: pool.users().GrantRole(
            pb.ChangeRoleRequest(username=bob.username, role="user"),
            metadata=api_key_metadata(admin_only),
            timeout=10,
        ),
        PERMISSION_DENIED,
    )
    assert error.details() == "you cannot grant or revoke a role you do not hold"
    assert list(pool.who_am_i(bob.auth).roles) == ["user"]


def test_a_deactivated_account_stops_working_everywhere(pool: Pool) -> None:
    gina = pool.new_user("gina")
    key = (
        pool.users()
        .CreateApiKey(pb.CreateApiKeyRequest(name="k"), metadata=gina.auth, timeout=10)
        .secret
    )
    assert pool.who_am_i(api_key_metadata(key)).username == gina.username
    pool.users().SetUserActive(
        pb.SetUserActiveRequest(username=gina.username, is_active=False),
        metadata=pool.admin.auth,
        timeout=10,
    )
    since = now()
    _until_refused(lambda: pool.who_am_i(gina.auth), UNAUTHENTICATED)
    refused(lambda: pool.who_am_i(api_key_metadata(key)), UNAUTHENTICATED)
    refused(
        lambda: pool.users().RefreshToken(
            pb.RefreshTokenRequest(refresh_token=gina.refresh), timeout=10
        ),
        UNAUTHENTICATED,
    )
    # The right password gets the same answer as a wrong one or an unknown user.
    disabled = refused(lambda: pool.login(Account(gina.username)), UNAUTHENTICATED)
    unknown = refused(lambda: pool.login(Account(pool.unique("nobody"))), UNAUTHENTICATED)
    assert disabled.details() == unknown.details() == LOGIN_FAILED
    pool.expect_audit(USER + "GetUserInfo", UNAUTHENTICATED, since, reason=INVALID, count=2)
    pool.expect_audit(USER + "LoginUser", UNAUTHENTICATED, since, count=2)

    pool.users().SetUserActive(
        pb.SetUserActiveRequest(username=gina.username, is_active=True),
        metadata=pool.admin.auth,
        timeout=10,
    )
    again = pool.login(Account(gina.username))
    assert pool.who_am_i(again.auth).username == gina.username
    # Reactivation does not bring the ended session back.
    refused(lambda: pool.who_am_i(gina.auth), UNAUTHENTICATED)


def test_the_last_admin_cannot_be_demoted_or_deactivated(pool: Pool) -> None:
    admin = pool.admin
    users = pool.users()
    since = now()
    error = refused(
        lambda: users.RevokeRole(
            pb.ChangeRoleRequest(username=admin.username, role="admin"),
            metadata=admin.auth,
            timeout=10,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error.details() == "the last active administrator cannot be removed"
    # Deactivating oneself is refused first by its own rule: an active admin is the only
    # one who can call SetUserActive, and another active admin means it is not the last.
    refused(
        lambda: users.SetUserActive(
            pb.SetUserActiveRequest(username=admin.username, is_active=False),
            metadata=admin.auth,
            timeout=10,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    pool.expect_audit(
        USER + "RevokeRole", grpc.StatusCode.FAILED_PRECONDITION, since, outcome="failed"
    )
    info = users.GetUserInfo(pb.GetUserInfoRequest(), metadata=admin.auth, timeout=10).user
    assert sorted(info.roles) == ["admin", "user"]
    assert info.is_active
    _list_audit(pool, admin.auth)
