"""Real RPCs through a real ``nodepool serve``, against a bare gRPC server in the same run.

For each backend (SQLite with the in-process cache; PostgreSQL with Redis) this starts
``nodepool serve`` as a subprocess (its own CA from our ``pki`` package, its own data
directory; on PostgreSQL a throwaway database that is dropped afterwards, and its own
Redis namespace), and a bare ``grpc.aio`` mTLS server (this script with ``--bare``) that
answers every method with the reply the real server gave once — no pipeline, no store.
One client process drives both with N calls in flight on one channel each; rounds
alternate between the servers (nodepool/bare, then bare/nodepool, ...), so load that
comes and goes on the machine falls on both alike.

Per RPC it prints the throughput ratio nodepool/bare (median of rounds), p50/p99 of both,
and each server process's CPU time per call (from /proc/<pid>/stat), then the verdicts
of the acceptance bounds:

    python bench/rpc_paths.py [--backend sqlite|postgres|both] [--seconds 2] [--rounds 5]
                              [--concurrency 64] [--only NAME ...] [--no-pin]

The RPCs are the :data:`CASES` table: a name, a setup run once, a request factory and
the stub method. Add an entry to measure another RPC.

By default the client is pinned to one core and both servers to the other (only one is
loaded at a time): the server then is the bottleneck and its CPU per call decides its
throughput. ``--no-pin`` lets everything float.

Only 127.0.0.1 is contacted. PostgreSQL: NODEPOOL_BENCH_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/postgres, an account that may create databases);
Redis: NODEPOOL_BENCH_REDIS_URL (default redis://127.0.0.1:6379/0). Exit status 0 when
every bound holds, 1 when one does not, 2 when the bench could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from nodepool.v1 import master_node_pb2 as tasks
from nodepool.v1 import master_node_pb2_grpc as tasks_grpc
from nodepool.v1 import node_manager_pb2 as nodes
from nodepool.v1 import node_manager_pb2_grpc as nodes_grpc
from nodepool.v1 import user_manager_pb2 as users
from nodepool.v1 import user_manager_pb2_grpc as users_grpc
from pki import CertificateAuthority

TRUST_DOMAIN = "nodepool.bench"
USERNAME = "benchuser"
PASSWORD = "bench-Password-1234"  # a throwaway account in a temporary directory
WARMUP_SECONDS = 1.0
CALL_TIMEOUT = 10.0
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
# As nodepool.client builds channels.
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)


# --workers: NODEPOOL_MAX_WORKERS for the server (unset: the server's default).
WORKERS: list[int] = []


class BenchError(RuntimeError):
    """The bench could not measure; the message says why."""


# --------------------------------------------------------------------------- the cases


@dataclass
class Session:
    """What a case's setup and requests may use: the logged-in user's channel and token."""

    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Bound:
    """An acceptance bound: throughput ratio at least ``min_ratio`` on ``backends``."""

    min_ratio: float
    backends: tuple[str, ...] = ("sqlite", "postgres")
    # p99 at most this many times the bare server's.
    max_p99_ratio: float | None = None


@dataclass(frozen=True)
class Case:
    name: str
    # The full method name: the bare server answers it with the reply recorded here.
    method: str
    stub: Callable[[grpc.aio.Channel], Any]
    request: Callable[[int], Any]
    setup: Callable[[Session], Awaitable[None]] | None = None
    bounds: tuple[Bound, ...] = ()


async def _create_api_keys(session: Session) -> None:
    stub = users_grpc.UserManagerStub(session.channel)
    for index in range(3):
        await stub.CreateApiKey(  # type: ignore[misc]
            users.CreateApiKeyRequest(name=f"bench-{index}", ttl_days=1),
            metadata=session.metadata,
            timeout=CALL_TIMEOUT,
        )


# The task GetTaskStatus reads, made by its setup.
_TASK_ID: list[str] = []


async def _submit_one_task(session: Session) -> None:
    reply = await tasks_grpc.MasterNodeServiceStub(session.channel).SubmitTask(  # type: ignore[misc]
        tasks.SubmitTaskRequest(task_type="echo", payload=b"bench"),
        metadata=session.metadata,
        timeout=CALL_TIMEOUT,
    )
    _TASK_ID[:] = [reply.task_id]


_USER = "/nodepool.v1.UserManager/"
_NODES = "/nodepool.v1.NodeManager/"
_TASKS = "/nodepool.v1.MasterNodeService/"

CASES: tuple[Case, ...] = (
    Case(
        "GetUserInfo",
        _USER + "GetUserInfo",
        lambda channel: users_grpc.UserManagerStub(channel).GetUserInfo,
        lambda index: users.GetUserInfoRequest(),
        bounds=(Bound(0.5, max_p99_ratio=3.0),),
    ),
    Case(
        "UpdateUserProfile",
        _USER + "UpdateUserProfile",
        lambda channel: users_grpc.UserManagerStub(channel).UpdateUserProfile,
        # A write on every call: the e-mail address changes each time.
        lambda index: users.UpdateUserProfileRequest(email=f"bench{index % 1000}@example.com"),
        bounds=(Bound(0.3, backends=("sqlite",)),),
    ),
    Case(
        "ListApiKeys",
        _USER + "ListApiKeys",
        lambda channel: users_grpc.UserManagerStub(channel).ListApiKeys,
        lambda index: users.ListApiKeysRequest(),
        setup=_create_api_keys,
    ),
    # Heartbeats (UpdateNodeStatus) need a node certificate per node: bench/heartbeats.py.
    Case(
        "GetNodeList",
        _NODES + "GetNodeList",
        lambda channel: nodes_grpc.NodeManagerStub(channel).GetNodeList,
        lambda index: nodes.GetNodeListRequest(),
    ),
    Case(
        "SubmitTask",
        _TASKS + "SubmitTask",
        lambda channel: tasks_grpc.MasterNodeServiceStub(channel).SubmitTask,
        # A durable write on every call: a new pending task.
        lambda index: tasks.SubmitTaskRequest(task_type="echo", payload=b"bench"),
    ),
    Case(
        "GetTaskStatus",
        _TASKS + "GetTaskStatus",
        lambda channel: tasks_grpc.MasterNodeServiceStub(channel).GetTaskStatus,
        lambda index: tasks.GetTaskStatusRequest(task_id=_TASK_ID[0]),
        setup=_submit_one_task,
    ),
)


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass
class Process:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)


@dataclass(frozen=True)
class Layout:
    workdir: Path

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    @property
    def client_dir(self) -> Path:
        return self.workdir / "client"

    @property
    def bare_dir(self) -> Path:
        return self.workdir / "bare"


def _start(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> Process:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    return Process(name, process, log_path)


def _serve_nodepool(layout: Layout, backend: Backend) -> Process:
    executable = Path(sys.executable).parent / "nodepool"
    if not executable.is_file():
        raise BenchError(f"no nodepool console script next to {sys.executable}")
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("NODEPOOL_") or key.startswith("NODEPOOL_BENCH_")
    }
    env.update(
        {
            "NODEPOOL_GRPC_HOST": "127.0.0.1",
            "NODEPOOL_GRPC_PORT": str(port),
            "NODEPOOL_DATA_DIR": str(layout.workdir / f"data-{backend.name}"),
            "NODEPOOL_PKI_DIR": str(layout.ca_dir),
            "NODEPOOL_TRUST_DOMAIN": TRUST_DOMAIN,
            "NODEPOOL_LOG_LEVEL": "WARNING",
            # Long enough for any run the options allow.
            "NODEPOOL_ACCESS_TOKEN_TTL": "14400",
            # SubmitTask adds a pending task per call and no worker takes them.
            "NODEPOOL_MAX_PENDING_TASKS_PER_USER": "10000000",
            **backend.env,
            **({"NODEPOOL_MAX_WORKERS": str(WORKERS[0])} if WORKERS else {}),
        }
    )
    server = _start(
        f"nodepool ({backend.name})",
        [str(executable), "serve"],
        env,
        layout.workdir / f"nodepool-{backend.name}.log",
    )
    server.port = port
    return server


def _serve_bare(layout: Layout, replies: dict[str, bytes]) -> Process:
    layout.bare_dir.mkdir(exist_ok=True)
    (layout.bare_dir / "replies.json").write_text(
        json.dumps({method: reply.hex() for method, reply in replies.items()})
    )
    port = _free_port()
    server = _start(
        "bare",
        [sys.executable, str(Path(__file__).resolve()), "--bare", str(layout.workdir), str(port)],
        dict(os.environ),
        layout.workdir / "bare.log",
    )
    server.port = port
    return server


async def _bare_main(workdir: Path, port: int) -> None:
    """The bare server: mTLS with the same certificates, a recorded reply per method."""
    layout = Layout(workdir)
    replies = {
        method: bytes.fromhex(reply)
        for method, reply in json.loads((layout.bare_dir / "replies.json").read_text()).items()
    }

    def handler_for(reply: bytes) -> grpc.RpcMethodHandler[Any, Any]:
        async def answer(request: bytes, context: Any) -> bytes:
            return reply

        # Raw bytes both ways: the floor a gRPC server cannot go under.
        return grpc.unary_unary_rpc_method_handler(answer)

    class Replies(grpc.GenericRpcHandler):  # type: ignore[type-arg]
        def service(
            self, details: grpc.HandlerCallDetails
        ) -> grpc.RpcMethodHandler[Any, Any] | None:
            reply = replies.get(details.method)
            return None if reply is None else handler_for(reply)

    server_dir = layout.workdir / "server"
    credentials = grpc.ssl_server_credentials(
        [
            (
                (server_dir / "bench-server.key").read_bytes(),
                (server_dir / "bench-server.crt").read_bytes(),
            )
        ],
        root_certificates=(server_dir / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    )
    server.add_generic_rpc_handlers((Replies(),))
    if server.add_secure_port(f"127.0.0.1:{port}", credentials) == 0:
        raise BenchError(f"bare: cannot listen on port {port}")
    await server.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1.0)


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    env: dict[str, str] = field(default_factory=dict)


@contextmanager
def _backend(name: str) -> Iterator[Backend]:
    if name == "sqlite":
        yield Backend("sqlite")
        return
    import psycopg
    import redis

    admin_url = os.environ.get("NODEPOOL_BENCH_POSTGRES_URL", DEFAULT_POSTGRES)
    redis_url = os.environ.get("NODEPOOL_BENCH_REDIS_URL", DEFAULT_REDIS)
    database = f"nodepool_bench_{uuid.uuid4().hex[:12]}"
    namespace = f"nodepool-bench-{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL at {admin_url}: {exc}") from None
    base, _, _ = admin_url.rpartition("/")
    try:
        yield Backend(
            "postgres",
            {
                "NODEPOOL_DATABASE_URL": f"{base}/{database}",
                "NODEPOOL_REDIS_URL": redis_url,
                "NODEPOOL_CACHE_NAMESPACE": namespace,
            },
        )
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        client = redis.Redis.from_url(redis_url)
        try:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


# --------------------------------------------------------------------------- measuring


@dataclass
class Round:
    server: str
    calls: int
    seconds: float
    latencies: list[float]
    cpu: float

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    @property
    def cpu_us_per_call(self) -> float:
        return self.cpu / self.calls * 1e6


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _load(
    call: Any, request: Callable[[int], Any], metadata: Any, seconds: float, concurrency: int
) -> tuple[int, float, list[float]]:
    latencies: list[float] = []
    started = time.perf_counter()
    stop_at = started + seconds
    counter = 0

    async def caller() -> None:
        nonlocal counter
        while (begun := time.perf_counter()) < stop_at:
            counter += 1
            try:
                await call(request(counter), metadata=metadata, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                raise BenchError(f"a call failed: {error.code().name}: {error.details()}") from None
            latencies.append(time.perf_counter() - begun)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), time.perf_counter() - started, latencies


async def _wait_serving(channel: grpc.aio.Channel, process: Process) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + STARTUP_TIMEOUT
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        if process.process.poll() is not None:
            raise BenchError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)  # type: ignore[misc]
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise BenchError(
                    f"{process.name}: {error.code().name} {error.details()}\n{process.log_tail()}"
                ) from None
        await asyncio.sleep(0.2)


def _credentials(layout: Layout) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(layout.client_dir / "ca.crt").read_bytes(),
        private_key=(layout.client_dir / "bench-client.key").read_bytes(),
        certificate_chain=(layout.client_dir / "bench-client.crt").read_bytes(),
    )


async def _sign_in(channel: grpc.aio.Channel) -> tuple[tuple[str, str], ...]:
    stub = users_grpc.UserManagerStub(channel)
    await stub.RegisterUser(  # type: ignore[misc]
        users.RegisterUserRequest(username=USERNAME, password=PASSWORD), timeout=CALL_TIMEOUT
    )
    reply = await stub.LoginUser(  # type: ignore[misc]
        users.LoginUserRequest(username=USERNAME, password=PASSWORD), timeout=CALL_TIMEOUT
    )
    return (("authorization", f"Bearer {reply.access_token}"),)


async def _record_replies(cases: Sequence[Case], session: Session) -> dict[str, bytes]:
    """Each case's setup, then one real reply per method for the bare server to give."""
    replies: dict[str, bytes] = {}
    for case in cases:
        if case.setup is not None:
            await case.setup(session)
        reply = await case.stub(session.channel)(
            case.request(0), metadata=session.metadata, timeout=CALL_TIMEOUT
        )
        replies[case.method] = reply.SerializeToString()
    return replies


async def _measure_backend(
    layout: Layout,
    backend: Backend,
    cases: Sequence[Case],
    seconds: float,
    rounds: int,
    concurrency: int,
    pin: bool,
) -> dict[str, list[Round]]:
    with ExitStack() as stack:
        nodepool = _serve_nodepool(layout, backend)
        stack.callback(nodepool.stop)
        credentials = _credentials(layout)
        np_channel = grpc.aio.secure_channel(
            f"127.0.0.1:{nodepool.port}", credentials, list(CHANNEL_OPTIONS)
        )
        try:
            await _wait_serving(np_channel, nodepool)
            session = Session(np_channel, await _sign_in(np_channel))
            replies = await _record_replies(cases, session)
            bare = _serve_bare(layout, replies)
            stack.callback(bare.stop)
            bare_channel = grpc.aio.secure_channel(
                f"127.0.0.1:{bare.port}", credentials, list(CHANNEL_OPTIONS)
            )
            try:
                await _wait_serving(bare_channel, bare)  # UNIMPLEMENTED ends the wait too
            except BenchError as error:
                if "UNIMPLEMENTED" not in str(error):
                    raise
            _pin(pin, (nodepool.process.pid, bare.process.pid))
            channels = {"nodepool": np_channel, "bare": bare_channel}
            pids = {"nodepool": nodepool.process.pid, "bare": bare.process.pid}
            results: dict[str, list[Round]] = {}
            for case in cases:
                stubs = {name: case.stub(channel) for name, channel in channels.items()}
                for name in channels:
                    await _load(
                        stubs[name], case.request, session.metadata, WARMUP_SECONDS, concurrency
                    )
                case_rounds: list[Round] = []
                for index in range(rounds):
                    order = ("nodepool", "bare") if index % 2 == 0 else ("bare", "nodepool")
                    for name in order:
                        before = _process_cpu(pids[name])
                        calls, elapsed, latencies = await _load(
                            stubs[name], case.request, session.metadata, seconds, concurrency
                        )
                        cpu = _process_cpu(pids[name]) - before
                        measured = Round(name, calls, elapsed, latencies, cpu)
                        case_rounds.append(measured)
                        print(
                            f"  {backend.name:<8} {case.name:<18} round {index + 1} "
                            f"{name:<8} {measured.throughput:7.0f} calls/s  "
                            f"p99 {_percentile(latencies, 0.99) * 1000:6.1f} ms  "
                            f"CPU {measured.cpu_us_per_call:5.0f} us/call",
                            flush=True,
                        )
                results[case.name] = case_rounds
            await bare_channel.close(None)
            return results
        finally:
            await np_channel.close(None)


def _pin(pin: bool, server_pids: Sequence[int]) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2:
        return
    # The client on one core, the servers on the other: only one server is loaded at a
    # time, and then it is the bottleneck.
    os.sched_setaffinity(0, {cores[0]})
    for pid in server_pids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {cores[1]})
            for task in Path(f"/proc/{pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), {cores[1]})


# --------------------------------------------------------------------------- report


@dataclass
class Summary:
    throughput: float
    p50: float
    p99: float
    cpu_us: float


def _summary(rounds: Sequence[Round], server: str) -> Summary:
    mine = [r for r in rounds if r.server == server]
    return Summary(
        throughput=statistics.median(r.throughput for r in mine),
        p50=statistics.median(_percentile(r.latencies, 0.5) for r in mine),
        p99=statistics.median(_percentile(r.latencies, 0.99) for r in mine),
        cpu_us=statistics.median(r.cpu_us_per_call for r in mine),
    )


def _report(backend: str, cases: Sequence[Case], results: dict[str, list[Round]]) -> bool:
    ok = True
    print()
    print(
        f"{backend}: median of rounds  {'RPC':<18} {'ratio':>6}  "
        f"{'nodepool calls/s':>16} {'p50':>7} {'p99':>7} {'CPU/call':>9}  "
        f"{'bare calls/s':>12} {'p50':>7} {'p99':>7} {'CPU/call':>9}"
    )
    verdicts: list[str] = []
    for case in cases:
        rounds = results[case.name]
        np, bare = _summary(rounds, "nodepool"), _summary(rounds, "bare")
        ratio = np.throughput / bare.throughput
        p99_ratio = np.p99 / bare.p99
        print(
            f"{backend:>8}:                   {case.name:<18} {ratio:6.3f}  "
            f"{np.throughput:16.0f} {np.p50 * 1000:5.1f}ms {np.p99 * 1000:5.1f}ms "
            f"{np.cpu_us:7.0f}us  {bare.throughput:12.0f} {bare.p50 * 1000:5.1f}ms "
            f"{bare.p99 * 1000:5.1f}ms {bare.cpu_us:7.0f}us"
        )
        for bound in case.bounds:
            if backend not in bound.backends:
                continue
            held = ratio >= bound.min_ratio
            ok = ok and held
            verdicts.append(
                f"{backend} {case.name} >= {bound.min_ratio:g} x bare: "
                f"{'yes' if held else 'no'} ({ratio:.3f})"
            )
            if bound.max_p99_ratio is not None:
                held = p99_ratio <= bound.max_p99_ratio
                ok = ok and held
                verdicts.append(
                    f"{backend} {case.name} p99 <= {bound.max_p99_ratio:g} x bare p99: "
                    f"{'yes' if held else 'no'} ({p99_ratio:.2f})"
                )
    for verdict in verdicts:
        print(verdict)
    return ok


def run(
    backends: Sequence[str],
    cases: Sequence[Case],
    seconds: float,
    rounds: int,
    concurrency: int,
    pin: bool,
) -> bool:
    with tempfile.TemporaryDirectory(prefix="nodepool-bench-") as tmp:
        layout = Layout(Path(tmp))
        with CertificateAuthority.init(layout.ca_dir, trust_domain=TRUST_DOMAIN) as ca:
            # The server certificate is where `nodepool serve` looks for it in the CA dir.
            ca.issue(
                "server",
                "server",
                layout.ca_dir / "server",
                dns_names=["localhost"],
                ip_addresses=["127.0.0.1"],
            )
            ca.issue(
                "server",
                "bench-server",
                layout.workdir / "server",
                dns_names=["localhost"],
                ip_addresses=["127.0.0.1"],
            )
            ca.issue("client", "bench-client", layout.client_dir)
        reports: list[tuple[str, dict[str, list[Round]]]] = []
        for name in backends:
            print(
                f"{name}: {rounds} rounds x {seconds:g} s per server and RPC, "
                f"{concurrency} in flight",
                flush=True,
            )
            with _backend(name) as backend:
                results = asyncio.run(
                    _measure_backend(layout, backend, cases, seconds, rounds, concurrency, pin)
                )
            reports.append((name, results))
        ok = True
        for name, results in reports:
            ok = _report(name, cases, results) and ok
        return ok


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and server (2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per RPC (5)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (64)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="measure only these RPCs")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--workers", type=int, help="NODEPOOL_MAX_WORKERS for the server")
    parser.add_argument("--bare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.bare is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_bare_main(Path(args.bare[0]), int(args.bare[1])))
        return 0
    cases = [case for case in CASES if not args.only or case.name in args.only]
    if not cases:
        parser.error(f"--only: choose from {', '.join(case.name for case in CASES)}")
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    if args.workers:
        WORKERS.append(args.workers)
    try:
        ok = run(backends, cases, args.seconds, args.rounds, args.concurrency, args.pin)
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
