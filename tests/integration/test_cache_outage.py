"""A Redis outage mid-run: calls answer UNAVAILABLE, with one warning rather than a
traceback per call, and work again by themselves when Redis is back.

The test runs a Redis server of its own on a free port, so stopping it disturbs no one.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nodepool.v1 import user_manager_pb2 as pb
from tests.fixtures.accounts import Account, start_pool

RECOVERY_DEADLINE = 15.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Redis:
    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for this test"
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self._process = subprocess.Popen(
            [*command, "--appendonly", "no", "--dir", str(self._directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[_Redis]:
    server = _Redis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_login_fails_cleanly_while_redis_is_down_and_recovers(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    own_redis: _Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with start_pool(
        request, tmp_path, "memory", redis_url=own_redis.url, cache_namespace="outage"
    ) as pool:
        alice = Account(pool.unique("alice"))
        pool.register(alice.username)
        assert pool.login(alice).access

        caplog.clear()
        caplog.set_level(logging.WARNING)
        own_redis.stop()
        login = lambda: pool.login(Account(alice.username))  # noqa: E731
        sign_up = lambda: pool.register(pool.unique("bob"))  # noqa: E731
        for _ in range(5):
            assert _code(login) == grpc.StatusCode.UNAVAILABLE
            assert _code(sign_up) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as raised:
            login()
        assert raised.value.details() == "service temporarily unavailable"
        # A token call fails closed too, once the subscription is noticed lost.
        deadline = time.monotonic() + RECOVERY_DEADLINE
        while _code(lambda: pool.who_am_i(alice.auth)) != grpc.StatusCode.UNAVAILABLE:
            assert time.monotonic() < deadline, "token calls never noticed the outage"
            time.sleep(0.2)

        # One warning for the outage, not a traceback per call.
        outage = [r for r in caplog.records if r.name == "nodepool.status"]
        assert len(outage) == 1, [r.getMessage() for r in outage]
        assert not [r for r in caplog.records if r.exc_info and r.name == "nodepool.status"]

        own_redis.start()  # same port, empty: Node Pool is not restarted
        deadline = time.monotonic() + RECOVERY_DEADLINE
        while _code(login) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "login never recovered"
            time.sleep(0.2)
        assert pool.login(Account(alice.username)).access
        pool.register(pool.unique("carol"))
        while _code(lambda: pool.who_am_i(pool.admin.auth)) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "token calls never recovered"
            time.sleep(0.2)
        assert (
            pool.users()
            .GetUserInfo(pb.GetUserInfoRequest(), metadata=pool.login(alice).auth, timeout=10)
            .user.username
            == alice.username
        )
