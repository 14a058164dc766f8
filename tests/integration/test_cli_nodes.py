"""``nodepool node ...`` as people and scripts run it: the real CLI in a subprocess, over
mTLS, against a real server with short node timeouts (so offline nodes appear quickly).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodepool.cli.nodes import parse_duration
from nodepool.v1 import node_manager_pb2 as npb
from tests.fixtures.accounts import Account, Pool, start_pool
from tests.fixtures.nodes import NodeClient, hold_task, new_node, node_status, wait_for

BIN = Path(sys.executable).parent
NODE_TIMEOUT = 3
ANSI = {"green": "\x1b[32m", "yellow": "\x1b[33m", "magenta": "\x1b[35m", "red": "\x1b[31m"}
NODE_KEYS = {
    "node_id",
    "owner",
    "status",
    "ip_address",
    "port",
    "cpu_cores",
    "memory_gb",
    "disk_gb",
    "task_slots",
    "labels",
    "registered_at",
    "last_heartbeat",
    "metrics",
    "drain_requested",
    "drain_deadline",
}


@pytest.fixture(scope="module")
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(
        request,
        tmp_path_factory.mktemp("cli-nodes"),
        "memory",
        node_heartbeat_interval=1,
        node_timeout=NODE_TIMEOUT,
    ) as pool:
        yield pool


class Cli:
    """Runs ``nodepool`` as one user, with its own NODEPOOL_HOME (its saved session)."""

    def __init__(self, pool: Pool, home: Path) -> None:
        cert = pool.client_cert
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NODEPOOL_")}
        self.env.update(
            NODEPOOL_SERVER=pool.server.target,
            NODEPOOL_CERT=str(cert.cert_path),
            NODEPOOL_KEY=str(cert.key_path),
            NODEPOOL_CA=str(cert.ca_path),
            NODEPOOL_HOME=str(home),
            COLUMNS="80",
        )
        self.env.pop("FORCE_COLOR", None)
        self.env.pop("NO_COLOR", None)

    def __call__(self, *args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "nodepool"), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if ok:
            assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def login(self, account: Account) -> Cli:
        self("user", "login", account.username, NODEPOOL_PASSWORD=account.password)
        return self


@pytest.fixture(scope="module")
def admin_cli(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(pool, tmp_path_factory.mktemp("admin-home")).login(pool.admin)


@pytest.fixture(scope="module")
def user(pool: Pool) -> Account:
    return pool.new_user("carol")


@pytest.fixture(scope="module")
def user_cli(pool: Pool, user: Account, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(pool, tmp_path_factory.mktemp("user-home")).login(user)


@contextlib.contextmanager
def _cancelled(stream: Any) -> Iterator[None]:
    try:
        yield
    finally:
        stream.cancel()


class _Beating:
    """Keeps some nodes heartbeating (with a status each) while a test looks at them."""

    def __init__(self, beats: dict[str, tuple[NodeClient, npb.NodeStatus.ValueType]]) -> None:
        self.beats = beats
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for node, status in self.beats.values():
                with contextlib.suppress(grpc.RpcError):
                    node.beat(status, cpu_percent=25.0, memory_percent=50.0)
            self.stop.wait(0.5)

    def __enter__(self) -> _Beating:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_durations() -> None:
    assert [parse_duration(t) for t in ("30s", "10m", "2h", "1d", "1h30m", "45")] == [
        30,
        600,
        7200,
        86400,
        5400,
        45,
    ]
    for bad in ("", "m", "10x", "1.5h", "-5m", "10m extra"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_list_json_is_a_list_even_when_empty(user_cli: Cli) -> None:
    assert user_cli.json("node", "list") == []
    assert user_cli.json("node", "list", "--status", "offline") == []


def test_list_shows_every_status_in_its_colour_and_whole_node_ids(
    pool: Pool, user: Account, user_cli: Cli, admin_cli: Cli, pki_ca: Any, tmp_path: Path
) -> None:
    batch = uuid.uuid4().hex[:12]
    long = "x" * 40  # ids far wider than an 80-column table would like
    made = {
        status: new_node(pool, pki_ca, tmp_path, user.username, f"{status}-{long}")
        for status in ("offline", "online", "busy", "draining")
    }
    made["offline"].register(labels={"batch": batch})
    wait_for(
        lambda: (
            (node := node_status(pool, pool.admin, made["offline"].node_id)) is not None
            and node.status == npb.NODE_STATUS_OFFLINE
        ),
        NODE_TIMEOUT + 3,
        "silent node offline",
    )
    for status in ("online", "busy"):
        made[status].register(labels={"batch": batch})
    drain_label = uuid.uuid4().hex[:12]
    made["draining"].register(labels={"batch": batch, "only": drain_label})
    # A draining node holding a running task stays draining.
    stream = hold_task(pool, user, made["draining"], drain_label)
    live = {
        "online": (made["online"], npb.NODE_STATUS_ONLINE),
        "busy": (made["busy"], npb.NODE_STATUS_BUSY),
        "draining": (made["draining"], npb.NODE_STATUS_ONLINE),
    }
    with _Beating(live), _cancelled(stream):
        user_cli("node", "remove", made["draining"].node_id, "--drain", "--deadline", "10m")

        expected = {node.node_id: status for status, node in made.items()}
        seen: dict[str, str] = {}

        def settled() -> bool:
            listed = user_cli.json("node", "list", "--label", f"batch={batch}")
            seen.clear()
            seen.update({n["node_id"]: n["status"] for n in listed})
            return seen == expected

        # The CLI itself takes seconds to start on a loaded machine.
        wait_for(settled, 60, "every status listed")
        assert seen == expected
        table = user_cli("node", "list", "--label", f"batch={batch}", FORCE_COLOR="1").stdout
        plain = user_cli("node", "list", "--label", f"batch={batch}").stdout
        for status, node in made.items():
            assert (
                ANSI[
                    {"online": "green", "busy": "yellow", "draining": "magenta", "offline": "red"}[
                        status
                    ]
                ]
                + status
                in table
            ), status
            assert node.node_id in plain, f"{node.node_id} cut in:\n{plain}"
        assert "\x1b[" not in plain
        # Filters.
        busy = user_cli.json("node", "list", "--status", "busy", "--label", f"batch={batch}")
        assert [n["node_id"] for n in busy] == [made["busy"].node_id]
        assert (
            user_cli.json("node", "list", "--label", f"batch={batch}", "--label", "gpu=a100") == []
        )
        mine = admin_cli.json("node", "list", "--owner", user.username, "--label", f"batch={batch}")
        assert len(mine) == 4
        # An admin's table ends with the pool's figures; a user's does not.
        assert "pool:" in admin_cli("node", "list", "--label", f"batch={batch}").stdout
        assert "pool:" not in plain


def test_list_json_is_stable_with_nulls(
    pool: Pool, user: Account, user_cli: Cli, pki_ca: Any, tmp_path: Path
) -> None:
    node = new_node(pool, pki_ca, tmp_path, user.username, "json")
    node.register(labels={"zone": "eu-1"}, port=7000)
    with _Beating({"online": (node, npb.NODE_STATUS_ONLINE)}):
        everything = user_cli.json("node", "list")
    (listed,) = [n for n in everything if n["node_id"] == node.node_id]
    assert set(listed) == NODE_KEYS
    assert listed["owner"] == user.username
    assert listed["status"] == "online"
    assert listed["labels"] == {"zone": "eu-1"}
    assert (listed["ip_address"], listed["port"], listed["cpu_cores"]) == ("127.0.0.1", 7000, 2)
    assert listed["drain_requested"] is False
    assert listed["drain_deadline"] is None
    assert datetime.fromisoformat(listed["registered_at"]).tzinfo is not None
    assert set(listed["metrics"]) == {
        "cpu_percent",
        "memory_percent",
        "disk_percent",
        "load_average",
        "running_tasks",
    }


def test_remove_drain_readmit_and_events(
    pool: Pool, user: Account, user_cli: Cli, admin_cli: Cli, pki_ca: Any, tmp_path: Path
) -> None:
    node = new_node(pool, pki_ca, tmp_path, user.username, "cycle")
    label = uuid.uuid4().hex[:12]
    node.register(labels={"only": label})
    stream = hold_task(pool, user, node, label)
    with _Beating({"online": (node, npb.NODE_STATUS_ONLINE)}), _cancelled(stream):
        out = user_cli("node", "remove", node.node_id, "--drain", "--deadline", "10m").stdout
        everything = user_cli.json("node", "list")
        # Removing at once, while it still drains and runs a task.
        removed = user_cli("node", "remove", node.node_id).stdout.strip()
    assert "draining" in out
    (listed,) = [n for n in everything if n["node_id"] == node.node_id]
    assert listed["status"] == "draining"
    left = datetime.fromisoformat(listed["drain_deadline"]) - datetime.now(UTC)
    assert 540 < left.total_seconds() <= 600
    assert removed == f"{node.node_id} removed"
    assert all(n["node_id"] != node.node_id for n in user_cli.json("node", "list"))
    # Only an admin re-admits.
    refused = user_cli("node", "readmit", node.node_id, ok=False)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: PERMISSION_DENIED")
    assert len(refused.stderr.strip().splitlines()) == 1
    admin_cli("node", "readmit", node.node_id)
    node.register()
    events = admin_cli.json("node", "events", node.node_id)
    # (Silent since, it may also have been declared offline by now.)
    assert [e["event"] for e in reversed(events)][:5] == [
        "registered",
        "drain_requested",
        "removed",
        "readmitted",
        "registered",
    ]
    assert set(events[0]) == {"node_id", "at", "event", "status", "detail"}
    assert all(e["node_id"] == node.node_id for e in events)
    table = user_cli("node", "events", node.node_id).stdout
    assert "drain_requested" in table
    assert "readmitted" in table


def test_errors_are_one_line(user_cli: Cli, admin_cli: Cli, pool: Pool) -> None:
    for args, code, start in [
        (("node", "remove", "no-such-node"), 1, "error: NOT_FOUND"),
        (("node", "events", "no-such-node"), 1, "error: NOT_FOUND"),
        (("node", "list", "--owner", pool.admin.username), 1, "error: PERMISSION_DENIED"),
        (("node", "stats"), 1, "error: PERMISSION_DENIED"),
        (("node", "remove", "n1", "--deadline", "10m"), 2, "error: --deadline needs --drain"),
        (("node", "remove", "n1", "--drain", "--deadline", "soon"), 2, "error: Invalid value"),
        (("node", "list", "--label", "novalue"), 2, "error: Invalid value"),
        (("node", "list", "--status", "sleeping"), 2, "error: Invalid value"),
    ]:
        result = user_cli(*args, ok=False)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith(start), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == ""


def test_stats_for_admins(
    pool: Pool, user: Account, admin_cli: Cli, pki_ca: Any, tmp_path: Path
) -> None:
    stats = admin_cli.json("node", "stats")
    assert set(stats) == {"nodes", "tasks", "task_slots_online"}
    assert set(stats["nodes"]) == {"online", "busy", "draining", "offline"}
    assert set(stats["tasks"]) == {"pending", "assigned", "running"}
    node = new_node(pool, pki_ca, tmp_path, user.username, "stats")
    node.register()
    with _Beating({"online": (node, npb.NODE_STATUS_ONLINE)}):
        after = admin_cli.json("node", "stats")
    assert after["nodes"]["online"] >= 1
    assert after["task_slots_online"] >= 2
    table = admin_cli("node", "stats").stdout
    assert "nodes online" in table
    assert "tasks pending" in table
