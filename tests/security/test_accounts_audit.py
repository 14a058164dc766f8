"""The audit trail of account calls, read back through the admin RPC over real mTLS.

What is checked: refusals and state changes are recorded with who (certificate identity
and, when known, the user), what and the outcome; ordinary reads that succeed are not;
and no secret a caller sent (password, token, API key) ever lands in the log.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

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
from tests.fixtures.server import bearer

OK = grpc.StatusCode.OK


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(request, tmp_path_factory.mktemp("audit"), request.param) as pool:
        yield pool


def _everything(pool: Pool) -> str:
    """The whole audit log as text, every page."""
    pages, token = [], ""
    while True:
        page = pool.audit().ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(page_size=500, page_token=token),
            metadata=pool.admin.auth,
            timeout=10,
        )
        pages.append(str(page.events))
        token = page.next_page_token
        if not token:
            return "\n".join(pages)


def test_no_secret_a_caller_sends_is_recorded(pool: Pool, client_cert: Any) -> None:
    secret_password = f"hunter2-{uuid.uuid4().hex}"
    kate = pool.new_user("kate")
    since = now()
    # A failed login, a forged token and a forged key, each carrying a distinctive secret.
    refused(
        lambda: pool.login(Account(kate.username, secret_password)), grpc.StatusCode.UNAUTHENTICATED
    )
    forged_token = kate.access[:-8] + "AAAAAAAA"
    refused(lambda: pool.who_am_i(bearer(forged_token)), grpc.StatusCode.UNAUTHENTICATED)
    forged_key = with_checksum(f"npk_{uuid.uuid4().hex[:16]}_{'Z' * 43}")
    refused(lambda: pool.who_am_i(api_key_metadata(forged_key)), grpc.StatusCode.UNAUTHENTICATED)
    # And real ones, used successfully in audited calls.
    key = pool.users().CreateApiKey(pb.CreateApiKeyRequest(name="k"), metadata=kate.auth).secret
    pool.users().LogoutUser(pb.LogoutUserRequest(), metadata=kate.auth, timeout=10)
    pool.expect_audit(USER + "LogoutUser", OK, since, outcome="allowed", username=kate.username)

    log = _everything(pool)
    for secret in (
        secret_password,
        kate.password,
        kate.access,
        kate.refresh,
        forged_token,
        forged_key,
        key,
        key.split("_")[2],  # the secret part alone
        kate.access.split(".")[2],  # the signature alone
    ):
        assert secret not in log


def test_refusals_and_changes_say_who_and_what(pool: Pool, client_cert: Any) -> None:
    leo = pool.new_user("leo")
    since = now()
    refused(
        lambda: pool.users().GrantRole(
            pb.ChangeRoleRequest(username=leo.username, role="admin"), metadata=leo.auth
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    pool.users().UpdateUserProfile(
        pb.UpdateUserProfileRequest(email="leo@example.com"), metadata=leo.auth, timeout=10
    )
    # A successful read is not recorded: auditing every read would drown the log.
    pool.who_am_i(leo.auth)

    [denied] = pool.expect_audit(
        USER + "GrantRole", grpc.StatusCode.PERMISSION_DENIED, since, username=leo.username
    )
    identity = "spiffe://nodepool.test/client/alice-laptop"
    assert denied.principal == identity
    assert denied.peer
    assert denied.detail["code"] == "PERMISSION_DENIED"
    assert denied.detail["reason"] == "permission denied"
    [changed] = pool.expect_audit(
        USER + "UpdateUserProfile", OK, since, outcome="allowed", username=leo.username
    )
    assert changed.principal == identity
    reads = pool.audit().ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(method=USER + "GetUserInfo", since=denied.at),
        metadata=pool.admin.auth,
        timeout=10,
    )
    assert not [event for event in reads.events if event.username == leo.username]


def test_a_bad_page_token_is_bad_input_not_an_internal_error(pool: Pool) -> None:
    error = refused(
        lambda: pool.audit().ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(page_token="../../etc/passwd"),
            metadata=pool.admin.auth,
            timeout=10,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error.details() == "page_token is not valid"


def test_only_admins_read_the_audit_log(pool: Pool) -> None:
    mia = pool.new_user("mia")
    since = now()
    refused(
        lambda: pool.audit().ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(username=mia.username), metadata=mia.auth
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    pool.expect_audit(
        AUDIT + "ListAuditEvents", grpc.StatusCode.PERMISSION_DENIED, since, username=mia.username
    )
