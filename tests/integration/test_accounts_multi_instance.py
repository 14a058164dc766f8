"""Two server instances sharing one PostgreSQL database, one Redis namespace, one CA and
one JWT key directory: a credential made on one works on the other, and a credential
ended on one stops working on the other within two seconds (announced over Redis, not
waited out on a cache lifetime).

Each instance keeps its own in-memory caches of verified tokens, users and API keys, so
every check first warms B's cache with a successful call: a refusal afterwards proves the
change was propagated, not merely that B had never looked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from nodepool.v1 import audit_pb2
from nodepool.v1 import user_manager_pb2 as pb
from tests.fixtures.accounts import (
    Account,
    Pool,
    api_key_metadata,
    now,
    start_pool,
)
from tests.fixtures.server import running_server, server_settings

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

PROPAGATION_DEADLINE = 2.0
REUSE_SECONDS = 1.0


@dataclass
class TwoInstances:
    a: Pool
    b: Pool


@pytest.fixture(scope="module")
def instances(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoInstances]:
    base = tmp_path_factory.mktemp("multi")
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    shared: dict[str, Any] = {
        "database_url": request.getfixturevalue("postgres_database_factory")(),
        "redis_url": request.getfixturevalue("redis_url"),
        "cache_namespace": namespace,
        # Instance A creates the signing key here at start; B loads the same one.
        "jwt_key_dir": base / "jwt-keys",
        # Short, so a test can outwait the refresh reuse interval.
        "refresh_reuse_seconds": REUSE_SECONDS,
    }
    # "shared": no backend of its own; everything shared is passed explicitly.
    with start_pool(request, base / "a", "shared", **shared) as a:
        b_settings = server_settings(
            request.getfixturevalue("pki_ca").directory,
            request.getfixturevalue("server_cert"),
            base / "b" / "data",
            **shared,
        )
        with running_server(b_settings) as b_server:
            b = Pool(b_server, b_settings, a.store, a.client_cert, "shared")
            b.admin = a.admin
            try:
                assert b.server.port != a.server.port
                yield TwoInstances(a, b)
            finally:
                b.close()


def _who(pool: Pool, metadata: Any) -> str:
    return pool.who_am_i(metadata).username


def _refused_within(call: Callable[[], Any], code: grpc.StatusCode) -> float:
    """Polls until ``call`` fails with ``code``; returns how long that took."""
    started = time.monotonic()
    while True:
        try:
            call()
        except grpc.RpcError as error:
            assert error.code() == code, f"{error.code()}: {error.details()}"
            return time.monotonic() - started
        elapsed = time.monotonic() - started
        assert elapsed < PROPAGATION_DEADLINE, f"still accepted after {elapsed:.2f} s"
        time.sleep(0.05)


def test_a_token_from_one_instance_works_on_the_other(instances: TwoInstances) -> None:
    nora = instances.a.new_user("nora")
    assert _who(instances.b, nora.auth) == nora.username
    # And the refresh token too: the session lives in the shared database.
    refreshed = instances.b.users().RefreshToken(
        pb.RefreshTokenRequest(refresh_token=nora.refresh), timeout=10
    )
    assert _who(instances.a, (("authorization", f"Bearer {refreshed.access_token}"),))


def test_logout_on_one_instance_is_refused_on_the_other(instances: TwoInstances) -> None:
    oscar = instances.a.new_user("oscar")
    assert _who(instances.b, oscar.auth) == oscar.username  # B has verified and cached it
    instances.a.users().LogoutUser(pb.LogoutUserRequest(), metadata=oscar.auth, timeout=10)
    _refused_within(lambda: _who(instances.b, oscar.auth), grpc.StatusCode.UNAUTHENTICATED)


def test_a_reused_refresh_token_ends_the_session_on_both(instances: TwoInstances) -> None:
    pia = instances.a.new_user("pia")
    assert _who(instances.b, pia.auth) == pia.username
    first = instances.a.users().RefreshToken(
        pb.RefreshTokenRequest(refresh_token=pia.refresh), timeout=10
    )
    # A retry at once (the reply was lost) reaching the other instance gets the same pair.
    again = instances.b.users().RefreshToken(
        pb.RefreshTokenRequest(refresh_token=pia.refresh), timeout=10
    )
    assert again.refresh_token == first.refresh_token
    # Replayed later, the used token is a copy: the session ends everywhere.
    time.sleep(REUSE_SECONDS + 0.3)
    with pytest.raises(grpc.RpcError) as raised:
        instances.b.users().RefreshToken(
            pb.RefreshTokenRequest(refresh_token=pia.refresh), timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    _refused_within(lambda: _who(instances.a, pia.auth), grpc.StatusCode.UNAUTHENTICATED)
    _refused_within(lambda: _who(instances.b, pia.auth), grpc.StatusCode.UNAUTHENTICATED)


def test_an_api_key_revoked_on_one_instance_is_refused_on_the_other(
    instances: TwoInstances,
) -> None:
    quinn = instances.a.new_user("quinn")
    created = instances.a.users().CreateApiKey(
        pb.CreateApiKeyRequest(name="ci"), metadata=quinn.auth, timeout=10
    )
    key = api_key_metadata(created.secret)
    assert _who(instances.b, key) == quinn.username  # B has loaded and cached the record
    instances.a.users().RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=created.api_key.key_id), metadata=quinn.auth, timeout=10
    )
    _refused_within(lambda: _who(instances.b, key), grpc.StatusCode.UNAUTHENTICATED)


def test_a_role_granted_on_one_instance_is_effective_on_the_other(
    instances: TwoInstances,
) -> None:
    rosa = instances.a.new_user("rosa")
    listing = audit_pb2.ListAuditEventsRequest(page_size=1)

    def read_audit_on_b() -> Any:
        return instances.b.audit().ListAuditEvents(listing, metadata=rosa.auth, timeout=10)

    # B caches Rosa as a plain user first.
    with pytest.raises(grpc.RpcError) as raised:
        read_audit_on_b()
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

    admin = instances.a.admin
    instances.a.users().GrantRole(
        pb.ChangeRoleRequest(username=rosa.username, role="admin"), metadata=admin.auth
    )
    started = time.monotonic()
    while True:
        try:
            read_audit_on_b()
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
            assert time.monotonic() - started < PROPAGATION_DEADLINE, "grant never reached B"
            time.sleep(0.05)

    instances.a.users().RevokeRole(
        pb.ChangeRoleRequest(username=rosa.username, role="admin"), metadata=admin.auth
    )
    _refused_within(read_audit_on_b, grpc.StatusCode.PERMISSION_DENIED)


def test_deactivation_on_one_instance_is_refused_on_the_other(instances: TwoInstances) -> None:
    sam = instances.a.new_user("sam")
    assert _who(instances.b, sam.auth) == sam.username
    instances.a.users().SetUserActive(
        pb.SetUserActiveRequest(username=sam.username, is_active=False),
        metadata=instances.a.admin.auth,
        timeout=10,
    )
    _refused_within(lambda: _who(instances.b, sam.auth), grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(grpc.RpcError) as raised:
        instances.b.login(Account(sam.username))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_refusals_on_either_instance_land_in_the_shared_audit_log(
    instances: TwoInstances,
) -> None:
    since = now()
    with pytest.raises(grpc.RpcError):
        instances.b.who_am_i(())
    # Read through A: B's entry reached the shared database.
    instances.a.expect_audit(
        "/nodepool.v1.UserManager/GetUserInfo", grpc.StatusCode.UNAUTHENTICATED, since
    )


def test_a_profile_changed_on_one_instance_is_shown_by_the_other(instances: TwoInstances) -> None:
    tara = instances.a.new_user("tara")
    assert instances.b.who_am_i(tara.auth).email == ""  # B has read and cached the profile
    instances.a.users().UpdateUserProfile(
        pb.UpdateUserProfileRequest(email="tara@example.com"), metadata=tara.auth, timeout=10
    )
    started = time.monotonic()
    while instances.b.who_am_i(tara.auth).email != "tara@example.com":
        assert time.monotonic() - started < PROPAGATION_DEADLINE, "B kept the old profile"
        time.sleep(0.05)
    # A login elsewhere is a profile change too (last_login).
    before = instances.b.who_am_i(tara.auth).last_login.ToDatetime()
    time.sleep(0.01)
    instances.a.login(tara)
    started = time.monotonic()
    while instances.b.who_am_i(tara.auth).last_login.ToDatetime() <= before:
        assert time.monotonic() - started < PROPAGATION_DEADLINE, "B kept the old last login"
        time.sleep(0.05)
