"""Limits and backstops: sign-up rate, look-alike names, revocations nobody announced."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import jwt
import pytest

from nodepool.v1 import user_manager_pb2
from tests.fixtures.accounts import LOGIN_FAILED, PASSWORD, Account, Pool, refused, start_pool
from tests.fixtures.server import bearer

SIGN_UPS_PER_MINUTE = 3
MAX_FAILURES = 2


@pytest.fixture
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(
        request,
        tmp_path_factory.mktemp("limits"),
        "memory",
        registrations_per_peer_per_minute=SIGN_UPS_PER_MINUTE,
        login_max_failures=MAX_FAILURES,
    ) as pool:
        yield pool


def test_sign_ups_are_rate_limited_per_address(pool: Pool) -> None:
    for index in range(SIGN_UPS_PER_MINUTE):
        pool.register(f"signup-{index}")
    error = refused(lambda: pool.register("signup-over"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.details() == "too many sign-ups; try again later"


def test_look_alike_spellings_share_the_lock_or_fail(pool: Pool) -> None:
    account = pool.new_user("sysop")
    # "s" written as LATIN SMALL LETTER LONG S folds to "s" in the database: without the
    # username rules in login it would be the same account under a fresh counter.
    look_alike = account.username.replace("s", "\u017f", 1)
    assert look_alike != account.username
    error = refused(
        lambda: pool.login(Account(look_alike, PASSWORD)), grpc.StatusCode.UNAUTHENTICATED
    )
    assert error.details() == LOGIN_FAILED
    # The look-alike's failure counted against the real name's lock.
    for _ in range(MAX_FAILURES - 1):
        refused(
            lambda: pool.login(Account(account.username.upper(), "wrong password here")),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    # Locked under its canonical name, whatever the spelling.
    refused(lambda: pool.login(account), grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_a_session_revoked_without_announcement_is_refused_within_seconds(pool: Pool) -> None:
    """The database is the backstop for a lost announcement (a publisher that died)."""
    account = pool.new_user("quiet")
    users = pool.users()
    info = users.GetUserInfo(
        user_manager_pb2.GetUserInfoRequest(), metadata=bearer(account.access), timeout=10
    )
    assert info.user.username == account.username
    session_id = jwt.decode(account.access, options={"verify_signature": False})["sid"]
    pool.store.revoke_session(session_id, reason="revoked elsewhere, never announced")

    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            users.GetUserInfo(
                user_manager_pb2.GetUserInfoRequest(), metadata=bearer(account.access), timeout=10
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            return
        time.sleep(0.1)
    raise AssertionError("a revoked session kept working for 3 s")
