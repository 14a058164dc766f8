"""Open streams are re-checked, and nothing is decoded before the caller is admitted.

Over real mTLS. An open ``Health/Watch`` stream (the only response stream today; the task
delivery stream will rely on the same pipeline property) must end with UNAUTHENTICATED
within two seconds of its certificate being revoked, its session ending, its API key
being revoked or its user being deactivated. A body that is not valid protobuf is refused
INVALID_ARGUMENT, audited, and logs no traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodepool.client import secure_channel
from nodepool.v1 import user_manager_pb2 as pb
from pki import CertificateAuthority
from tests.fixtures.accounts import BACKENDS, USER, Pool, api_key_metadata, now, start_pool
from tests.fixtures.server import running_server, server_settings

TRUST_DOMAIN = "nodepool.test"
# SECURITY.md: an open stream ends within two seconds.
STREAM_DEADLINE = 2.0
WATCH_TIMEOUT = 60.0


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(request, tmp_path_factory.mktemp("streams"), request.param) as pool:
        yield pool


class _Watch:
    """A Health/Watch stream read in a thread; records when and how it ended."""

    def __init__(self, channel: grpc.Channel, metadata: Any = ()) -> None:
        self._stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), metadata=metadata, timeout=WATCH_TIMEOUT
        )
        self.first = threading.Event()
        self.ended_at: float | None = None
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.first.wait(10), "the stream never answered"

    def _read(self) -> None:
        try:
            for _ in self._stream:
                self.first.set()
        except grpc.RpcError as error:
            self.error = error
        self.ended_at = time.monotonic()

    def ended_within(self, started: float) -> grpc.RpcError:
        self._thread.join(WATCH_TIMEOUT)
        assert self.ended_at is not None, "the stream never ended"
        assert self.error is not None, "the stream ended without a status"
        elapsed = self.ended_at - started
        assert elapsed < STREAM_DEADLINE, f"the stream went on for {elapsed:.2f} s"
        return self.error


def test_a_stream_ends_when_its_session_is_logged_out(pool: Pool) -> None:
    uma = pool.new_user("uma")
    watch = _Watch(pool.channel(), uma.auth)
    pool.users().LogoutUser(pb.LogoutUserRequest(), metadata=uma.auth, timeout=10)
    error = watch.ended_within(time.monotonic())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()


def test_a_stream_ends_when_its_api_key_is_revoked(pool: Pool) -> None:
    vic = pool.new_user("vic")
    created = pool.users().CreateApiKey(
        pb.CreateApiKeyRequest(name="watcher"), metadata=vic.auth, timeout=10
    )
    watch = _Watch(pool.channel(), api_key_metadata(created.secret))
    pool.users().RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=created.api_key.key_id), metadata=vic.auth, timeout=10
    )
    error = watch.ended_within(time.monotonic())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()


def test_a_stream_ends_when_its_user_is_deactivated(pool: Pool) -> None:
    wes = pool.new_user("wes")
    watch = _Watch(pool.channel(), wes.auth)
    pool.users().SetUserActive(
        pb.SetUserActiveRequest(username=wes.username, is_active=False),
        metadata=pool.admin.auth,
        timeout=10,
    )
    error = watch.ended_within(time.monotonic())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()


def test_a_stream_ends_when_its_certificate_is_revoked(tmp_path: Path) -> None:
    with CertificateAuthority.init(tmp_path / "ca", trust_domain=TRUST_DOMAIN) as ca:
        server_cert = ca.issue("server", "server", tmp_path / "server", dns_names=["localhost"])
        device = ca.issue("client", "watcher", tmp_path / "clients")
        bystander = ca.issue("client", "bystander", tmp_path / "clients")
        settings = server_settings(ca.directory, server_cert, tmp_path / "data")
        with running_server(settings) as server:
            channels = [
                secure_channel(
                    server.target, cert=issued.cert_path, key=issued.key_path, ca=issued.ca_path
                )
                for issued in (device, bystander)
            ]
            try:
                watch, other = _Watch(channels[0]), _Watch(channels[1])
                assert ca.revoke(serial=device.serial, actor="test")
                error = watch.ended_within(time.monotonic())
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
                assert other.ended_at is None, "a stream of another certificate ended too"
            finally:
                for channel in channels:
                    channel.close()


UNDECODABLE = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length far past the end


def test_undecodable_bodies_are_refused_audited_and_log_no_traceback(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    xena = pool.new_user("xena")
    method = USER + "GetUserInfo"
    raw = pool.channel().unary_unary(method)  # no serializers: the bytes as they are
    since = now()
    caplog.set_level(logging.INFO)
    codes = []
    for _ in range(200):
        with pytest.raises(grpc.RpcError) as raised:
            raw(UNDECODABLE, metadata=xena.auth, timeout=10)
        codes.append(raised.value.code())
        assert raised.value.details() == "the request could not be decoded"
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    pool.expect_audit(
        method,
        grpc.StatusCode.INVALID_ARGUMENT,
        since,
        outcome="failed",
        username=xena.username,
        count=200,
    )
    noisy = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not noisy, f"tracebacks logged: {[r.getMessage() for r in noisy[:3]]}"


def test_an_unadmitted_caller_gets_its_refusal_not_a_decoding_error(pool: Pool) -> None:
    raw = pool.channel().unary_unary(USER + "GetUserInfo")
    with pytest.raises(grpc.RpcError) as raised:
        raw(UNDECODABLE, metadata=(("authorization", "Bearer not-a-token"),), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
