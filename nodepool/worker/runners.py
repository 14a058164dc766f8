"""Runs one task on this machine: the task types the reference worker knows.

Plain Python, no gRPC and no protobuf: the agent loop turns a delivered task into a
:class:`TaskSpec`, awaits :meth:`Runners.run` and reports the :class:`TaskOutcome`. The server
cancelling a task is an ordinary asyncio cancellation of that await; :meth:`Runners.run` then
kills what it started, removes what it made, and re-raises.

``python`` runs the payload as a script, and only when the machine's owner allows it. What
it gets is a wall-clock limit, resource limits, its own temporary directory and an
environment without the worker's secrets. It is not a sandbox: the script runs as the
worker's user, can read what that user can read, can reach the network, and a script that
leaves its process group (``setsid``) escapes the group kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Final

__all__ = [
    "MAX_SLEEP_SECONDS",
    "TASK_TYPES",
    "ProgressCallback",
    "RunnerLimits",
    "Runners",
    "TaskOutcome",
    "TaskSpec",
]

_log = logging.getLogger(__name__)

TASK_TYPES: Final = frozenset({"echo", "sleep", "sha256", "python"})
MAX_SLEEP_SECONDS: Final = 86400

ProgressCallback = Callable[[float], None]
"""Called with the fraction done, 0.0 to 1.0; may be called often, so it must be cheap."""

# Exit code of a failure that no process produced (bad payload, built-in timed out...).
_FAILED: Final = 1
_PROGRESS_INTERVAL: Final = 0.5
# hashlib releases the GIL on large inputs, so a thread keeps heartbeats flowing meanwhile.
_HASH_IN_THREAD_BYTES: Final = 1 << 20
_ERROR_LINE_CHARS: Final = 200
# Only the last stderr line reaches the outcome; a bounded tail is enough to find it.
_STDERR_TAIL_BYTES: Final = 64 << 10
# The soft CPU limit sends SIGXCPU, which names the cause; the hard one, a little later,
# sends SIGKILL to a script that ignores SIGXCPU.
_CPU_GRACE_SECONDS: Final = 1
# After SIGKILL a process exits at once unless stuck in the kernel; these bound the wait for
# it and for pipes that a process outside the group may still hold open.
_REAP_SECONDS: Final = 5.0
_DRAIN_SECONDS: Final = 2.0
_SCRIPT_ENV_PATH: Final = "/usr/bin:/bin"
_SECONDS_TEXT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*", re.ASCII)

# Runs in the child as `python -I -S -B -c <this> PYTHON SCRIPT KIND:SOFT:HARD...`: setting the
# limits here and exec'ing the script avoids preexec_fn, which is unsafe in a process with
# threads (gRPC runs its own). The limits survive exec. Exit codes 125/126 mark our failures.
_LIMITS_WRAPPER: Final = """\
import os, resource, sys
try:
    for arg in sys.argv[3:]:
        kind, soft, hard = map(int, arg.split(":"))
        ceiling = resource.getrlimit(kind)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(kind, (soft, hard))
    os.umask(0o077)
except Exception:
    sys.stderr.write("nodepool: could not apply the resource limits\\n")
    os._exit(125)
try:
    os.execv(sys.argv[1], [sys.argv[1], "-I", "-S", "-B", sys.argv[2]])
except OSError:
    sys.stderr.write("nodepool: could not start the interpreter\\n")
    os._exit(126)
"""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One attempt at one task, as the agent received it."""

    task_id: str
    task_type: str
    payload: bytes
    timeout_seconds: float
    """Wall-clock bound for this attempt; must be finite and positive."""


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """How an attempt ended. ``error`` is one line, safe to show the task's owner."""

    succeeded: bool
    output: bytes
    """The result, at most ``max_output_bytes``; for ``python`` its stdout, also on failure."""
    exit_code: int
    """0 on success; for ``python`` the exit status, or ``-signum`` when a signal killed it;
    1 for a failure no process reported (bad payload, built-in timed out, not supported)."""
    error: str
    """Empty on success, else e.g. ``timed out after 5 s``, ``exit status 3: <stderr line>``."""
    output_truncated: bool = False


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    """Bounds on what one task may take; the ``python_*`` ones are rlimits on the script."""

    max_output_bytes: int = 1 << 20
    python_cpu_seconds: int = 60
    python_memory_bytes: int = 512 << 20
    python_max_open_files: int = 64
    python_max_file_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{field.name}: must be a positive integer, got {value!r}")


class _TaskFailed(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def _failed(error: str, exit_code: int = _FAILED) -> TaskOutcome:
    return TaskOutcome(succeeded=False, output=b"", exit_code=exit_code, error=error)


def _timed_out(seconds: float) -> str:
    return f"timed out after {seconds:g} s"


def _capped(data: bytes, cap: int) -> tuple[bytes, bool]:
    return (data[:cap], True) if len(data) > cap else (data, False)


def _mebibytes(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


class Runners:
    """The task types this worker runs. Holds no per-task state: tasks may run concurrently."""

    def __init__(
        self,
        *,
        allow_python: bool,
        limits: RunnerLimits = RunnerLimits(),
        python_executable: str = sys.executable,
        temp_root: Path | None = None,
    ) -> None:
        """``temp_root`` is where each ``python`` task gets its directory (default: the
        system temporary directory)."""
        self._allow_python = allow_python
        self._limits = limits
        self._python = python_executable
        self._temp_root = temp_root
        self._builtins: dict[str, Callable[[bytes, ProgressCallback], Awaitable[bytes]]] = {
            "echo": _echo,
            "sleep": _sleep,
            "sha256": _sha256,
        }
        cpu = limits.python_cpu_seconds
        rlimits = (
            (resource.RLIMIT_CPU, cpu, cpu + _CPU_GRACE_SECONDS),
            (resource.RLIMIT_AS, limits.python_memory_bytes, limits.python_memory_bytes),
            (resource.RLIMIT_NOFILE, limits.python_max_open_files, limits.python_max_open_files),
            (resource.RLIMIT_FSIZE, limits.python_max_file_bytes, limits.python_max_file_bytes),
            (resource.RLIMIT_CORE, 0, 0),
        )
        self._rlimit_args = tuple(f"{kind}:{soft}:{hard}" for kind, soft, hard in rlimits)
        self._cpu_error = f"CPU time limit exceeded ({cpu} s)"
        self._memory_error = f"memory limit exceeded ({_mebibytes(limits.python_memory_bytes)})"
        self._file_size_error = (
            f"file size limit exceeded ({_mebibytes(limits.python_max_file_bytes)})"
        )

    def supports(self, task_type: str) -> bool:
        if task_type == "python":
            return self._allow_python
        return task_type in self._builtins

    async def run(self, spec: TaskSpec, progress: ProgressCallback) -> TaskOutcome:
        """Runs one attempt. A failure is an outcome, never an exception; cancellation kills
        the task's processes and removes its directory before ``CancelledError`` goes on."""
        if spec.task_type == "python" and not self._allow_python:
            return _failed("task type python is not enabled on this worker")
        if not self.supports(spec.task_type):
            return _failed("unsupported task type")
        if not (math.isfinite(spec.timeout_seconds) and spec.timeout_seconds > 0):
            return _failed("invalid timeout")
        if spec.task_type == "python":
            outcome = await self._run_python(spec)
        else:
            try:
                async with asyncio.timeout(spec.timeout_seconds):
                    result = await self._builtins[spec.task_type](spec.payload, progress)
            except TimeoutError:
                return _failed(_timed_out(spec.timeout_seconds))
            except _TaskFailed as exc:
                return _failed(exc.error)
            output, truncated = _capped(result, self._limits.max_output_bytes)
            outcome = TaskOutcome(True, output, 0, "", output_truncated=truncated)
        if outcome.succeeded:
            progress(1.0)
        return outcome

    async def _run_python(self, spec: TaskSpec) -> TaskOutcome:
        try:
            spec.payload.decode("utf-8")
        except UnicodeDecodeError:
            return _failed("invalid payload")
        try:
            root = Path(tempfile.mkdtemp(prefix="nodepool-task-", dir=self._temp_root))
        except OSError:
            _log.warning("task %s: cannot make its directory", spec.task_id, exc_info=True)
            return _failed("the worker could not prepare the task")
        try:
            return await self._run_script(spec, root)
        finally:
            # In a thread: a script may leave many files. If this await is itself cancelled
            # the thread still finishes the removal.
            await asyncio.to_thread(_remove_tree, root)

    async def _run_script(self, spec: TaskSpec, root: Path) -> TaskOutcome:
        home, tmp, script = root / "home", root / "tmp", root / "task.py"
        try:
            home.mkdir(mode=0o700)
            tmp.mkdir(mode=0o700)
            script.write_bytes(spec.payload)
        except OSError:
            _log.warning("task %s: cannot write its script", spec.task_id, exc_info=True)
            return _failed("the worker could not prepare the task")
        # Nothing inherited: the worker's environment holds its credentials.
        env = {
            "PATH": _SCRIPT_ENV_PATH,
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        loop = asyncio.get_running_loop()
        capture = _Capture(loop, self._limits.max_output_bytes)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: capture,
                self._python,
                *("-I", "-S", "-B", "-c", _LIMITS_WRAPPER, self._python, str(script)),
                *self._rlimit_args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=home,
                env=env,
                start_new_session=True,
            )
        except OSError:
            _log.warning("task %s: cannot start %s", spec.task_id, self._python, exc_info=True)
            return _failed("the worker could not start the python interpreter")
        pid = transport.get_pid()
        try:
            done, _ = await asyncio.wait([capture.exited], timeout=spec.timeout_seconds)
            timed_out = not done
            # Also when the script exited by itself: what it left running would outlive the
            # task and keep the output pipes open.
            _kill_group(pid)
            await asyncio.wait([capture.exited], timeout=_REAP_SECONDS)
            await asyncio.wait([capture.pipes_closed], timeout=_DRAIN_SECONDS)
        finally:
            # Reached first on cancellation: kill before anything else can be awaited.
            _kill_group(pid)
            try:
                if not capture.exited.done():
                    await asyncio.wait([capture.exited], timeout=_REAP_SECONDS)
            finally:
                # Once the exit is known, if we can: close() would otherwise poll the pid
                # itself and race the child watcher that reaps it.
                transport.close()
        return self._script_outcome(spec, transport.get_returncode(), timed_out, capture)

    def _script_outcome(
        self, spec: TaskSpec, returncode: int | None, timed_out: bool, capture: _Capture
    ) -> TaskOutcome:
        if returncode is None:  # still not reaped after SIGKILL: report the kill we sent
            returncode = -signal.SIGKILL
        output, truncated = bytes(capture.stdout), capture.stdout_truncated
        if timed_out:
            error = _timed_out(spec.timeout_seconds)
        elif returncode == 0:
            return TaskOutcome(True, output, 0, "", output_truncated=truncated)
        elif returncode == -signal.SIGXCPU:
            error = self._cpu_error
        elif returncode == -signal.SIGXFSZ:
            error = self._file_size_error
        elif returncode < 0:
            error = f"killed by {_signal_name(-returncode)}"
        else:
            line = _last_line(bytes(capture.stderr_tail))
            if line.startswith("MemoryError"):
                error = self._memory_error
            elif f"[Errno {errno.EFBIG}]" in line:  # Python ignores SIGXFSZ: the write fails
                error = self._file_size_error
            else:
                error = f"exit status {returncode}: {line}" if line else f"exit status {returncode}"
        return TaskOutcome(False, output, returncode, error, output_truncated=truncated)


class _Capture(asyncio.SubprocessProtocol):
    """Collects a script's output as it arrives, never holding more than the caps: data
    beyond a cap is read and dropped, so a chatty script never blocks on a full pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self.stdout = bytearray()
        self.stdout_truncated = False
        self.stderr_tail = bytearray()
        self._cap = cap
        self._open_pipes = 2

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            room = self._cap - len(self.stdout)
            if len(data) > room:
                self.stdout_truncated = True
            self.stdout += data[:room]
        elif fd == 2:
            self.stderr_tail += data
            excess = len(self.stderr_tail) - _STDERR_TAIL_BYTES
            if excess > 0:
                del self.stderr_tail[:excess]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_pipes -= 1
        if self._open_pipes == 0 and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _kill_group(pid: int) -> None:
    # The group outlives its leader while any member lives, and its id is not reused
    # meanwhile; when no member is left this finds nothing.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _last_line(stderr: bytes) -> str:
    for raw in reversed(stderr.splitlines()):
        line = raw.decode("utf-8", "replace").strip()
        if line:
            # One printable line: it goes into a status message and onto terminals.
            return "".join(c if c.isprintable() else "?" for c in line[:_ERROR_LINE_CHARS])
    return ""


def _remove_tree(root: Path) -> None:
    # The script may have taken the permissions off its own directories; give them back,
    # top-down so each one can be entered, before removing. Links are not followed.
    with contextlib.suppress(OSError):
        root.chmod(0o700)
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)
    try:
        shutil.rmtree(root)
    except OSError:
        _log.warning("cannot remove task directory %s", root, exc_info=True)


async def _echo(payload: bytes, progress: ProgressCallback) -> bytes:
    return payload


async def _sha256(payload: bytes, progress: ProgressCallback) -> bytes:
    if len(payload) >= _HASH_IN_THREAD_BYTES:
        digest = await asyncio.to_thread(lambda: hashlib.sha256(payload).hexdigest())
    else:
        digest = hashlib.sha256(payload).hexdigest()
    return digest.encode("ascii")


def _sleep_seconds(payload: bytes) -> tuple[float, str]:
    try:
        match = _SECONDS_TEXT.fullmatch(payload.decode("utf-8"))
    except UnicodeDecodeError:
        match = None
    if match is None or float(match[1]) > MAX_SLEEP_SECONDS:
        raise _TaskFailed("invalid payload")
    return float(match[1]), match[1]


async def _sleep(payload: bytes, progress: ProgressCallback) -> bytes:
    seconds, text = _sleep_seconds(payload)
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + seconds
    while (remaining := end - loop.time()) > 0:
        await asyncio.sleep(min(_PROGRESS_INTERVAL, remaining))
        if loop.time() < end:  # the final 1.0 comes from run()
            progress((loop.time() - start) / seconds)
    return f"slept {text}".encode()
