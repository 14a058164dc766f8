"""Password guessing over real mTLS: lockout per account and device, a rate limit per
peer, and answers that never tell whether a username exists.

The servers here lock an account after 3 failures (``login_max_failures``). The lockout
is kept in the cache for known and unknown names alike, so the sequence of answers for
an account that exists and for one that does not must be identical, code and message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.fixtures.accounts import (
    BACKENDS,
    LOGIN_FAILED,
    PASSWORD,
    USER,
    Account,
    Pool,
    now,
    refused,
    start_pool,
)

MAX_FAILURES = 3
# LoginPolicy.attempts_per_peer_per_minute; not a setting, so the test names it.
PEER_ATTEMPTS_PER_MINUTE = 30
LOGIN = USER + "LoginUser"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
LOCKED = "too many failed logins; try again later"
RATE_LIMITED = "too many login attempts; try again later"
WRONG = "not the password at all"


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(
        request,
        tmp_path_factory.mktemp("login"),
        request.param,
        login_max_failures=MAX_FAILURES,
    ) as pool:
        yield pool


def _answers(pool: Pool, username: str) -> list[tuple[grpc.StatusCode, str]]:
    """MAX_FAILURES wrong passwords, then the right one twice; every answer a refusal."""
    answers = []
    for password in [WRONG] * MAX_FAILURES + [PASSWORD, PASSWORD]:
        with pytest.raises(grpc.RpcError) as raised:
            pool.login(Account(username, password))
        answers.append((raised.value.code(), raised.value.details()))
    return answers


def test_lockout_answers_the_same_for_known_and_unknown_users(pool: Pool) -> None:
    known = pool.unique("henry")
    pool.register(known)
    unknown = pool.unique("henry")
    since = now()

    expected = [(UNAUTHENTICATED, LOGIN_FAILED)] * MAX_FAILURES + [(EXHAUSTED, LOCKED)] * 2
    assert _answers(pool, known) == expected
    assert _answers(pool, unknown) == expected
    # Names are case-insensitive, and so is the lock.
    error = refused(lambda: pool.login(Account(known.upper())), EXHAUSTED)
    assert error.details() == LOCKED

    pool.expect_audit(LOGIN, UNAUTHENTICATED, since, count=2 * MAX_FAILURES)
    # Lockout refusals are denials, filed under the account they were aimed at.
    pool.expect_audit(LOGIN, EXHAUSTED, since, count=5)
    pool.expect_audit(LOGIN, EXHAUSTED, since, username=known, count=2)
    # The lock is on this account from this device: another account still logs in here.
    assert pool.new_user("ivy").access


def test_a_wrong_password_and_an_unknown_user_get_one_answer(pool: Pool) -> None:
    jane = pool.unique("jane")
    pool.register(jane)
    wrong = refused(lambda: pool.login(Account(jane, WRONG)), UNAUTHENTICATED)
    unknown = refused(lambda: pool.login(Account(pool.unique("jane"), WRONG)), UNAUTHENTICATED)
    assert wrong.details() == unknown.details() == LOGIN_FAILED
    # One failure is below the limit: the right password still works, and resets the count.
    assert pool.login(Account(jane)).access


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_peer_rate_limit_stops_guessing_across_usernames(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """Spreading guesses over many names (each far from its own lockout) hits the limit
    per peer address. A server of its own: the limit would spoil other tests' logins."""
    with start_pool(request, tmp_path, backend, login_max_failures=MAX_FAILURES) as pool:
        # The pool's admin logged in once already from this address.
        for attempt in range(2, PEER_ATTEMPTS_PER_MINUTE + 1):
            error = refused(
                lambda attempt=attempt: pool.login(Account(f"guess-{attempt}-x", WRONG)),
                UNAUTHENTICATED,
            )
            assert error.details() == LOGIN_FAILED
        since = now()
        error = refused(lambda: pool.login(Account(pool.unique("guess"), WRONG)), EXHAUSTED)
        assert error.details() == RATE_LIMITED
        # Now even the right password of a real account waits for the window to pass.
        error = refused(lambda: pool.login(Account(pool.admin.username)), EXHAUSTED)
        assert error.details() == RATE_LIMITED
        pool.expect_audit(LOGIN, EXHAUSTED, since, count=2)
        # Sessions already open are not affected.
        assert pool.who_am_i(pool.admin.auth).username == pool.admin.username
