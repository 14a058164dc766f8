"""Sign-up is rate limited per address; look-alike names cannot dodge the login lock."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.fixtures.accounts import LOGIN_FAILED, PASSWORD, Account, Pool, refused, start_pool

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
