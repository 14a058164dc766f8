"""Failure detection with short timeouts (issue 8 acceptance), on both backends.

The servers here expect a heartbeat every second and declare a node dead after three
silent seconds. Measured against real processes and a real restart:

* a ``nodepool worker`` killed with SIGKILL is offline within NODE_TIMEOUT + 2 s, and not
  before it has really been silent;
* a node that resumes (a worker stopped with SIGSTOP, then continued) is online again on
  its next heartbeat;
* a server restart (same data dir or database, a new process state) marks none of a
  heartbeating fleet offline, while a node that stays silent through it still is;
* each change is a node event: registered, offline, online.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodepool.store import open_store
from nodepool.v1 import node_manager_pb2 as npb
from nodepool.v1 import node_manager_pb2_grpc as ngrpc
from tests.fixtures.accounts import (
    BACKENDS,
    Account,
    Pool,
    _delete_redis_namespace,
    backend_settings,
)
from tests.fixtures.nodes import NodeClient, list_nodes, new_node, node_status, wait_for
from tests.fixtures.server import ServerThread, server_settings

HEARTBEAT_INTERVAL = 1
NODE_TIMEOUT = 3
# The acceptance bound: a dead node is offline within the timeout plus two seconds.
DETECTION_BOUND = NODE_TIMEOUT + 2
BIN = Path(sys.executable).parent


class FailurePool:
    """A server with short node timeouts that a test may restart on the same storage."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    @property
    def admin(self) -> Account:
        return self.pool.admin

    def restart(self, downtime: float) -> float:
        """Stops the server, waits ``downtime`` seconds, and starts a new one on the same
        port, data dir and database; returns the monotonic time the new one was serving."""
        self.pool.server.stop(grace=1.0)
        time.sleep(downtime)
        self.pool.server = ServerThread(self.pool.settings).start()
        return time.monotonic()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def short_timeout_pool(
    request: pytest.FixtureRequest, base: Path, backend: str, *, port: int = 0
) -> Iterator[FailurePool]:
    namespace = f"test-{os.urandom(6).hex()}"
    settings = server_settings(
        request.getfixturevalue("pki_ca").directory,
        request.getfixturevalue("server_cert"),
        base / "data",
        node_heartbeat_interval=HEARTBEAT_INTERVAL,
        node_timeout=NODE_TIMEOUT,
        grpc_port=port,
        **backend_settings(request, backend, namespace),
    )
    with ExitStack() as stack:
        if settings.redis_url:
            stack.callback(_delete_redis_namespace, settings.redis_url, settings.cache_namespace)
        server = ServerThread(settings).start()
        # Whichever server is current at the end (the test may have restarted it).
        stack.callback(lambda: failures.pool.server.stop())
        store = open_store(settings.database_url, run_migrations=False)
        stack.callback(store.close)
        pool = Pool(server, settings, store, request.getfixturevalue("client_cert"), backend)
        stack.callback(pool.close)
        failures = FailurePool(pool)
        pool.admin = pool.new_admin("root-admin")
        yield failures


@pytest.fixture(scope="module", params=BACKENDS)
def failures(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FailurePool]:
    with short_timeout_pool(request, tmp_path_factory.mktemp("failures"), request.param) as pool:
        yield pool


def _events(failures: FailurePool, node_id: str) -> list[str]:
    reply = ngrpc.NodeManagerStub(failures.pool.channel()).GetNodeEvents(
        npb.GetNodeEventsRequest(node_id=node_id), metadata=failures.admin.auth, timeout=10
    )
    return [event.event for event in reversed(reply.events)]  # oldest first


def _status(failures: FailurePool, node_id: str) -> npb.NodeStatus.ValueType | None:
    node = node_status(failures.pool, failures.admin, node_id)
    return None if node is None else node.status


@contextmanager
def _worker(
    failures: FailurePool, node: NodeClient, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPOOL_")}
    env.update(
        NODEPOOL_SERVER=failures.pool.server.target,
        NODEPOOL_CERT=str(node.issued.cert_path),
        NODEPOOL_KEY=str(node.issued.key_path),
        NODEPOOL_CA=str(node.issued.ca_path),
    )
    with log.open("wb") as output:
        process = subprocess.Popen([BIN / "nodepool", "worker"], env=env, stderr=output)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait(timeout=20)


def _wait_beating(failures: FailurePool, node_id: str) -> None:
    """Until the node is online and its heartbeats have reached the database twice."""
    seen: set[Any] = set()

    def beating() -> bool:
        node = node_status(failures.pool, failures.admin, node_id)
        if node is None or node.status != npb.NODE_STATUS_ONLINE:
            return False
        seen.add(node.last_heartbeat.ToNanoseconds())
        return len(seen) >= 3

    wait_for(beating, 30, f"worker {node_id} heartbeating")


def test_a_killed_worker_is_offline_within_the_timeout_plus_two_seconds(
    failures: FailurePool, pki_ca: Any, tmp_path: Path
) -> None:
    owner = failures.pool.unique("owner")
    failures.pool.register(owner)
    node = new_node(failures.pool, pki_ca, tmp_path, owner, "killed")
    with _worker(failures, node, tmp_path / "worker.log") as process:
        _wait_beating(failures, node.node_id)
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        process.wait(timeout=10)
        took = wait_for(
            lambda: _status(failures, node.node_id) == npb.NODE_STATUS_OFFLINE,
            DETECTION_BOUND + 5,  # poll past the bound, so a miss reports its real time
            "killed worker offline",
        )
    took = time.monotonic() - killed
    print(f"killed worker declared offline after {took:.2f} s (bound {DETECTION_BOUND} s)")
    assert took <= DETECTION_BOUND, f"offline after {took:.2f} s, bound {DETECTION_BOUND} s"
    # Not before it was really silent: its last beat came at most one interval before the kill.
    assert took >= NODE_TIMEOUT - HEARTBEAT_INTERVAL - 0.5, f"offline after only {took:.2f} s"
    assert _events(failures, node.node_id) == ["registered", "offline"]


def test_a_node_that_resumes_is_online_on_its_next_heartbeat(
    failures: FailurePool, pki_ca: Any, tmp_path: Path
) -> None:
    owner = failures.pool.unique("owner")
    failures.pool.register(owner)
    node = new_node(failures.pool, pki_ca, tmp_path, owner, "paused")
    with _worker(failures, node, tmp_path / "worker.log") as process:
        _wait_beating(failures, node.node_id)
        process.send_signal(signal.SIGSTOP)  # frozen: no heartbeats, connection kept
        wait_for(
            lambda: _status(failures, node.node_id) == npb.NODE_STATUS_OFFLINE,
            DETECTION_BOUND + 1,
            "paused worker offline",
        )
        process.send_signal(signal.SIGCONT)
        took = wait_for(
            lambda: _status(failures, node.node_id) == npb.NODE_STATUS_ONLINE,
            HEARTBEAT_INTERVAL + 2,
            "resumed worker online",
        )
        print(f"resumed worker online after {took:.2f} s")
        # And it stays online: its beats keep coming.
        time.sleep(NODE_TIMEOUT + 1)
        assert _status(failures, node.node_id) == npb.NODE_STATUS_ONLINE
        assert process.poll() is None
    assert _events(failures, node.node_id) == ["registered", "offline", "online"]
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log


def test_a_resumed_heartbeat_answers_online_at_once(
    failures: FailurePool, pki_ca: Any, tmp_path: Path
) -> None:
    """The first heartbeat after the node was declared dead brings it back, with no wait
    for the write-behind: the change is written before the reply."""
    owner = failures.pool.unique("owner")
    failures.pool.register(owner)
    node = new_node(failures.pool, pki_ca, tmp_path, owner, "silent")
    node.register()
    wait_for(
        lambda: _status(failures, node.node_id) == npb.NODE_STATUS_OFFLINE,
        DETECTION_BOUND + 1,
        "silent node offline",
    )
    node.beat()
    assert _status(failures, node.node_id) == npb.NODE_STATUS_ONLINE
    assert _events(failures, node.node_id) == ["registered", "offline", "online"]


class _Heartbeater(threading.Thread):
    """A node beating every interval, retrying quickly while the server is away."""

    def __init__(self, node: NodeClient) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.stop = threading.Event()
        self.beats = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.node.beat(cpu_percent=1.0)
                self.beats += 1
                wait = HEARTBEAT_INTERVAL * 0.9
            except grpc.RpcError:
                wait = 0.2
            self.stop.wait(wait)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_server_restart_marks_no_live_node_offline(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, pki_ca: Any
) -> None:
    with short_timeout_pool(request, tmp_path, backend, port=_free_port()) as failures:
        pool = failures.pool
        owner = pool.unique("fleet")
        pool.register(owner)
        quiet_owner = pool.unique("quiet")
        pool.register(quiet_owner)
        fleet = [new_node(pool, pki_ca, tmp_path, owner, f"fleet{i}") for i in range(5)]
        for node in fleet:
            node.register()
        # One node stops beating just before the restart: the grace must not hide it.
        silent = new_node(pool, pki_ca, tmp_path, quiet_owner, "silent")
        silent.register()
        beaters = [_Heartbeater(node) for node in fleet]
        for beater in beaters:
            beater.start()
        seen_offline: set[str] = set()
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                try:
                    for node in list_nodes(pool, pool.admin, page_size=1000):
                        if node.status == npb.NODE_STATUS_OFFLINE:
                            seen_offline.add(node.node_id)
                except grpc.RpcError:
                    pass  # the server is restarting
                watching.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            time.sleep(NODE_TIMEOUT + 2)  # past the first server's grace: its detector runs
            assert seen_offline == {silent.node_id}, "only the silent node is dead"
            # Down for longer than the timeout: every beat in the database is stale when the
            # new server starts, so only the restart grace keeps the fleet online.
            restarted = failures.restart(downtime=NODE_TIMEOUT + 1)
            # Through the new server's grace and a full timeout after it.
            time.sleep(2 * NODE_TIMEOUT + 2)
            assert all(beater.beats > 0 for beater in beaters)
            fleet_ids = {node.node_id for node in fleet}
            assert not (seen_offline & fleet_ids), f"falsely offline: {seen_offline & fleet_ids}"
            for node in fleet:
                assert "offline" not in _events(failures, node.node_id), node.node_id
            # The detector of the new server is live: a node that stops now is noticed.
            beaters[0].stop.set()
            beaters[0].join(timeout=10)
            stopped = time.monotonic()
            wait_for(
                lambda: _status(failures, fleet[0].node_id) == npb.NODE_STATUS_OFFLINE,
                DETECTION_BOUND + 1,
                "a node stopped after the restart goes offline",
            )
            assert time.monotonic() - restarted > NODE_TIMEOUT
            print(
                f"after the restart, a stopped node offline in {time.monotonic() - stopped:.2f} s"
            )
        finally:
            watching.set()
            for beater in beaters:
                beater.stop.set()
            watcher.join(timeout=10)
            for beater in beaters:
                beater.join(timeout=10)
        for node in fleet[1:]:
            assert _status(failures, node.node_id) == npb.NODE_STATUS_ONLINE
        assert _events(failures, silent.node_id) == ["registered", "offline"]
