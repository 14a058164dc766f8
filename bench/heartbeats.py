"""Heartbeats (``NodeManager.UpdateNodeStatus``) through a real ``nodepool serve``.

Two modes, both against real server processes on 127.0.0.1 with certificates from a
temporary CA made with our ``pki`` package:

``throughput`` (default)
    A ``nodepool serve`` (the full pipeline, the node registry, write-behind to the
    database) against a bare ``grpc.aio`` mTLS server answering ``UpdateNodeStatus`` with
    a constant reply, in the same run, from the same client: one process, a pool of
    registered nodes (each with its own certificate and its own channel to each server),
    64 calls in flight spread over those channels, rounds interleaved (full/bare, then
    bare/full, ...). Prints calls/s, p50/p99, the server's CPU time per call (from
    ``/proc``) and the ratio full/bare (median over rounds). Acceptance: >= 0.6.

``fleet``
    N simulated nodes (default 10,000), each with its own certificate and its own
    connection, split over several client processes. Every node registers, then
    heartbeats every 30 s with jitter (x 0.8-1.0, as ``nodepool worker`` does) for
    ``--duration`` seconds. Reports heartbeats sent and failed, p50/p99 latency, nodes
    falsely marked offline (the database: nodes with status offline, ``node_events``
    with event offline), the server's peak RSS (VmHWM) and CPU seconds. Acceptance
    (10,000 nodes): zero failed, zero false offline, p99 < 100 ms, RSS < 1.5 GiB.

``--backend sqlite`` (the embedded cache), ``postgres`` (a throwaway database on
127.0.0.1:5432 as user postgres, dropped afterwards, plus Redis on 127.0.0.1:6379 with a
unique cache namespace, cleaned afterwards), or ``both``.

    python bench/heartbeats.py [throughput] [--backend sqlite|postgres|both]
                               [--rounds 5] [--seconds 5] [--concurrency 64] [--nodes 256]
                               [--no-pin]
    python bench/heartbeats.py fleet [--backend ...] [--nodes 10000] [--duration 180]
                                     [--interval 30] [--node-timeout 120] [--clients N]
                                     [--trace FILE]

Everything lives in temporary directories, only 127.0.0.1 is contacted, every loop is
bounded in count and time, and every process started here is stopped (SIGTERM, then
SIGKILL). Exit status: 0 when the acceptance bounds hold, 1 when not, 2 when the bench
itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import queue
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nodepool.v1 import node_manager_pb2 as pb
from nodepool.v1 import node_manager_pb2_grpc as pb_grpc
from pki import CertificateAuthority

TRUST_DOMAIN = "nodepool.bench"
OWNER = "benchowner"
SERVER_NAME = "bench-server"
NODES_PER_DIR = 500
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"

# Acceptance bounds (issue 8).
MIN_THROUGHPUT_RATIO = 0.6
MAX_FLEET_P99 = 0.100
MAX_FLEET_RSS = int(1.5 * 1024**3)
ACCEPTANCE_NODES = 10_000

WARMUP_SECONDS = 2.0
STARTUP_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
THROUGHPUT_CALL_TIMEOUT = 5.0
FLEET_CALL_TIMEOUT = 10.0
REGISTER_TIMEOUT = 30.0
REGISTER_ATTEMPTS = 3
# RegisterNode is a database write: this many in flight in all (the server's store calls
# give up after 5 s in their queue).
REGISTER_CONCURRENCY = 32
# A client process holds at most this many node channels (one socket each, well below
# the 20,000 open files a process may hold here).
NODES_PER_CLIENT = 2500
# The worker's jitter: each wait is interval x uniform(0.8, 1.0).
JITTER = (0.8, 1.0)
PROGRESS_SECONDS = 30.0

# As NodePoolServer (nodepool/server/app.py) sets them.
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.http2.max_pings_without_data", 0),
)
# As nodepool.client builds channels, plus a subchannel pool per channel: each node gets
# a connection of its own, never one shared with another channel.
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),
)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(RuntimeError):
    """The bench could not measure; the message says why."""


# --------------------------------------------------------------------------- small helpers


def _percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (the ``inclusive`` method)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (every thread), from /proc; None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _machine_busy() -> float | None:
    """CPU seconds spent busy by the whole machine (all cores), from /proc; None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / _CLOCK_TICKS


def _memory(pid: int, key: str) -> int | None:
    """A ``Vm*`` line of /proc/<pid>/status in bytes (VmRSS now, VmHWM the peak)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**2:,.0f} MiB"


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.2f} ms"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _raise_nofile() -> int:
    """Raise this process's soft open-files limit to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return int(soft)


def _pin_threads(pid: int, cores: set[int]) -> None:
    """Pin every thread of ``pid`` (affinity is per thread; new threads inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cores)


def _affinity(cores: set[int] | None) -> Any:
    """A ``preexec_fn`` that pins a child before it starts any thread, or None."""
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, cores)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest))

    print(line(header))
    print(line(tuple("-" * width for width in widths)))
    for row in rows:
        print(line(row))


def _stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Layout:
    """The CA and certificates (in memory when /dev/shm exists), and the server's data."""

    pki_root: Path
    workdir: Path

    @property
    def ca_dir(self) -> Path:
        return self.pki_root / "ca"

    @property
    def server_dir(self) -> Path:
        return self.pki_root / "server"

    @property
    def nodes_dir(self) -> Path:
        return self.pki_root / "nodes"

    def node_id(self, index: int) -> str:
        return f"node-{index:05d}"

    def node_dir(self, index: int) -> Path:
        return self.nodes_dir / f"{index // NODES_PER_DIR:03d}"

    def node_files(self, index: int) -> tuple[str, Path, Path, Path]:
        """(node id, certificate, key, CA bundle)."""
        node_id, folder = self.node_id(index), self.node_dir(index)
        return node_id, folder / f"{node_id}.crt", folder / f"{node_id}.key", folder / "ca.crt"


def _issue_range(ca_dir: str, pki_root: str, start: int, stop: int) -> int:
    """Runs in a worker process: issue node certificates ``start``..``stop - 1``."""
    layout = Layout(Path(pki_root), Path(pki_root))
    with CertificateAuthority.open(Path(ca_dir)) as ca:
        for index in range(start, stop):
            ca.issue("node", layout.node_id(index), layout.node_dir(index), owner=OWNER)
    return stop - start


def _issue_certificates(layout: Layout, nodes: int) -> float:
    """The CA, the server certificate and ``nodes`` node certificates; returns seconds."""
    with CertificateAuthority.init(layout.ca_dir, trust_domain=TRUST_DOMAIN) as ca:
        ca.issue(
            "server",
            SERVER_NAME,
            layout.server_dir,
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
        )
    started = time.perf_counter()
    # Each certificate is a fresh P-256 key, a signature, one pki.db transaction and three
    # small files: ~6 ms of CPU, so spread over processes (one per core).
    workers = max(1, min(os.cpu_count() or 1, 8))
    chunk = 250
    ranges = [(start, min(start + chunk, nodes)) for start in range(0, nodes, chunk)]
    if workers == 1 or nodes <= chunk:
        for start, stop in ranges:
            _issue_range(str(layout.ca_dir), str(layout.pki_root), start, stop)
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = [
                pool.submit(_issue_range, str(layout.ca_dir), str(layout.pki_root), a, b)
                for a, b in ranges
            ]
            done = 0
            for future in concurrent.futures.as_completed(futures):
                done += future.result()
                if done % 2000 == 0 and done < nodes:
                    print(f"  {done:,}/{nodes:,} certificates", flush=True)
    return time.perf_counter() - started


def _node_credentials(layout: Layout, index: int) -> grpc.ChannelCredentials:
    _, cert, key, ca = layout.node_files(index)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )


def _register_request(node_id: str) -> pb.RegisterNodeRequest:
    return pb.RegisterNodeRequest(
        node_id=node_id,
        ip_address="127.0.0.1",
        port=0,
        cpu_cores=4,
        memory_gb=8.0,
        disk_gb=100.0,
        labels={"bench": "heartbeats"},
    )


def _heartbeat_request(node_id: str, rng: random.Random) -> pb.UpdateNodeStatusRequest:
    return pb.UpdateNodeStatusRequest(
        node_id=node_id,
        status=pb.NODE_STATUS_ONLINE,
        metrics=pb.NodeMetrics(
            cpu_percent=round(rng.uniform(1, 90), 1),
            memory_percent=round(rng.uniform(10, 80), 1),
            disk_percent=round(rng.uniform(10, 70), 1),
            load_average=round(rng.uniform(0, 4), 2),
            running_tasks=0,
        ),
    )


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """Where one ``nodepool serve`` keeps its state."""

    name: str
    database_url: str
    redis_url: str | None = None
    cache_namespace: str = "nodepool"

    def env(self) -> dict[str, str]:
        env = {"NODEPOOL_DATABASE_URL": self.database_url}
        if self.redis_url:
            env["NODEPOOL_REDIS_URL"] = self.redis_url
        env["NODEPOOL_CACHE_NAMESPACE"] = self.cache_namespace
        return env


@contextmanager
def _backend(name: str, data_dir: Path) -> Iterator[Backend]:
    """A fresh database (and cache namespace) for one server, removed afterwards."""
    if name == "sqlite":
        data_dir.mkdir(parents=True, exist_ok=True)
        yield Backend("sqlite", f"sqlite:///{data_dir / 'nodepool.db'}")
        return
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    token = uuid.uuid4().hex[:12]
    database = f"nodepool_bench_{token}"
    namespace = f"nodepool-bench-{token}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
    except psycopg.Error as error:
        raise BenchError(f"PostgreSQL at {POSTGRES_ADMIN_URL}: {error}".strip()) from None
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
        try:
            client.ping()
        except redis.RedisError as error:
            raise BenchError(f"Redis at {REDIS_URL}: {error}") from None
        url = make_url(POSTGRES_ADMIN_URL).set(database=database)
        yield Backend(
            "postgres",
            url.render_as_string(hide_password=False),
            REDIS_URL,
            namespace,
        )
    finally:
        with contextlib.suppress(Exception):
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
            client.close()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _create_owner(database_url: str) -> None:
    """The nodes' owner, written to the database before the server starts (no login)."""
    from nodepool.store import open_store

    store = open_store(database_url)
    try:
        # Never used to log in: node certificates are the nodes' whole credential.
        store.create_user(OWNER, "!bench-no-password", roles=("user",))
    finally:
        store.close()


def _offline_counts(database_url: str) -> dict[str, Any]:
    """Nodes the server marked offline, and the oldest stored heartbeat."""
    from sqlalchemy import create_engine, text

    from nodepool.store.engine import normalize_url

    engine = create_engine(normalize_url(database_url))
    try:
        with engine.connect() as conn:
            offline = conn.scalar(text("SELECT count(*) FROM nodes WHERE status = 'offline'"))
            events = conn.scalar(
                text("SELECT count(DISTINCT node_id) FROM node_events WHERE event = 'offline'")
            )
            total = conn.scalar(text("SELECT count(*) FROM nodes"))
            oldest = conn.scalar(text("SELECT min(last_heartbeat) FROM nodes"))
    finally:
        engine.dispose()
    if isinstance(oldest, str):
        oldest = datetime.fromisoformat(oldest)
    age = None
    if isinstance(oldest, datetime):
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        age = (datetime.now(UTC) - oldest).total_seconds()
    return {
        "nodes": int(total or 0),
        "offline": int(offline or 0),
        "offline_events": int(events or 0),
        "oldest_heartbeat_age": age,
    }


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[Any]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return _log_tail(self.log_path)


async def _wait_serving(server: Server, credentials: grpc.ChannelCredentials) -> None:
    """Health checks (a node certificate may probe) until SERVING, bounded in time."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with grpc.aio.secure_channel(server.target, credentials, list(CHANNEL_OPTIONS)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if server.process.poll() is not None:
                raise BenchError(
                    f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
                )
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise BenchError(
                        f"{server.name} answered {error.code().name}: {error.details()}\n"
                        f"{server.log_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{server.name} not serving after {STARTUP_TIMEOUT:.0f} s:\n"
                        f"{server.log_tail()}"
                    ) from None
            await asyncio.sleep(0.2)


@contextmanager
def _nodepool_serve(
    layout: Layout,
    backend: Backend,
    extra_env: dict[str, str],
    log_name: str,
    cores: set[int] | None = None,
) -> Iterator[Server]:
    """A real ``nodepool serve`` over ``backend`` (call :func:`_wait_serving` next)."""
    executable = Path(sys.executable).parent / "nodepool"
    if not executable.is_file():
        raise BenchError(f"no nodepool console script next to {sys.executable}")
    _create_owner(backend.database_url)
    port = _free_port()
    # The caller's own NODEPOOL_* settings must not leak into the measured server.
    env = {key: value for key, value in os.environ.items() if not key.startswith("NODEPOOL_")}
    env.update(
        NODEPOOL_PKI_DIR=str(layout.ca_dir),
        NODEPOOL_TLS_CERT=str(layout.server_dir / f"{SERVER_NAME}.crt"),
        NODEPOOL_TLS_KEY=str(layout.server_dir / f"{SERVER_NAME}.key"),
        NODEPOOL_TLS_CA=str(layout.server_dir / "ca.crt"),
        NODEPOOL_DATA_DIR=str(layout.workdir / f"data-{backend.name}"),
        NODEPOOL_TRUST_DOMAIN=TRUST_DOMAIN,
        NODEPOOL_GRPC_HOST="127.0.0.1",
        NODEPOOL_GRPC_PORT=str(port),
        NODEPOOL_MAX_NODES_PER_USER="100000",
        NODEPOOL_LOG_LEVEL="WARNING",
        NODEPOOL_SHUTDOWN_GRACE="2",
        **backend.env(),
        **extra_env,
    )
    log_path = layout.workdir / f"{log_name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(executable), "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Pinned before exec: every thread the server starts inherits the core.
            preexec_fn=_affinity(cores),
        )
    try:
        yield Server(f"nodepool serve ({backend.name})", port, process, log_path)
    finally:
        _stop_process(process)


class BareNodeManager(pb_grpc.NodeManagerServicer):
    """The bare server: the same method and messages, a constant answer, no pipeline."""

    def __init__(self) -> None:
        self._reply = pb.UpdateNodeStatusResponse(success=True, heartbeat_interval_seconds=30)

    async def UpdateNodeStatus(
        self, request: pb.UpdateNodeStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UpdateNodeStatusResponse:
        return self._reply


async def _serve_bare(pki_root: Path, port: int) -> None:
    """``--serve-bare``: mTLS as ``NodePoolServer`` (client certificate required)."""
    from nodepool.server.tls import TlsFiles, TlsReloader

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    layout = Layout(pki_root, pki_root)
    tls = TlsReloader(
        TlsFiles(
            layout.server_dir / f"{SERVER_NAME}.crt",
            layout.server_dir / f"{SERVER_NAME}.key",
            layout.server_dir / "ca.crt",
        )
    )
    server = grpc.aio.server(options=list(SERVER_OPTIONS))
    # Only UpdateNodeStatus is called; the rest keep the generated UNIMPLEMENTED.
    pb_grpc.add_NodeManagerServicer_to_server(BareNodeManager(), server)  # type: ignore[abstract]
    # grpc_health exports its asyncio servicer as health.aio; the stubs predate it.
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_secure_port(f"127.0.0.1:{port}", tls.credentials()) == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    # EOF on stdin: the parent is gone or done.
    threading.Thread(
        target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set)), daemon=True
    ).start()
    try:
        await done.wait()
    finally:
        await server.stop(1)


@contextmanager
def _bare_server(layout: Layout, cores: set[int] | None = None) -> Iterator[Server]:
    port = _free_port()
    log_path = layout.workdir / "bare.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve-bare",
                str(layout.pki_root),
                "--port",
                str(port),
            ],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Pinned before exec: every thread the server starts inherits the core.
            preexec_fn=_affinity(cores),
        )
    try:
        yield Server("bare grpc.aio", port, process, log_path)
    finally:
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        _stop_process(process)


# --------------------------------------------------------------------------- throughput


@dataclass
class Round:
    mode: str
    index: int
    calls: int
    seconds: float
    latencies: list[float]
    server_cpu: float | None
    client_cpu: float
    other_cores: float | None

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def latency(self, fraction: float) -> float:
        return _percentile(self.latencies, fraction)

    @property
    def server_cpu_us(self) -> float | None:
        return None if self.server_cpu is None else self.server_cpu / self.calls * 1e6

    @property
    def client_cpu_us(self) -> float:
        return self.client_cpu / self.calls * 1e6


class NodePool:
    """One channel per node to one server, with a prepared heartbeat per node."""

    def __init__(self, layout: Layout, server: Server, nodes: int) -> None:
        rng = random.Random(7)
        self.server = server
        self.channels = [
            grpc.aio.secure_channel(
                server.target, _node_credentials(layout, index), list(CHANNEL_OPTIONS)
            )
            for index in range(nodes)
        ]
        self.stubs = [pb_grpc.NodeManagerStub(channel) for channel in self.channels]
        self.node_ids = [layout.node_id(index) for index in range(nodes)]
        self.requests = [_heartbeat_request(node_id, rng) for node_id in self.node_ids]

    async def register(self) -> None:
        semaphore = asyncio.Semaphore(REGISTER_CONCURRENCY)

        async def one(index: int) -> None:
            async with semaphore:
                try:
                    await self.stubs[index].RegisterNode(
                        _register_request(self.node_ids[index]), timeout=REGISTER_TIMEOUT
                    )
                except grpc.aio.AioRpcError as error:
                    raise BenchError(
                        f"{self.node_ids[index]}: RegisterNode failed on {self.server.name}: "
                        f"{error.code().name}: {error.details()}"
                    ) from None

        await asyncio.gather(*(one(index) for index in range(len(self.stubs))))

    async def load(self, seconds: float, concurrency: int) -> tuple[int, float, list[float]]:
        """``concurrency`` callers back to back, each cycling over its share of the nodes."""
        latencies: list[float] = []
        started = time.perf_counter()
        stop_at = started + seconds
        count = len(self.stubs)

        async def caller(first: int) -> None:
            index = first
            while (begun := time.perf_counter()) < stop_at:
                try:
                    await self.stubs[index].UpdateNodeStatus(
                        self.requests[index], timeout=THROUGHPUT_CALL_TIMEOUT
                    )
                except grpc.aio.AioRpcError as error:
                    raise BenchError(
                        f"a heartbeat failed on {self.server.name}: "
                        f"{error.code().name}: {error.details()}"
                    ) from None
                latencies.append(time.perf_counter() - begun)
                index = (index + concurrency) % count

        await asyncio.gather(*(caller(first % count) for first in range(concurrency)))
        return len(latencies), time.perf_counter() - started, latencies

    async def close(self) -> None:
        await asyncio.gather(*(channel.close(None) for channel in self.channels))


async def _measure_throughput(
    pools: dict[str, NodePool], seconds: float, rounds: int, concurrency: int
) -> list[Round]:
    modes = tuple(pools)
    for mode in modes:
        await pools[mode].load(WARMUP_SECONDS, concurrency)
    results: list[Round] = []
    for index in range(1, rounds + 1):
        # full/bare, then bare/full: a linear drift weighs on both modes alike.
        order = modes if index % 2 else tuple(reversed(modes))
        for mode in order:
            pid = pools[mode].server.pid
            before = (_process_cpu(pid), time.process_time(), _machine_busy())
            calls, elapsed, latencies = await pools[mode].load(seconds, concurrency)
            after = (_process_cpu(pid), time.process_time(), _machine_busy())
            server_cpu = None if before[0] is None or after[0] is None else after[0] - before[0]
            client_cpu = after[1] - before[1]
            others = None
            if before[2] is not None and after[2] is not None:
                busy = after[2] - before[2]
                others = (busy - (server_cpu or 0.0) - client_cpu) / elapsed
            result = Round(mode, index, calls, elapsed, latencies, server_cpu, client_cpu, others)
            results.append(result)
            print(_round_line(result), flush=True)
    return results


def _round_line(result: Round) -> str:
    cpu = "-" if result.server_cpu_us is None else f"{result.server_cpu_us:.0f} us"
    others = "-" if result.other_cores is None else f"{result.other_cores:.1f}"
    return (
        f"round {result.index} {result.mode:<4}: {result.throughput:7.0f} calls/s  "
        f"p50 {_ms(result.latency(0.50))}  p99 {_ms(result.latency(0.99))}  "
        f"server CPU {cpu}/call  client CPU {result.client_cpu_us:.0f} us/call  "
        f"other load {others} cores"
    )


def _throughput_report(backend: str, results: Sequence[Round], concurrency: int) -> bool:
    def summary(mode: str) -> tuple[float, float, float, float | None, float]:
        mine = [r for r in results if r.mode == mode]
        cpus = [r.server_cpu_us for r in mine if r.server_cpu_us is not None]
        return (
            statistics.median(r.throughput for r in mine),
            statistics.median(r.latency(0.50) for r in mine),
            statistics.median(r.latency(0.99) for r in mine),
            statistics.median(cpus) if cpus else None,
            statistics.median(r.client_cpu_us for r in mine),
        )

    full, bare = summary("full"), summary("bare")
    print()
    print(
        f"UpdateNodeStatus on {backend}, concurrency {concurrency}, "
        f"median of {len(results) // 2} rounds per mode"
    )
    _table(
        ("mode", "calls/s", "p50", "p99", "server CPU/call", "client CPU/call"),
        [
            (
                mode,
                f"{values[0]:,.0f}",
                _ms(values[1]),
                _ms(values[2]),
                "-" if values[3] is None else f"{values[3]:.0f} us",
                f"{values[4]:.0f} us",
            )
            for mode, values in (("full", full), ("bare", bare))
        ],
    )
    ratio = full[0] / bare[0]
    # Each round's full and bare ran back to back: their ratio is the least disturbed by
    # load that comes and goes on the machine.
    pairs = [
        f.throughput / b.throughput
        for f in results
        for b in results
        if f.mode == "full" and b.mode == "bare" and f.index == b.index
    ]
    print(
        f"throughput full/bare: {ratio:.3f}   (median of per-round ratios "
        f"{statistics.median(pairs):.3f}, range {min(pairs):.3f}-{max(pairs):.3f})"
    )
    print(f"p99 full/bare:        {full[2] / bare[2]:.3f}")
    if full[3] is not None and bare[3] is not None:
        print(f"server CPU per call:  +{full[3] - bare[3]:.0f} us with the full server")
    ok = ratio >= MIN_THROUGHPUT_RATIO
    print(
        f"[{backend}] throughput full >= {MIN_THROUGHPUT_RATIO:g} x bare: "
        f"{'yes' if ok else 'no'} ({ratio:.3f})"
    )
    return ok


def run_throughput(args: argparse.Namespace) -> bool:
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    with ExitStack() as stack:
        layout = _layouts(stack)
        print(f"issuing {args.nodes} node certificates ...", flush=True)
        took = _issue_certificates(layout, args.nodes)
        print(f"  {took:.1f} s ({took / args.nodes * 1000:.1f} ms per certificate)", flush=True)
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        server_cores: set[int] | None = None
        if args.pin and len(cores) >= 2:
            # The client on one core, the servers on another: the server is the bottleneck
            # in both modes, and the split is the same for both.
            server_cores = {cores[1]}
            _pin_threads(os.getpid(), {cores[0]})
            print(f"client pinned to core {cores[0]}, servers to core {cores[1]}", flush=True)
        bare = stack.enter_context(_bare_server(layout, server_cores))
        verdicts: list[bool] = []
        for backend_name in backends:
            backend = stack.enter_context(
                _backend(backend_name, layout.workdir / f"data-{backend_name}")
            )
            with _nodepool_serve(
                layout, backend, {}, f"server-{backend_name}", server_cores
            ) as full:
                results = asyncio.run(_throughput_backend(layout, full, bare, args))
            verdicts.append(_throughput_report(backend_name, results, args.concurrency))
            print()
        return all(verdicts)


async def _throughput_backend(
    layout: Layout, full: Server, bare: Server, args: argparse.Namespace
) -> list[Round]:
    probe = _node_credentials(layout, 0)
    await _wait_serving(full, probe)
    await _wait_serving(bare, probe)
    pools = {"full": NodePool(layout, full, args.nodes), "bare": NodePool(layout, bare, args.nodes)}
    try:
        started = time.perf_counter()
        await pools["full"].register()
        print(
            f"{args.nodes} nodes registered on {full.name} in "
            f"{time.perf_counter() - started:.1f} s; {args.rounds} rounds x {args.seconds:g} s "
            f"per mode, {args.concurrency} in flight over {args.nodes} node channels per server",
            flush=True,
        )
        return await _measure_throughput(pools, args.seconds, args.rounds, args.concurrency)
    finally:
        for pool in pools.values():
            await pool.close()


# --------------------------------------------------------------------------- fleet: client


@dataclass
class NodeTally:
    registered: int = 0
    register_failed: Counter[str] = field(default_factory=Counter)
    register_latencies: list[float] = field(default_factory=list)
    # (wall-clock start, latency seconds or None when the call failed)
    beats: list[tuple[float, float | None]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0


async def _fleet_client(spec: dict[str, Any]) -> None:
    """``--fleet-client SPEC``: one process's share of the fleet; JSON lines on stdout."""
    limit = _raise_nofile()
    layout = Layout(Path(spec["pki_root"]), Path(spec["pki_root"]))
    indices: list[int] = spec["indices"]
    if len(indices) + 200 > limit:
        raise SystemExit(f"{len(indices)} channels do not fit in {limit} open files")
    interval: float = spec["interval"]
    target: str = spec["target"]
    rng = random.Random(spec["seed"])
    loop = asyncio.get_running_loop()
    tally = NodeTally()
    window: dict[str, float] = {}
    go = asyncio.Event()
    # Bounded even if the parent never answers: the whole run ends by this time.
    hard_end = time.time() + spec["max_seconds"]

    def emit(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def read_commands() -> None:
        for line in sys.stdin:
            parts = line.split()
            if parts and parts[0] == "go":
                window["steady"], window["end"] = float(parts[1]), float(parts[2])
                loop.call_soon_threadsafe(go.set)
        # EOF: the parent is gone; stop now.
        window.setdefault("end", 0.0)
        window["end"] = min(window["end"], time.time())
        loop.call_soon_threadsafe(go.set)

    def end_time() -> float:
        return float(min(window.get("end", hard_end), hard_end))

    channels = [
        grpc.aio.secure_channel(target, _node_credentials(layout, index), list(CHANNEL_OPTIONS))
        for index in indices
    ]
    semaphore = asyncio.Semaphore(spec["register_concurrency"])
    registered_all = asyncio.Event()
    pending_registrations = len(indices)

    async def node(index: int, channel: grpc.aio.Channel) -> None:
        nonlocal pending_registrations
        node_id = layout.node_id(index)
        stub = pb_grpc.NodeManagerStub(channel)
        registered = False
        try:
            async with semaphore:
                for attempt in range(REGISTER_ATTEMPTS):
                    begun = time.perf_counter()
                    try:
                        await stub.RegisterNode(
                            _register_request(node_id), timeout=REGISTER_TIMEOUT
                        )
                        tally.register_latencies.append(time.perf_counter() - begun)
                        registered = True
                        break
                    except grpc.aio.AioRpcError as error:
                        tally.register_failed[error.code().name] += 1
                        await asyncio.sleep(0.5 * (attempt + 1))
        finally:
            pending_registrations -= 1
            if pending_registrations == 0:
                registered_all.set()
        if not registered:
            return
        tally.registered += 1
        request = _heartbeat_request(node_id, rng)
        # The first beat anywhere in the first interval: a fleet that started together
        # does not beat together.
        next_at = time.time() + interval * rng.random()
        while next_at < end_time():
            await asyncio.sleep(max(0.0, next_at - time.time()))
            if next_at >= end_time():
                break
            started_wall, begun = time.time(), time.perf_counter()
            tally.in_flight += 1
            try:
                await stub.UpdateNodeStatus(request, timeout=FLEET_CALL_TIMEOUT)
                tally.beats.append((started_wall, time.perf_counter() - begun))
            except grpc.aio.AioRpcError as error:
                tally.beats.append((started_wall, None))
                tally.failures[error.code().name] += 1
            finally:
                tally.in_flight -= 1
            next_at += interval * rng.uniform(*JITTER)

    started = time.perf_counter()
    tasks = [
        asyncio.create_task(node(index, channel))
        for index, channel in zip(indices, channels, strict=True)
    ]
    await asyncio.wait_for(registered_all.wait(), timeout=max(1.0, hard_end - time.time()))
    emit(
        {
            "event": "registered",
            "registered": tally.registered,
            "failed": dict(tally.register_failed),
            "seconds": time.perf_counter() - started,
            "p50": _percentile(tally.register_latencies, 0.5),
            "p99": _percentile(tally.register_latencies, 0.99),
            "rss": _memory(os.getpid(), "VmRSS"),
        }
    )
    threading.Thread(target=read_commands, daemon=True).start()
    await asyncio.wait_for(go.wait(), timeout=max(1.0, hard_end - time.time()))
    # Every beat starts before the end; each ends within its call timeout.
    remaining = max(0.0, end_time() - time.time()) + FLEET_CALL_TIMEOUT + 5.0
    _, sleeping = await asyncio.wait(tasks, timeout=remaining)
    cut_in_flight = tally.in_flight
    for task in sleeping:  # waiting for a beat that would fall after the end
        task.cancel()
    await asyncio.gather(*sleeping, return_exceptions=True)
    steady = window.get("steady", math.inf)
    in_window = [(at, latency) for at, latency in tally.beats if at >= steady]
    emit(
        {
            "event": "done",
            "sent": len(in_window),
            "failed": sum(1 for _, latency in in_window if latency is None),
            "latencies": [round(lat, 6) for _, lat in in_window if lat is not None],
            "trace": [(round(at, 3), lat) for at, lat in in_window] if spec["trace"] else [],
            "before_sent": len(tally.beats) - len(in_window),
            "before_failed": sum(1 for at, lat in tally.beats if at < steady and lat is None),
            "failures": dict(tally.failures),
            "cut_in_flight": cut_in_flight,
            "rss_peak": _memory(os.getpid(), "VmHWM"),
        }
    )
    await asyncio.gather(*(channel.close(None) for channel in channels))


# --------------------------------------------------------------------------- fleet: parent


class ClientProcess:
    """One fleet client process; its JSON lines arrive on a queue read by a thread."""

    def __init__(self, name: str, process: subprocess.Popen[str], log_path: Path) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, event: str, deadline: float) -> dict[str, Any]:
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(
                    f"{self.name}: no '{event}' in time\n{_log_tail(self.log_path)}"
                ) from None
            if line is None:
                raise BenchError(
                    f"{self.name} exited ({self.process.poll()}) before '{event}'\n"
                    f"{_log_tail(self.log_path)}"
                )
            message: dict[str, Any] = json.loads(line)
            if message.get("event") == event:
                return message

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        _stop_process(self.process)


@contextmanager
def _fleet_clients(
    layout: Layout, server: Server, args: argparse.Namespace, max_seconds: float
) -> Iterator[list[ClientProcess]]:
    count = args.clients or max(1, math.ceil(args.nodes / NODES_PER_CLIENT))
    shares = [list(range(args.nodes))[part::count] for part in range(count)]
    clients: list[ClientProcess] = []
    try:
        for part, indices in enumerate(shares):
            spec = layout.workdir / f"client-{part}.json"
            spec.write_text(
                json.dumps(
                    {
                        "pki_root": str(layout.pki_root),
                        "target": server.target,
                        "indices": indices,
                        "interval": args.interval,
                        "seed": 1000 + part,
                        "max_seconds": max_seconds,
                        "trace": args.trace is not None,
                        "register_concurrency": max(2, REGISTER_CONCURRENCY // count),
                    }
                )
            )
            log_path = layout.workdir / f"client-{part}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--fleet-client", str(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
            clients.append(ClientProcess(f"client {part + 1}/{count}", process, log_path))
        yield clients
    finally:
        for client in clients:
            client.stop()


def run_fleet(args: argparse.Namespace) -> bool:
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    limit = _raise_nofile()  # the server inherits it: it holds one socket per node
    if args.nodes + 500 > limit:
        print(f"warning: {args.nodes} connections in one server, {limit} open files", flush=True)
    with ExitStack() as stack:
        layout = _layouts(stack)
        print(f"issuing {args.nodes:,} node certificates ...", flush=True)
        took = _issue_certificates(layout, args.nodes)
        print(
            f"  {took:.1f} s ({took / args.nodes * 1000:.1f} ms per certificate, "
            f"{min(os.cpu_count() or 1, 8)} processes)",
            flush=True,
        )
        verdicts = []
        for backend_name in backends:
            with _backend(backend_name, layout.workdir / f"data-{backend_name}") as backend:
                verdicts.append(_fleet_backend(layout, backend, args))
            print()
        return all(verdicts)


def _fleet_backend(layout: Layout, backend: Backend, args: argparse.Namespace) -> bool:
    extra = {
        "NODEPOOL_NODE_HEARTBEAT_INTERVAL": str(args.interval),
        "NODEPOOL_NODE_TIMEOUT": str(args.node_timeout),
    }
    register_budget = 120.0 + args.nodes * 0.05
    max_seconds = register_budget + args.duration + FLEET_CALL_TIMEOUT + 60.0
    with _nodepool_serve(layout, backend, extra, f"fleet-{backend.name}") as server:
        asyncio.run(_wait_serving(server, _node_credentials(layout, 0)))
        server_started = time.monotonic()
        cpu_at_start = _process_cpu(server.pid) or 0.0
        with _fleet_clients(layout, server, args, max_seconds) as clients:
            print(
                f"[{backend.name}] {len(clients)} client processes connect and register "
                f"{args.nodes:,} nodes (each its own certificate and connection) ...",
                flush=True,
            )
            deadline = time.monotonic() + register_budget
            registered = [client.expect("registered", deadline) for client in clients]
            took = time.monotonic() - server_started
            total = sum(message["registered"] for message in registered)
            register_failed: Counter[str] = Counter()
            for message in registered:
                register_failed.update(message["failed"])
            print(
                f"  {total:,} registered in {took:.1f} s after the server started "
                f"(register p50 {_ms(max(m['p50'] for m in registered))}, "
                f"failed attempts {dict(register_failed) or 0}); "
                f"server RSS {_mib(_memory(server.pid, 'VmRSS'))}",
                flush=True,
            )
            steady = time.time()
            end = steady + args.duration
            cpu_steady = _process_cpu(server.pid) or 0.0
            busy_steady = _machine_busy()
            for client in clients:
                client.send(f"go {steady} {end}")
            print(
                f"  heartbeating every {args.interval} s (x {JITTER[0]}-{JITTER[1]}) for "
                f"{args.duration} s; NODEPOOL_NODE_TIMEOUT={args.node_timeout}",
                flush=True,
            )
            rss_samples: list[int] = []
            next_progress = time.time() + PROGRESS_SECONDS
            while time.time() < end:
                time.sleep(min(1.0, max(0.0, end - time.time())))
                rss = _memory(server.pid, "VmRSS")
                if rss is not None:
                    rss_samples.append(rss)
                if server.process.poll() is not None:
                    raise BenchError(f"the server exited:\n{server.log_tail()}")
                if time.time() >= next_progress:
                    next_progress += PROGRESS_SECONDS
                    cpu = (_process_cpu(server.pid) or 0.0) - cpu_steady
                    print(
                        f"  t+{time.time() - steady:4.0f} s: server RSS {_mib(rss)}, "
                        f"CPU {cpu:.1f} s since the steady phase began",
                        flush=True,
                    )
            done_deadline = time.monotonic() + FLEET_CALL_TIMEOUT + 60.0
            results = [client.expect("done", done_deadline) for client in clients]
            elapsed = time.time() - steady
            cpu_end = _process_cpu(server.pid) or 0.0
            busy_end = _machine_busy()
            # Right after the last beats: no live node can have been silent for a timeout,
            # so any node marked offline was marked falsely.
            state = _offline_counts(backend.database_url)
            peak = _memory(server.pid, "VmHWM")
            detector_active = time.monotonic() - server_started > args.node_timeout
    return _fleet_report(
        backend.name,
        args,
        total,
        results,
        state,
        peak,
        cpu_end - cpu_at_start,
        cpu_end - cpu_steady,
        elapsed,
        None if busy_steady is None or busy_end is None else (busy_end - busy_steady) / elapsed,
        detector_active,
        max(rss_samples, default=0),
    )


def _fleet_report(
    backend: str,
    args: argparse.Namespace,
    registered: int,
    results: Sequence[dict[str, Any]],
    state: dict[str, Any],
    peak_rss: int | None,
    cpu_total: float,
    cpu_steady: float,
    elapsed: float,
    machine_cores: float | None,
    detector_active: bool,
    rss_steady_max: int,
) -> bool:
    if args.trace is not None:
        beats = sorted(beat for r in results for beat in r["trace"])
        with args.trace.open("w") as out:
            for at, latency in beats:
                out.write(f"{at:.3f} {'FAILED' if latency is None else f'{latency * 1000:.2f}'}\n")
    sent = sum(r["sent"] for r in results)
    failed = sum(r["failed"] for r in results)
    latencies = [lat for r in results for lat in r["latencies"]]
    before_sent = sum(r["before_sent"] for r in results)
    before_failed = sum(r["before_failed"] for r in results)
    failures: Counter[str] = Counter()
    for r in results:
        failures.update(r["failures"])
    p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
    false_offline = max(state["offline"], state["offline_events"])
    expected = registered * args.duration / (args.interval * sum(JITTER) / 2)
    print()
    print(
        f"Fleet on {backend}: {registered:,} nodes, {args.duration} s steady phase, "
        f"interval {args.interval} s"
    )
    rows = [
        ("heartbeats sent (steady phase)", f"{sent:,} (about {expected:,.0f} expected)"),
        ("heartbeats failed", f"{failed:,}" + (f" {dict(failures)}" if failures else "")),
        ("  sent/failed while others registered", f"{before_sent:,} / {before_failed:,}"),
        ("latency p50 / p99", f"{_ms(p50)} / {_ms(p99)}"),
        ("latency max", _ms(max(latencies, default=math.nan))),
        (
            "nodes marked offline (status / events)",
            f"{state['offline']} / {state['offline_events']}"
            + ("" if detector_active else "  (detector still in its start-up grace)"),
        ),
        (
            "oldest last_heartbeat in the database",
            "-"
            if state["oldest_heartbeat_age"] is None
            else f"{state['oldest_heartbeat_age']:.1f} s ago",
        ),
        ("server RSS peak (VmHWM)", _mib(peak_rss)),
        ("server RSS max during steady phase", _mib(rss_steady_max)),
        (
            "server CPU (steady phase)",
            f"{cpu_steady:.1f} s = {cpu_steady / elapsed * 100:.1f}% of a core, "
            f"{cpu_steady / max(1, sent + failed) * 1e6:.0f} us per heartbeat",
        ),
        ("server CPU (whole run)", f"{cpu_total:.1f} s (with TLS handshakes and registration)"),
        (
            "machine busy (all processes)",
            "-" if machine_cores is None else f"{machine_cores:.2f} cores",
        ),
        (
            "client peak RSS per process",
            ", ".join(_mib(r["rss_peak"]) for r in results),
        ),
    ]
    cut = sum(r["cut_in_flight"] for r in results)
    if cut:
        rows.append(("beats still in flight at the cut", str(cut)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    checks = [
        ("registered every node", registered == args.nodes),
        ("zero failed heartbeats", failed == 0 and before_failed == 0),
        ("zero false offline", false_offline == 0),
        (f"p99 < {MAX_FLEET_P99 * 1000:.0f} ms", p99 < MAX_FLEET_P99),
        (f"server RSS < {MAX_FLEET_RSS / 1024**3:g} GiB", (peak_rss or 0) < MAX_FLEET_RSS),
    ]
    for name, ok in checks:
        print(f"[{backend}] {name}: {'yes' if ok else 'no'}")
    if not detector_active:
        print(
            f"note: the run ended inside the failure detector's start-up grace "
            f"({args.node_timeout} s): 'zero false offline' was not exercised"
        )
    if args.nodes < ACCEPTANCE_NODES or args.duration < 180:
        print(
            f"note: {args.nodes:,} nodes x {args.duration} s is a short run; the acceptance "
            f"run is {ACCEPTANCE_NODES:,} nodes x >= 180 s"
        )
    return all(ok for _, ok in checks)


# --------------------------------------------------------------------------- main


def _layouts(stack: ExitStack) -> Layout:
    """Certificates in memory (/dev/shm: issuing is ~2x faster), server data on disk."""
    shm = Path("/dev/shm")
    pki_base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    pki_root = Path(
        stack.enter_context(tempfile.TemporaryDirectory(prefix="np-hb-pki-", dir=pki_base))
    )
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nodepool-bench-")))
    # TemporaryDirectory removes the trees; a killed run leaves /dev/shm/np-hb-pki-*.
    stack.callback(shutil.rmtree, pki_root, True)
    return Layout(pki_root, workdir)


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop every process.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("mode", nargs="?", choices=("throughput", "fleet"), default="throughput")
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgres", "both"),
        default=None,
        help="sqlite (embedded cache) or postgres (+ Redis) [throughput: both, fleet: sqlite]",
    )
    parser.add_argument(
        "--nodes", type=int, default=None, help="nodes [throughput: 256, fleet: 10000]"
    )
    throughput = parser.add_argument_group("throughput")
    throughput.add_argument("--rounds", type=int, default=5, help="rounds per mode (5)")
    throughput.add_argument("--seconds", type=float, default=5.0, help="per round and mode (5)")
    throughput.add_argument("--concurrency", type=int, default=64, help="calls in flight (64)")
    throughput.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let client and servers float over the cores (default: client on one, servers "
        "on the other)",
    )
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument("--duration", type=int, default=180, help="steady phase, seconds (180)")
    fleet.add_argument("--interval", type=int, default=30, help="heartbeat interval (30)")
    fleet.add_argument(
        "--node-timeout", type=int, default=120, help="the server's NODE_TIMEOUT (120)"
    )
    fleet.add_argument(
        "--trace",
        type=Path,
        help="also write every steady-phase beat as 'start latency_ms|FAILED' lines here",
    )
    fleet.add_argument(
        "--clients", type=int, default=0, help=f"client processes [1 per {NODES_PER_CLIENT}]"
    )
    parser.add_argument("--serve-bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fleet-client", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.serve_bare is not None:
        with contextlib.suppress(KeyboardInterrupt, SystemExit):
            asyncio.run(_serve_bare(args.serve_bare, args.port))
        return 0
    if args.fleet_client is not None:
        asyncio.run(_fleet_client(json.loads(args.fleet_client.read_text())))
        return 0
    if args.mode == "throughput":
        args.backend = args.backend or "both"
        args.nodes = args.nodes or 256
        if not 1 <= args.nodes <= 5000:
            parser.error("--nodes must be between 1 and 5000 in throughput mode")
        if not 0.5 <= args.seconds <= 60:
            parser.error("--seconds must be between 0.5 and 60")
        if not 1 <= args.rounds <= 20:
            parser.error("--rounds must be between 1 and 20")
        if not 1 <= args.concurrency <= 1000:
            parser.error("--concurrency must be between 1 and 1000")
    else:
        args.backend = args.backend or "sqlite"
        args.nodes = args.nodes or ACCEPTANCE_NODES
        if not 1 <= args.nodes <= 40_000:
            parser.error("--nodes must be between 1 and 40000")
        if not 10 <= args.duration <= 3600:
            parser.error("--duration must be between 10 and 3600 seconds")
        if not 2 <= args.interval <= 600:
            parser.error("--interval must be between 2 and 600 seconds")
        if args.node_timeout <= args.interval:
            parser.error("--node-timeout must be longer than --interval")
        if args.clients and not 1 <= args.clients <= 32:
            parser.error("--clients must be between 1 and 32")
        if args.clients and math.ceil(args.nodes / args.clients) > 15_000:
            parser.error("at most 15000 nodes per client process (open files)")
    try:
        ok = run_throughput(args) if args.mode == "throughput" else run_fleet(args)
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
