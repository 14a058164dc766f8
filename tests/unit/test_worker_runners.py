"""The reference worker's task runners: built-in types, and python scripts under limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import signal
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodepool.worker.runners import (
    MAX_SLEEP_SECONDS,
    TASK_TYPES,
    RunnerLimits,
    Runners,
    TaskOutcome,
    TaskSpec,
)

# --------------------------------------------------------------------------- helpers


class Progress:
    def __init__(self) -> None:
        self.reports: list[float] = []

    def __call__(self, fraction: float) -> None:
        self.reports.append(fraction)


def spec(task_type: str, payload: bytes | str, timeout: float = 10.0) -> TaskSpec:
    if isinstance(payload, str):
        payload = textwrap.dedent(payload).encode()
    return TaskSpec(task_id="t-1", task_type=task_type, payload=payload, timeout_seconds=timeout)


async def run(runners: Runners, task: TaskSpec) -> tuple[TaskOutcome, Progress]:
    progress = Progress()
    return await runners.run(task, progress), progress


def alive(pid: int) -> bool:
    """A zombie counts as gone: whoever adopted an orphan reaps it on its own schedule."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


async def gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def leftovers(root: Path) -> list[Path]:
    return list(root.iterdir())


def exists(path: str) -> bool:
    return Path(path).exists()


@pytest.fixture
def temp_root(tmp_path: Path) -> Path:
    root = tmp_path / "tasks"
    root.mkdir()
    return root


@pytest.fixture
def runners(temp_root: Path) -> Runners:
    return Runners(allow_python=True, temp_root=temp_root)


# --------------------------------------------------------------------------- built-in types


def test_supported_types_follow_the_owners_choice() -> None:
    assert {"echo", "sleep", "sha256", "python"} == TASK_TYPES
    closed, open_ = Runners(allow_python=False), Runners(allow_python=True)
    for task_type in ("echo", "sleep", "sha256"):
        assert closed.supports(task_type)
        assert open_.supports(task_type)
    assert not closed.supports("python")
    assert open_.supports("python")
    assert not open_.supports("shell")


async def test_echo_returns_the_payload() -> None:
    outcome, progress = await run(Runners(allow_python=False), spec("echo", b"\x00hello\xff"))
    assert outcome == TaskOutcome(True, b"\x00hello\xff", 0, "")
    assert progress.reports == [1.0]


async def test_sha256_returns_the_hex_digest() -> None:
    payload = b"node pool" * 200_000  # large enough to be hashed off the event loop
    outcome, _ = await run(Runners(allow_python=False), spec("sha256", payload))
    assert outcome == TaskOutcome(True, hashlib.sha256(payload).hexdigest().encode(), 0, "")


async def test_sleep_sleeps_and_reports_progress_on_the_way() -> None:
    started = time.monotonic()
    outcome, progress = await run(Runners(allow_python=False), spec("sleep", b" 0.6\n"))
    assert time.monotonic() - started >= 0.6
    assert outcome == TaskOutcome(True, b"slept 0.6", 0, "")
    assert len(progress.reports) >= 2
    assert 0 < progress.reports[0] < 1
    assert progress.reports == sorted(progress.reports)
    assert progress.reports[-1] == 1.0


async def test_sleep_of_zero_still_reports_the_end() -> None:
    outcome, progress = await run(Runners(allow_python=False), spec("sleep", b"0"))
    assert outcome == TaskOutcome(True, b"slept 0", 0, "")
    assert progress.reports == [1.0]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"soon",
        b"-1",
        b"nan",
        b"inf",
        b"1e3",
        b"1_0",
        b"0x10",
        b"\xd9\xa1",
        b"\xff",
        b"86400.5",
    ],
)
async def test_sleep_refuses_what_is_not_a_number_of_seconds(payload: bytes) -> None:
    outcome, progress = await run(Runners(allow_python=False), spec("sleep", payload))
    assert outcome == TaskOutcome(False, b"", 1, "invalid payload")
    assert progress.reports == []


async def test_the_longest_sleep_is_accepted_and_bounded_by_the_timeout() -> None:
    started = time.monotonic()
    task = spec("sleep", str(MAX_SLEEP_SECONDS).encode(), timeout=0.2)
    outcome, _ = await run(Runners(allow_python=False), task)
    assert outcome == TaskOutcome(False, b"", 1, "timed out after 0.2 s")
    assert time.monotonic() - started < 10


async def test_an_unknown_type_is_a_failed_outcome() -> None:
    outcome, _ = await run(Runners(allow_python=True), spec("shell", b"rm -rf /"))
    assert outcome == TaskOutcome(False, b"", 1, "unsupported task type")


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan, math.inf])
async def test_a_timeout_must_be_finite_and_positive(seconds: float) -> None:
    outcome, _ = await run(Runners(allow_python=False), spec("echo", b"x", timeout=seconds))
    assert outcome == TaskOutcome(False, b"", 1, "invalid timeout")


async def test_output_is_capped_and_marked() -> None:
    runners = Runners(allow_python=False, limits=RunnerLimits(max_output_bytes=4))
    outcome, _ = await run(runners, spec("echo", b"abcdef"))
    assert outcome == TaskOutcome(True, b"abcd", 0, "", output_truncated=True)


@given(payload=st.binary(max_size=300), cap=st.integers(min_value=1, max_value=128))
async def test_builtin_outputs_are_exact_and_never_exceed_the_cap(payload: bytes, cap: int) -> None:
    runners = Runners(allow_python=False, limits=RunnerLimits(max_output_bytes=cap))
    digest = hashlib.sha256(payload).hexdigest().encode()
    for task_type, full in (("echo", payload), ("sha256", digest)):
        outcome = await runners.run(spec(task_type, payload), lambda _: None)
        assert outcome.succeeded
        assert len(outcome.output) <= cap
        assert outcome.output == full[:cap]
        assert outcome.output_truncated == (len(full) > cap)


@pytest.mark.parametrize("field", ["max_output_bytes", "python_cpu_seconds", "python_memory_bytes"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_limits_must_be_positive_integers(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        RunnerLimits(**{field: value})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- python: results


async def test_python_is_refused_unless_the_owner_allows_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    runners = Runners(allow_python=False, temp_root=tmp_path)
    outcome, _ = await run(runners, spec("python", f"open({str(marker)!r}, 'w')"))
    assert outcome == TaskOutcome(False, b"", 1, "task type python is not enabled on this worker")
    assert not marker.exists()


async def test_python_success_returns_stdout(runners: Runners, temp_root: Path) -> None:
    outcome, progress = await run(runners, spec("python", "print('hello', 6 * 7)"))
    assert outcome == TaskOutcome(True, b"hello 42\n", 0, "")
    assert progress.reports == [1.0]
    assert leftovers(temp_root) == []


async def test_python_failure_names_the_exit_status_and_last_stderr_line(runners: Runners) -> None:
    script = """\
        import sys
        print("partial result")
        sys.stderr.write("first\\nthe last one: \\x1b[31mred\\n\\n   \\n")
        sys.exit(3)
    """
    outcome, progress = await run(runners, spec("python", script))
    assert outcome == TaskOutcome(
        False, b"partial result\n", 3, "exit status 3: the last one: ?[31mred"
    )
    assert progress.reports == []


async def test_a_traceback_gives_its_exception_line_cut_to_200_chars(runners: Runners) -> None:
    outcome, _ = await run(runners, spec("python", "raise ValueError('v' * 1000)"))
    assert outcome.exit_code == 1
    assert outcome.error == "exit status 1: " + ("ValueError: " + "v" * 1000)[:200]


async def test_an_exit_without_stderr_gives_the_status_alone(runners: Runners) -> None:
    outcome, _ = await run(runners, spec("python", "import os; os._exit(7)"))
    assert outcome == TaskOutcome(False, b"", 7, "exit status 7")


async def test_a_script_killed_by_a_signal_says_which(runners: Runners) -> None:
    outcome, _ = await run(runners, spec("python", "import os; os.kill(os.getpid(), 15)"))
    assert outcome == TaskOutcome(False, b"", -signal.SIGTERM, "killed by SIGTERM")


async def test_a_python_payload_must_be_utf8(runners: Runners) -> None:
    outcome, _ = await run(runners, spec("python", b"print('\xff')"))
    assert outcome == TaskOutcome(False, b"", 1, "invalid payload")


async def test_a_missing_interpreter_is_a_failed_outcome(temp_root: Path) -> None:
    runners = Runners(
        allow_python=True, python_executable="/nonexistent/python3", temp_root=temp_root
    )
    outcome, _ = await run(runners, spec("python", "print(1)"))
    assert outcome == TaskOutcome(
        False, b"", 1, "the worker could not start the python interpreter"
    )
    assert leftovers(temp_root) == []


# --------------------------------------------------------------------------- python: isolation


async def test_the_environment_carries_nothing_from_the_worker(
    runners: Runners, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODEPOOL_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    outcome, _ = await run(
        runners, spec("python", "import os, json; print(json.dumps(dict(os.environ)))")
    )
    assert outcome.succeeded, outcome.error
    env = json.loads(outcome.output)
    assert "NODEPOOL_SECRET" not in env
    assert set(env) == {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE"}
    assert env["PATH"] == "/usr/bin:/bin"
    assert env["LANG"] == "C.UTF-8"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


async def test_each_script_gets_its_own_directory_removed_afterwards(
    runners: Runners, temp_root: Path
) -> None:
    script = """\
        import json, os, sys, tempfile
        open("left-behind", "w").write("x")
        print(json.dumps([os.getcwd(), os.environ["HOME"], tempfile.gettempdir(), sys.path]))
    """
    first, _ = await run(runners, spec("python", script))
    second, _ = await run(runners, spec("python", script))
    cwd, home, tmp, path = json.loads(first.output)
    task_dir = Path(cwd).parent
    assert task_dir.parent == temp_root
    assert cwd == home
    assert Path(tmp).parent == task_dir
    assert not any(p.startswith(str(task_dir)) for p in path)  # -I: the script's dir is not on it
    assert json.loads(second.output)[0] != cwd
    assert leftovers(temp_root) == []


async def test_a_directory_the_script_locked_is_still_removed(
    runners: Runners, temp_root: Path
) -> None:
    # Run as root, the removal would succeed without giving the permissions back; as any
    # other user (a contributed machine's worker) this fails if it does not.
    script = """\
        import os
        os.makedirs("a/b")
        open("a/b/f", "w").write("x")
        os.chmod("a/b", 0)
        os.chmod("a", 0o500)
        os.chmod(".", 0o500)
    """
    outcome, _ = await run(runners, spec("python", script))
    assert outcome.succeeded, outcome.error
    assert leftovers(temp_root) == []


async def test_the_limits_are_set_in_the_script(temp_root: Path) -> None:
    limits = RunnerLimits(
        python_cpu_seconds=7,
        python_memory_bytes=300 << 20,
        python_max_open_files=33,
        python_max_file_bytes=5 << 20,
    )
    script = """\
        import json, os, resource
        names = ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE"]
        rlimits = [resource.getrlimit(getattr(resource, n)) for n in names]
        print(json.dumps([os.umask(0), os.getsid(0) == os.getpid(), *rlimits]))
    """
    runners = Runners(allow_python=True, limits=limits, temp_root=temp_root)
    outcome, _ = await run(runners, spec("python", script))
    assert outcome.succeeded, outcome.error
    umask, session_leader, *rlimits = json.loads(outcome.output)
    assert umask == 0o077
    assert session_leader
    assert rlimits == [[7, 8], [300 << 20] * 2, [33, 33], [5 << 20] * 2, [0, 0]]


# --------------------------------------------------------------------------- python: limits


async def test_the_wall_clock_timeout_kills_the_whole_group(runners: Runners) -> None:
    script = """\
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(os.getpid(), child.pid, flush=True)
        time.sleep(60)
    """
    started = time.monotonic()
    outcome, _ = await run(runners, spec("python", script, timeout=1))
    assert time.monotonic() - started < 10
    assert not outcome.succeeded
    assert outcome.exit_code == -signal.SIGKILL
    assert outcome.error == "timed out after 1 s"
    for pid in map(int, outcome.output.split()):
        assert await gone(pid)


async def test_what_a_finished_script_left_running_is_killed(runners: Runners) -> None:
    script = """\
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid)
    """
    started = time.monotonic()
    outcome, _ = await run(runners, spec("python", script))
    assert time.monotonic() - started < 10
    assert outcome.succeeded, outcome.error
    assert await gone(int(outcome.output))


async def test_the_cpu_limit_stops_a_busy_script(temp_root: Path) -> None:
    runners = Runners(
        allow_python=True, limits=RunnerLimits(python_cpu_seconds=1), temp_root=temp_root
    )
    outcome, _ = await run(runners, spec("python", "while True: pass", timeout=30))
    assert not outcome.succeeded
    assert outcome.exit_code == -signal.SIGXCPU
    assert outcome.error == "CPU time limit exceeded (1 s)"


async def test_the_memory_limit_stops_a_large_allocation(temp_root: Path) -> None:
    limits = RunnerLimits(python_memory_bytes=256 << 20)
    runners = Runners(allow_python=True, limits=limits, temp_root=temp_root)
    outcome, _ = await run(runners, spec("python", "block = bytearray(1 << 30)"))
    assert not outcome.succeeded
    assert outcome.exit_code == 1
    assert outcome.error == "memory limit exceeded (256 MiB)"


async def test_the_file_size_limit_stops_a_large_file(temp_root: Path) -> None:
    runners = Runners(
        allow_python=True, limits=RunnerLimits(python_max_file_bytes=1 << 20), temp_root=temp_root
    )
    outcome, _ = await run(runners, spec("python", "open('big', 'wb').write(b'x' * (2 << 20))"))
    assert outcome.exit_code == 1
    assert outcome.error == "file size limit exceeded (1 MiB)"


async def test_the_open_files_limit_holds(temp_root: Path) -> None:
    runners = Runners(
        allow_python=True, limits=RunnerLimits(python_max_open_files=16), temp_root=temp_root
    )
    outcome, _ = await run(runners, spec("python", "files = [open(__file__) for _ in range(100)]"))
    assert outcome.exit_code == 1
    assert "Too many open files" in outcome.error


async def test_a_flood_of_output_is_capped_without_blocking_the_script(temp_root: Path) -> None:
    script = """\
        import sys
        sys.stderr.write("e" * 5_000_000 + "\\nlast words\\n")
        sys.stdout.write("x" * 5_000_000)
        sys.exit(2)
    """
    runners = Runners(
        allow_python=True, limits=RunnerLimits(max_output_bytes=1024), temp_root=temp_root
    )
    started = time.monotonic()
    outcome, _ = await run(runners, spec("python", script, timeout=30))
    assert time.monotonic() - started < 10
    assert outcome == TaskOutcome(False, b"x" * 1024, 2, "exit status 2: last words", True)


# --------------------------------------------------------------------------- python: cancellation


async def test_cancelling_kills_the_script_and_removes_its_directory(
    runners: Runners, temp_root: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    script = f"""\
        import json, os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open({str(report) + ".part"!r}, "w") as f:
            json.dump([os.getpid(), child.pid, os.getcwd()], f)
        os.rename({str(report) + ".part"!r}, {str(report)!r})
        time.sleep(60)
    """
    task = asyncio.create_task(runners.run(spec("python", script, timeout=60), lambda _: None))
    deadline = time.monotonic() + 10
    while not report.exists():
        assert time.monotonic() < deadline, "the script never started"
        assert not task.done(), task.result()
        await asyncio.sleep(0.02)
    pid, child, cwd = json.loads(report.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)  # the leader is reaped before run() gives up
    assert await gone(child)
    assert not exists(cwd)
    assert leftovers(temp_root) == []


async def test_cancelling_a_builtin_sleep_propagates() -> None:
    task = asyncio.create_task(
        Runners(allow_python=False).run(spec("sleep", b"30"), lambda _: None)
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
