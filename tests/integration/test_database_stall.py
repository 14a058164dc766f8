"""A stalled PostgreSQL: calls that need it answer UNAVAILABLE within the bound, the rest
keep being served, and everything recovers when it comes back.

The stall is real: another connection holds ``LOCK TABLE users IN ACCESS EXCLUSIVE MODE``
in an open transaction, so every statement touching ``users`` waits. The server's bound
(``database_timeout``, 1 s here) must turn that wait into UNAVAILABLE — more calls than the
server has store threads are in flight at once, so queued calls are bounded too — while
health checks and calls served from memory go on answering.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from nodepool.v1 import user_manager_pb2 as pb
from nodepool.v1 import user_manager_pb2_grpc as pb_grpc
from tests.fixtures.server import (
    ServerThread,
    bearer,
    running_server,
    server_settings,
    sign_up,
    user_channel,
)

pytestmark = [pytest.mark.postgres]

BOUND = 1.0
# The bound, plus room for a loaded machine to answer.
DEADLINE = BOUND + 1.5
CALLS_IN_FLIGHT = 12  # more than the server's store threads (max_workers=2)


@pytest.fixture(scope="module")
def stalling_server(
    request: pytest.FixtureRequest, pki_ca: Any, server_cert: Any, tmp_path_factory: Any
) -> Iterator[tuple[ServerThread, str]]:
    url = request.getfixturevalue("postgres_database_factory")()
    settings = server_settings(
        pki_ca.directory,
        server_cert,
        Path(tmp_path_factory.mktemp("stall")) / "data",
        database_url=url,
        database_timeout=BOUND,
        max_workers=2,
    )
    with running_server(settings) as server:
        yield server, url


def _lock_users(url: str) -> psycopg.Connection[Any]:
    libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = psycopg.connect(libpq)  # a transaction stays open until rollback
    conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    return conn


def _timed(call: Callable[[], Any]) -> tuple[grpc.StatusCode, float]:
    started = time.monotonic()
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    return code, time.monotonic() - started


def test_a_stalled_database_fails_calls_within_the_bound_and_health_keeps_serving(
    stalling_server: tuple[ServerThread, str], client_cert: Any
) -> None:
    server, url = stalling_server
    login = sign_up(server, client_cert, "stella")
    metadata = bearer(login.access_token)
    with user_channel(server, client_cert) as channel:
        users = pb_grpc.UserManagerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def list_keys() -> Any:
            return users.ListApiKeys(pb.ListApiKeysRequest(), metadata=metadata, timeout=30)

        def who_am_i() -> Any:
            return users.GetUserInfo(pb.GetUserInfoRequest(), metadata=metadata, timeout=30)

        def check() -> Any:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=30)

        list_keys()
        who_am_i()  # the profile and the credential are now in memory

        lock = _lock_users(url)
        try:
            with ThreadPoolExecutor(CALLS_IN_FLIGHT) as pool:
                stalled = [pool.submit(_timed, list_keys) for _ in range(CALLS_IN_FLIGHT)]
                # While every store thread is stuck and more calls queue behind them:
                time.sleep(0.2)
                for call in (check, who_am_i):
                    code, elapsed = _timed(call)
                    assert code == grpc.StatusCode.OK
                    assert elapsed < 0.5, f"a call needing no database waited {elapsed:.2f} s"
                assert check().status == health_pb2.HealthCheckResponse.SERVING
                outcomes = [future.result() for future in stalled]
        finally:
            lock.rollback()
            lock.close()

        for code, elapsed in outcomes:
            assert code == grpc.StatusCode.UNAVAILABLE
            assert elapsed < DEADLINE, f"a stalled call took {elapsed:.2f} s"

        # Back by itself once the database answers again.
        started = time.monotonic()
        while _timed(list_keys)[0] != grpc.StatusCode.OK:
            assert time.monotonic() - started < 10, "the server did not recover"
            time.sleep(0.1)
