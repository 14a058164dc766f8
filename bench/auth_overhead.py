"""What the authentication pipeline costs: one cheap read, full pipeline against bare gRPC.

One child process serves ``UserManager.GetUserInfo`` from the same small servicer (a
constant answer, no database) on two ``grpc.aio`` servers with the same mTLS setup:

- ``full``: the real pipeline as ``NodePoolServer`` assembles it: peer identity →
  revocation → credentials (JWT access token) → Casbin authorization → audit, over a
  migrated SQLite store, the in-process cache and the shipped policy, with the server's
  background tasks running;
- ``bare``: no interceptor at all;
- ``registered`` (with ``--compare-registration``): the same pipeline, but each handler
  wrapped once when it is registered instead of by the interceptor — the design the
  interceptor replaced, kept here to show what the interceptor costs.

This process is the load: one ``grpc.aio`` channel per server, the same client
certificate, ``authorization: Bearer <access token>`` on every call to both, N calls in
flight. After a warm-up, rounds alternate between the servers (full/bare, then bare/full,
...) so drift on a busy machine falls on both alike. It prints throughput and p50/p99 per
round and the median over rounds, the server process's CPU time per call, the ratios and
a verdict per bound:

    python bench/auth_overhead.py [--seconds 2] [--rounds 5] [--concurrency 16] [--profile]
                                  [--no-pin] [--compare-registration]

By default this process and the server process are pinned to one core each: the server is
then the bottleneck in both modes (its CPU per call decides its throughput), and load from
other processes shifts much less between rounds. ``--no-pin`` lets them float.

``--profile`` adds, after the measured rounds, one more round per mode under cProfile in
the server process and prints where its time went (those rounds are not counted).

Everything lives in a temporary directory and only 127.0.0.1 is contacted. The server
process ends when this one does (it watches its stdin) and is stopped with SIGTERM, then
SIGKILL. Exit status: 0 when both bounds hold, 1 when not, 2 when the bench could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import io
import json
import logging
import math
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from nodepool.auth.authorization import Authorizer, default_policy_dir
from nodepool.auth.certificates import PeerCertificateCache
from nodepool.auth.revocation import RevocationList
from nodepool.auth.tokens import SigningKeys
from nodepool.background import every, in_thread
from nodepool.cache import create_cache
from nodepool.server.audit import AuditTrail
from nodepool.server.auth import build_auth
from nodepool.server.methods import METHOD_RULES
from nodepool.server.pipeline import (
    Call,
    CallPipeline,
    authorization_stage,
    identity_stage,
    revocation_stage,
)
from nodepool.server.tls import TlsFiles, TlsReloader
from nodepool.settings import Settings
from nodepool.store import AuditEntry, StoreCalls, open_store
from nodepool.v1 import user_manager_pb2 as pb
from nodepool.v1 import user_manager_pb2_grpc as pb_grpc
from pki import CertificateAuthority, CertificateStore

TRUST_DOMAIN = "nodepool.bench"
METHOD = "/nodepool.v1.UserManager/GetUserInfo"
USERNAME = "benchuser"
# A throwaway account in a temporary directory.
PASSWORD = "bench-Password-1234"
# Acceptance bounds (the issue): full throughput >= 0.85 x bare, full p99 <= 1.3 x bare.
MIN_THROUGHPUT_RATIO = 0.85
MAX_P99_RATIO = 1.3
WARMUP_SECONDS = 1.0
CALL_TIMEOUT = 5.0
STARTUP_TIMEOUT = 60.0
REPLY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
MICRO_ITERATIONS = 5_000
MICRO_REPEATS = 5
PROFILE_LINES = 25

# As NodePoolServer (nodepool/server/app.py) sets them.
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.http2.max_pings_without_data", 0),
)
REVOCATION_POLL_SECONDS = 0.25
REVOCATION_MAX_STALENESS = 5.0
AUDIT_FLUSH_SECONDS = 0.5
POLICY_RELOAD_SECONDS = 2.0
# As nodepool.client builds channels.
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)

MODES = ("full", "bare")
REGISTERED = "registered"


class BenchError(RuntimeError):
    """The bench could not measure; the message says why."""


# --------------------------------------------------------------------------- server side


class BenchUserManager(pb_grpc.UserManagerServicer):
    """GetUserInfo with a constant answer: the pipeline is measured, not the database."""

    def __init__(self) -> None:
        self._response = pb.GetUserInfoResponse(
            user=pb.User(username=USERNAME, email="bench@example.com", roles=["user"])
        )

    async def GetUserInfo(
        self, request: pb.GetUserInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUserInfoResponse:
        return self._response


@dataclass(frozen=True)
class Layout:
    """Where the parent put the CA and the certificates."""

    workdir: Path

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    @property
    def server_dir(self) -> Path:
        return self.workdir / "server"

    @property
    def client_dir(self) -> Path:
        return self.workdir / "client"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"


class _RegisteredView:
    """Wraps each handler once as it is registered (no interceptor): the old design."""

    def __init__(self, server: grpc.aio.Server, pipeline: CallPipeline) -> None:
        self._server = server
        self._pipeline = pipeline

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        pipeline = self._pipeline

        class Guarded(grpc.GenericRpcHandler):  # type: ignore[type-arg]
            def __init__(self, inner: Any) -> None:
                self._inner = inner
                self._wrapped: dict[str, Any] = {}

            def service(self, details: grpc.HandlerCallDetails) -> Any:
                wrapped = self._wrapped.get(details.method)
                if wrapped is None:
                    handler = self._inner.service(details)
                    if handler is None:
                        return None
                    wrapped = pipeline.guard(details.method, handler)
                    self._wrapped[details.method] = wrapped
                return wrapped

        self._server.add_generic_rpc_handlers(tuple(Guarded(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service,
            {
                name: self._pipeline.guard(f"/{service}/{name}", handler)
                for name, handler in handlers.items()
            },
        )


class _FakeContext:
    """Just what the stages read from a ServicerContext, for the per-stage timings."""

    def __init__(self, pem: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
        self._auth = {"x509_pem_cert": [pem], "transport_security_type": [b"ssl"]}
        self._metadata = metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def code(self) -> None:
        return None


def _per_call_us(work: Callable[[], object], iterations: int) -> float:
    """Best of ``MICRO_REPEATS`` batches, as timeit does: other load only ever adds."""
    best = math.inf
    for _ in range(MICRO_REPEATS):
        started = time.perf_counter()
        for _ in range(iterations):
            work()
        best = min(best, time.perf_counter() - started)
    return best / iterations * 1e6


class BenchServers:
    """Both servers in one process and one event loop, so only the interceptor differs."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.settings = Settings(
            data_dir=layout.data_dir,
            trust_domain=TRUST_DOMAIN,
            pki_dir=layout.ca_dir,
            # Long enough for any run the options allow (at most 20 x 2 x 60 s).
            access_token_ttl=3 * 3600,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Any]] = []
        self._servers: list[grpc.aio.Server] = []
        self._profiler: cProfile.Profile | None = None

    async def start(self) -> dict[str, Any]:
        settings, layout = self.settings, self.layout
        tls = TlsReloader(
            TlsFiles(
                layout.server_dir / "bench-server.crt",
                layout.server_dir / "bench-server.key",
                layout.server_dir / "ca.crt",
            )
        )
        ca_store = await asyncio.to_thread(CertificateStore.open, layout.ca_dir)
        self._closers.append(ca_store.close)
        revocations = RevocationList(ca_store, max_staleness=REVOCATION_MAX_STALENESS)
        await asyncio.to_thread(revocations.refresh)
        store = await asyncio.to_thread(open_store, settings.database_url)
        self._closers.append(store.close)
        cache = create_cache(None)
        policy = Authorizer.from_directory(default_policy_dir())
        keys = await asyncio.to_thread(
            SigningKeys.load_or_create, settings.jwt_keys, settings.jwt_algorithm
        )
        store_calls = StoreCalls(settings.max_workers, settings.database_timeout)
        background_calls = StoreCalls(2, settings.database_timeout, name="bench-background")
        hash_executor = ThreadPoolExecutor(2)
        self._closers.extend(
            (store_calls.shutdown, background_calls.shutdown, hash_executor.shutdown)
        )
        auth = build_auth(
            settings,
            store,
            cache,
            keys,
            store_calls=store_calls,
            background_calls=background_calls,
            hash_executor=hash_executor,
        )

        async def append_audit(entries: Sequence[AuditEntry]) -> None:
            self.audited += len(entries)
            await background_calls(store.append_audit, entries)

        self.audited = 0
        self.audit = AuditTrail(append_audit)
        self.stages = {
            "identity": identity_stage(PeerCertificateCache(settings.trust_domain)),
            "revocation": revocation_stage(revocations),
            "credentials": auth.credentials,
            "authorization": authorization_stage(policy),
        }
        self.pipeline = CallPipeline(
            METHOD_RULES, stages=list(self.stages.values()), auditor=self.audit
        )

        events_ready = asyncio.Event()
        self._spawn(auth.events.run(events_ready))
        await asyncio.wait_for(events_ready.wait(), timeout=30)
        self._spawn(revocations.keep_fresh(REVOCATION_POLL_SECONDS))
        self._spawn(every(settings.tls_reload_interval, in_thread(tls.reload_if_changed), "tls"))
        self._spawn(every(AUDIT_FLUSH_SECONDS, self.audit.flush, "audit"))
        self._spawn(every(POLICY_RELOAD_SECONDS, in_thread(policy.reload_if_changed), "policy"))

        # A real account and a real access token, through the real Accounts.
        await auth.accounts.register(USERNAME, PASSWORD, "bench@example.com", "127.0.0.1")
        session = await auth.accounts.login(USERNAME, PASSWORD, "127.0.0.1")
        self.token = session.access_token

        ports = {}
        for mode in (*MODES, REGISTERED):
            # The full server has the pipeline as its interceptor, exactly as NodePoolServer.
            interceptors = [self.pipeline] if mode == "full" else []
            server = grpc.aio.server(interceptors=interceptors, options=list(SERVER_OPTIONS))
            target: Any = _RegisteredView(server, self.pipeline) if mode == REGISTERED else server
            pb_grpc.add_UserManagerServicer_to_server(BenchUserManager(), target)  # type: ignore[abstract]
            port = server.add_secure_port("127.0.0.1:0", tls.credentials())
            if port == 0:
                raise BenchError(f"{mode}: cannot listen on 127.0.0.1")
            await server.start()
            self._servers.append(server)
            ports[mode] = port
        return {"ports": ports, "token": self.token, "pid": os.getpid()}

    def _spawn(self, work: Any) -> None:
        self._tasks.append(asyncio.create_task(work))

    async def stop(self) -> None:
        for server in self._servers:
            await server.stop(1.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for close in reversed(self._closers):
            await asyncio.to_thread(close)

    # -- commands from the parent ---------------------------------------------------------

    async def command(self, line: str) -> dict[str, Any]:
        if line == "micro":
            return {"ok": True, "micro": await self.micro()}
        if line == "profile-start":
            self._profiler = cProfile.Profile()
            self._profiler.enable()
            return {"ok": True}
        if line == "profile-stop":
            return {"ok": True, "profile": self._profile_stop()}
        if line == "audit":
            # GetUserInfo is not audited when allowed: any entry is a refusal.
            await self.audit.flush()
            return {"ok": True, "entries": self.audited}
        raise BenchError(f"unknown command {line!r}")

    def _profile_stop(self) -> str:
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return ""
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(PROFILE_LINES)
        stats.sort_stats("cumulative").print_stats(PROFILE_LINES)
        return out.getvalue()

    async def micro(self) -> dict[str, float]:
        """Per-call cost of each stage and of the whole wrapped handler, with a fake context."""
        pem = (self.layout.client_dir / "bench-client.crt").read_bytes()
        context: Any = _FakeContext(pem, (("authorization", f"Bearer {self.token}"),))
        rule = METHOD_RULES[METHOD]
        handler = grpc.unary_unary_rpc_method_handler(
            BenchUserManager().GetUserInfo,  # type: ignore[abstract]
            request_deserializer=pb.GetUserInfoRequest.FromString,
            response_serializer=pb.GetUserInfoResponse.SerializeToString,
        )
        wrapped = self.pipeline.guard(METHOD, handler)
        request = pb.GetUserInfoRequest()
        # The wrapped handler takes the bytes off the wire and decodes after the stages.
        raw_request = request.SerializeToString()
        await wrapped.unary_unary(raw_request, context)  # fills the caches
        n = MICRO_ITERATIONS
        timings: dict[str, float] = {}
        call = Call(method=METHOD, rule=rule, context=context)
        for name, stage in self.stages.items():
            if stage(call) is not None:
                raise BenchError(f"the {name} stage missed its cache in the micro-benchmark")
            timings[name] = _per_call_us(functools.partial(stage, call), n)

        async def best_of(work: Callable[[], Awaitable[object]]) -> float:
            best = math.inf
            for _ in range(MICRO_REPEATS):
                started = time.perf_counter()
                for _ in range(n):
                    await work()
                best = min(best, time.perf_counter() - started)
            return best / n * 1e6

        bare = await best_of(lambda: handler.unary_unary(request, context))
        full = await best_of(lambda: wrapped.unary_unary(raw_request, context))
        timings["wrapped handler minus bare handler"] = full - bare
        timings["audit.finished (allowed read)"] = _per_call_us(
            lambda: self.audit.finished(call, grpc.StatusCode.OK), n
        )
        return timings


async def _serve(layout: Layout) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    loop = asyncio.get_running_loop()
    servers = BenchServers(layout)
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        # EOF means the parent is gone (or done): stop serving.
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, None)

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        reply(await servers.start())
        threading.Thread(target=read_stdin, daemon=True).start()
        while (line := await lines.get()) is not None:
            try:
                reply(await servers.command(line))
            except BenchError as error:
                reply({"ok": False, "error": str(error)})
    finally:
        await servers.stop()


# --------------------------------------------------------------------------- client side


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
    def server_cpu_us_per_call(self) -> float | None:
        return None if self.server_cpu is None else self.server_cpu / self.calls * 1e6

    @property
    def client_cpu_us_per_call(self) -> float:
        return self.client_cpu / self.calls * 1e6


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (the ``inclusive`` method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy() -> float | None:
    """CPU seconds spent busy by the whole machine (all cores), from /proc; None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / _CLOCK_TICKS


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (every thread), from /proc; None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class ServerProcess:
    """The child serving both modes; talks one JSON line per command over its pipes."""

    def __init__(self, process: subprocess.Popen[str], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.info: dict[str, Any] = {}

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def read_reply(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.process.stdout.readline()))  # type: ignore[union-attr]
        reader.daemon = True
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            status = self.process.poll()
            state = "is not answering" if status is None else f"exited with {status}"
            raise BenchError(f"the server process {state}:\n{self.log_tail()}")
        reply: dict[str, Any] = json.loads(box[0])
        if reply.get("ok") is False:
            raise BenchError(f"the server process: {reply.get('error')}")
        return reply

    def ask(self, command: str, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read_reply(timeout)

    def stop(self) -> None:
        process = self.process
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)


@contextmanager
def _serving(layout: Layout, pin: bool) -> Iterator[ServerProcess]:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = pin and len(cores) >= 2
    log_path = layout.workdir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(layout.workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    server = ServerProcess(process, log_path)
    if pin:
        # One core each: no migrations between the two, and the same split for both modes.
        os.sched_setaffinity(0, {cores[0]})
        os.sched_setaffinity(process.pid, {cores[1]})
        print(f"client pinned to core {cores[0]}, server to core {cores[1]}", flush=True)
    try:
        server.info = server.read_reply(STARTUP_TIMEOUT)
        yield server
    finally:
        server.stop()


async def _load(
    stub: pb_grpc.UserManagerStub,
    metadata: tuple[tuple[str, str], ...],
    seconds: float,
    concurrency: int,
) -> tuple[int, float, list[float]]:
    """``concurrency`` callers back to back for ``seconds``: (calls, elapsed, latencies)."""
    request = pb.GetUserInfoRequest()
    latencies: list[float] = []
    started = time.perf_counter()
    stop_at = started + seconds

    async def caller() -> None:
        while (begun := time.perf_counter()) < stop_at:
            try:
                # The stubs type the aio stub as the blocking one.
                await stub.GetUserInfo(request, metadata=metadata, timeout=CALL_TIMEOUT)  # type: ignore[misc]
            except grpc.aio.AioRpcError as error:
                raise BenchError(
                    f"the call failed: {error.code().name}: {error.details()}"
                ) from None
            latencies.append(time.perf_counter() - begun)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), time.perf_counter() - started, latencies


async def _measure(
    server: ServerProcess,
    client_dir: Path,
    seconds: float,
    rounds: int,
    concurrency: int,
    profile: bool,
    modes: Sequence[str] = MODES,
) -> tuple[list[Round], dict[str, str]]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(client_dir / "ca.crt").read_bytes(),
        private_key=(client_dir / "bench-client.key").read_bytes(),
        certificate_chain=(client_dir / "bench-client.crt").read_bytes(),
    )
    metadata = (("authorization", f"Bearer {server.info['token']}"),)
    pid = int(server.info["pid"])
    channels = {
        mode: grpc.aio.secure_channel(
            f"127.0.0.1:{server.info['ports'][mode]}", credentials, list(CHANNEL_OPTIONS)
        )
        for mode in modes
    }
    try:
        stubs = {mode: pb_grpc.UserManagerStub(channel) for mode, channel in channels.items()}
        for mode in modes:
            await _load(stubs[mode], metadata, WARMUP_SECONDS, concurrency)
        results: list[Round] = []
        for index in range(1, rounds + 1):
            # full/bare, then bare/full: a linear drift weighs on both modes alike.
            order = tuple(modes) if index % 2 else tuple(reversed(modes))
            for mode in order:
                before = (_process_cpu(pid), time.process_time(), _machine_busy())
                calls, elapsed, latencies = await _load(stubs[mode], metadata, seconds, concurrency)
                after = (_process_cpu(pid), time.process_time(), _machine_busy())
                server_cpu = _delta(before[0], after[0])
                client_cpu = after[1] - before[1]
                busy = _delta(before[2], after[2])
                # Cores kept busy by everything else on the machine: noise, not us.
                others = None if busy is None else (busy - (server_cpu or 0) - client_cpu) / elapsed
                result = Round(
                    mode, index, calls, elapsed, latencies, server_cpu, client_cpu, others
                )
                results.append(result)
                print(_round_line(result), flush=True)
        profiles: dict[str, str] = {}
        if profile:
            for mode in MODES:
                print(f"profiling one more {mode} round (not counted) ...", flush=True)
                await asyncio.to_thread(server.ask, "profile-start")
                calls, _, _ = await _load(stubs[mode], metadata, seconds, concurrency)
                reply = await asyncio.to_thread(server.ask, "profile-stop")
                profiles[mode] = f"{calls} calls\n{reply['profile']}"
        return results, profiles
    finally:
        for channel in channels.values():
            await channel.close(None)


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _cpu(us: float | None) -> str:
    return "-" if us is None else f"{us:.0f} us"


def _round_line(result: Round) -> str:
    return (
        f"round {result.index} {result.mode:<4}: {result.throughput:7.0f} calls/s  "
        f"p50 {_ms(result.latency(0.50))}  p99 {_ms(result.latency(0.99))}  "
        f"server CPU {_cpu(result.server_cpu_us_per_call)}/call  "
        f"client CPU {_cpu(result.client_cpu_us_per_call)}/call  "
        f"other load {'-' if result.other_cores is None else f'{result.other_cores:.1f}'} cores"
    )


@dataclass
class Summary:
    throughput: float
    p50: float
    p99: float
    server_cpu_us: float | None
    client_cpu_us: float


def _summarize(results: Sequence[Round], mode: str) -> Summary:
    mine = [result for result in results if result.mode == mode]
    cpus = [r.server_cpu_us_per_call for r in mine if r.server_cpu_us_per_call is not None]
    return Summary(
        throughput=statistics.median(r.throughput for r in mine),
        p50=statistics.median(r.latency(0.50) for r in mine),
        p99=statistics.median(r.latency(0.99) for r in mine),
        server_cpu_us=statistics.median(cpus) if cpus else None,
        client_cpu_us=statistics.median(r.client_cpu_us_per_call for r in mine),
    )


def _report(results: Sequence[Round], micro: dict[str, float], concurrency: int) -> bool:
    full_stage_names = ("identity", "revocation", "credentials", "authorization")
    full, bare = _summarize(results, "full"), _summarize(results, "bare")
    header = ("mode", "calls/s", "p50", "p99", "server CPU/call", "client CPU/call")
    rows = [
        (
            mode,
            f"{summary.throughput:.0f}",
            _ms(summary.p50),
            _ms(summary.p99),
            _cpu(summary.server_cpu_us),
            _cpu(summary.client_cpu_us),
        )
        for mode, summary in (("full", full), ("bare", bare))
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest))

    rounds = sum(1 for result in results if result.mode == "full")
    print()
    print(f"GetUserInfo, concurrency {concurrency}, median of {rounds} rounds per mode")
    print(line(header))
    print(line(tuple("-" * width for width in widths)))
    for row in rows:
        print(line(row))

    throughput_ratio = full.throughput / bare.throughput
    p99_ratio = full.p99 / bare.p99
    # Cross-check: each round's full and bare ran back to back, so their ratio is the
    # least disturbed by load that comes and goes on the machine.
    pairs = [
        (f, b)
        for f in results
        for b in results
        if f.mode == "full" and b.mode == "bare" and f.index == b.index
    ]
    pair_throughput = statistics.median(f.throughput / b.throughput for f, b in pairs)
    pair_p99 = statistics.median(f.latency(0.99) / b.latency(0.99) for f, b in pairs)
    print()
    print(
        f"throughput full/bare: {throughput_ratio:.3f}   "
        f"(median of per-round ratios {pair_throughput:.3f})"
    )
    print(f"p99 full/bare:        {p99_ratio:.3f}   (median of per-round ratios {pair_p99:.3f})")
    if full.server_cpu_us is not None and bare.server_cpu_us is not None:
        print(
            f"server CPU per call:  +{full.server_cpu_us - bare.server_cpu_us:.0f} us "
            "with the pipeline"
        )
    print()
    print("pipeline per call, in-process (fake context, warm caches, best of 5):")
    for name, us in micro.items():
        print(f"  {name:<34} {us:7.2f} us")
    if full.server_cpu_us is not None and bare.server_cpu_us is not None:
        # _admit already includes the four stages.
        python_side = sum(
            us for name, us in micro.items() if not name.startswith(tuple(full_stage_names))
        )
        print(
            f"  = {python_side:.1f} us of the +{full.server_cpu_us - bare.server_cpu_us:.0f} us; "
            "the rest is gRPC's interceptor path, the ServicerContext calls\n"
            "    (auth_context, invocation_metadata) and colder caches under load"
        )
    print()
    throughput_ok = throughput_ratio >= MIN_THROUGHPUT_RATIO
    p99_ok = p99_ratio <= MAX_P99_RATIO
    print(
        f"throughput full >= {MIN_THROUGHPUT_RATIO:g} x bare: {'yes' if throughput_ok else 'no'}"
        f" ({throughput_ratio:.3f})"
    )
    print(f"p99 full <= {MAX_P99_RATIO:g} x bare: {'yes' if p99_ok else 'no'} ({p99_ratio:.3f})")
    return throughput_ok and p99_ok


def _report_registration(results: Sequence[Round]) -> None:
    """Interceptor (full) against the same pipeline wrapped at registration."""
    full, registered = _summarize(results, "full"), _summarize(results, REGISTERED)
    pairs = [
        (f, r)
        for f in results
        for r in results
        if f.mode == "full" and r.mode == REGISTERED and f.index == r.index
    ]
    per_round = statistics.median(f.throughput / r.throughput for f, r in pairs)
    print()
    print(
        f"registered: {registered.throughput:.0f} calls/s  p99 {_ms(registered.p99)}  "
        f"server CPU {_cpu(registered.server_cpu_us)}/call"
    )
    print(
        f"throughput interceptor/registered: {full.throughput / registered.throughput:.3f}   "
        f"(median of per-round ratios {per_round:.3f})"
    )
    print(f"p99 interceptor/registered:        {full.p99 / registered.p99:.3f}")


def run(
    seconds: float,
    rounds: int,
    concurrency: int,
    profile: bool,
    pin: bool,
    compare_registration: bool = False,
) -> bool:
    modes = (*MODES, REGISTERED) if compare_registration else MODES
    with tempfile.TemporaryDirectory(prefix="nodepool-bench-") as tmp:
        layout = Layout(Path(tmp))
        with CertificateAuthority.init(layout.ca_dir, trust_domain=TRUST_DOMAIN) as ca:
            ca.issue(
                "server",
                "bench-server",
                layout.server_dir,
                dns_names=["localhost"],
                ip_addresses=["127.0.0.1"],
            )
            ca.issue("client", "bench-client", layout.client_dir)
        print("starting the servers ...", flush=True)
        with _serving(layout, pin) as server:
            ports = server.info["ports"]
            print(
                f"full pipeline on port {ports['full']}, bare on port {ports['bare']}; "
                f"{rounds} rounds x {seconds:g} s per mode, concurrency {concurrency}",
                flush=True,
            )
            results, profiles = asyncio.run(
                _measure(server, layout.client_dir, seconds, rounds, concurrency, profile, modes)
            )
            refused = server.ask("audit")["entries"]
            if refused:
                raise BenchError(f"the full pipeline refused {refused} calls (audit entries)")
            micro = server.ask("micro")["micro"]
        ok = _report(results, micro, concurrency)
        if compare_registration:
            _report_registration(results)
        for mode, text in profiles.items():
            print()
            print(f"cProfile of the server process (event loop thread), one {mode} round:")
            print(text)
        return ok


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop the server process.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="per round and mode (2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per mode (5)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight (16)")
    parser.add_argument("--profile", action="store_true", help="cProfile one extra round per mode")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the client and the server float over the cores (default: one core each)",
    )
    parser.add_argument(
        "--compare-registration",
        action="store_true",
        help="also measure handlers wrapped at registration (no interceptor)",
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.serve is not None:
        with contextlib.suppress(KeyboardInterrupt, SystemExit):
            asyncio.run(_serve(Layout(args.serve)))
        return 0
    if not 0.5 <= args.seconds <= 60:
        parser.error("--seconds must be between 0.5 and 60")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be between 1 and 20")
    if not 1 <= args.concurrency <= 1000:
        parser.error("--concurrency must be between 1 and 1000")
    try:
        ok = run(
            args.seconds,
            args.rounds,
            args.concurrency,
            args.profile,
            args.pin,
            args.compare_registration,
        )
        return 0 if ok else 1
    except BenchError as error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
