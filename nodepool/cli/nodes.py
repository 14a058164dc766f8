"""``nodepool node``: list, remove (or drain), re-admit nodes, their events, pool figures.

``--json`` output is stable for scripts: lists are always JSON lists (``[]`` when empty),
every field is always present, and absent values (a node that never sent a heartbeat, no
drain deadline) are ``null``. Times are ISO 8601 in UTC.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any, TypeVar

import click
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from nodepool.cli.connection import Connection, client_options, connect
from nodepool.cli.errors import CommandError
from nodepool.v1 import node_manager_pb2 as pb
from nodepool.v1 import node_manager_pb2_grpc as pb_grpc

__all__ = ["node", "parse_duration"]

_STATUSES = {
    "online": pb.NODE_STATUS_ONLINE,
    "busy": pb.NODE_STATUS_BUSY,
    "draining": pb.NODE_STATUS_DRAINING,
    "offline": pb.NODE_STATUS_OFFLINE,
}
_STATUS_NAMES = {value: name for name, value in _STATUSES.items()}
_COLOURS = {"online": "green", "busy": "yellow", "draining": "magenta", "offline": "red"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)([smhd])")
_PAGE = 500

_json = click.option("--json", "as_json", is_flag=True, help="machine-readable output")
R = TypeVar("R")


def parse_duration(text: str) -> int:
    """Seconds in ``30s``, ``10m``, ``2h``, ``1d``, ``1h30m``, or a plain number of seconds."""
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration such as 30s, 10m or 2h")
    return sum(int(number) * _UNITS[unit] for number, unit in parts)


class _Duration(click.ParamType[int]):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if seconds < 1:
            self.fail("must be at least 1s", param, ctx)
        return seconds


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--label")
    return key, value


def _when(message: Any, field: str) -> str | None:
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def _shown(when: str | None) -> str:
    return "-" if when is None else when.replace("T", " ").removesuffix("Z")[:19]


def _status(value: pb.NodeStatus.ValueType) -> str | None:
    return _STATUS_NAMES.get(value)


def _node_json(node: pb.Node) -> dict[str, Any]:
    metrics = node.metrics
    return {
        "node_id": node.node_id,
        "owner": node.owner,
        "status": _status(node.status),
        "ip_address": node.ip_address or None,
        "port": node.port,
        "cpu_cores": node.cpu_cores,
        "memory_gb": node.memory_gb,
        "disk_gb": node.disk_gb,
        "task_slots": node.task_slots,
        "labels": dict(sorted(node.labels.items())),
        "registered_at": _when(node, "registered_at"),
        "last_heartbeat": _when(node, "last_heartbeat"),
        "metrics": {
            "cpu_percent": metrics.cpu_percent,
            "memory_percent": metrics.memory_percent,
            "disk_percent": metrics.disk_percent,
            "load_average": metrics.load_average,
            "running_tasks": metrics.running_tasks,
        },
        "drain_requested": node.drain_requested,
        "drain_deadline": _when(node, "drain_deadline"),
    }


def _event_json(event: pb.NodeEvent) -> dict[str, Any]:
    return {
        "node_id": event.node_id,
        "at": _when(event, "at"),
        "event": event.event,
        "status": _status(event.status),
        "detail": event.detail or None,
    }


def _stats_json(stats: pb.GetPoolStatsResponse) -> dict[str, Any]:
    return {
        "nodes": {
            "online": stats.nodes_online,
            "busy": stats.nodes_busy,
            "draining": stats.nodes_draining,
            "offline": stats.nodes_offline,
        },
        "tasks": {
            "pending": stats.tasks_pending,
            "assigned": stats.tasks_assigned,
            "running": stats.tasks_running,
        },
        "task_slots_online": stats.task_slots_online,
    }


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _coloured(status: str | None) -> Text:
    name = status or "unknown"
    return Text(name, style=_COLOURS.get(name, ""))


def _print(table: Table) -> None:
    """Prints ``table`` whole: when it is wider than the terminal, the lines are wrapped by
    the terminal rather than the columns squeezed (which would cut node ids)."""
    console = Console()
    needed = Measurement.get(console, console.options.update_width(100_000), table).maximum
    if needed > console.width:
        console = Console(width=needed)
    console.print(table)


def _pages(fetch: Callable[[str], Any], items: Callable[[Any], Sequence[R]]) -> list[R]:
    collected: list[R] = []
    token = ""
    while True:
        page = fetch(token)
        collected.extend(items(page))
        token = page.next_page_token
        if not token:
            return collected


def _stats(conn: Connection) -> pb.GetPoolStatsResponse:
    stub = pb_grpc.NodeManagerStub(conn.channel)
    return conn.call(stub.GetPoolStats, pb.GetPoolStatsRequest())


def _stats_line(stats: pb.GetPoolStatsResponse) -> str:
    return (
        f"pool: {stats.nodes_online} online, {stats.nodes_busy} busy, "
        f"{stats.nodes_draining} draining, {stats.nodes_offline} offline; "
        f"{stats.task_slots_online} task slots online; tasks {stats.tasks_pending} pending, "
        f"{stats.tasks_assigned} assigned, {stats.tasks_running} running"
    )


@click.group()
def node() -> None:
    """Worker nodes: yours, or all of them for an admin."""


@node.command("list")
@click.option("--status", type=click.Choice(list(_STATUSES)), default=None)
@click.option("--owner", default="", help="another user's nodes (admins only)")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="repeatable")
@_json
@client_options
def node_list(
    status: str | None,
    owner: str,
    labels: tuple[str, ...],
    as_json: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """List nodes with their status, last heartbeat and latest metrics (admins also get
    the pool's figures below the table)."""
    wanted = dict(_label(text) for text in labels)
    with connect(server, cert, key, ca) as conn:
        stub = pb_grpc.NodeManagerStub(conn.channel)
        nodes = _pages(
            lambda token: conn.call(
                stub.GetNodeList,
                pb.GetNodeListRequest(
                    status=_STATUSES[status] if status else pb.NODE_STATUS_UNSPECIFIED,
                    owner=owner,
                    labels=wanted,
                    page_size=_PAGE,
                    page_token=token,
                ),
            ),
            lambda page: list(page.nodes),
        )
        if as_json:
            _echo_json([_node_json(n) for n in nodes])
            return
        stats: pb.GetPoolStatsResponse | None = None
        try:
            stats = _stats(conn)
        except CommandError:
            stats = None  # not an admin: the pool's figures are not theirs to see
    table = Table(title=f"nodes ({len(nodes)})")
    # Node ids are never shortened or wrapped (see _print).
    table.add_column("node id", no_wrap=True)
    for column in ("owner", "status", "address", "cpu", "mem GB", "slots"):
        table.add_column(column)
    table.add_column("last heartbeat", no_wrap=True)
    table.add_column("cpu %", justify="right")
    table.add_column("mem %", justify="right")
    table.add_column("tasks", justify="right")
    table.add_column("labels")
    for n in nodes:
        beat = _when(n, "last_heartbeat")
        table.add_row(
            n.node_id,
            n.owner,
            _coloured(_status(n.status)),
            f"{n.ip_address}:{n.port}" if n.port else n.ip_address or "-",
            str(n.cpu_cores),
            f"{n.memory_gb:g}",
            str(n.task_slots),
            _shown(beat),
            f"{n.metrics.cpu_percent:.0f}" if beat else "-",
            f"{n.metrics.memory_percent:.0f}" if beat else "-",
            str(n.metrics.running_tasks),
            ", ".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-",
        )
    _print(table)
    if stats is not None:
        click.echo(_stats_line(stats))


@node.command("remove")
@click.argument("node_id")
@click.option("--drain", is_flag=True, help="stop new work; remove once running tasks finish")
@click.option(
    "--deadline",
    type=_Duration(),
    default=None,
    help="with --drain: remove anyway after this long (30s, 10m, 2h) [server default 10m]",
)
@client_options
def node_remove(
    node_id: str,
    drain: bool,
    deadline: int | None,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Remove a node (yours, or any as an admin); it cannot register again until an admin
    re-admits it."""
    if deadline is not None and not drain:
        raise click.UsageError("--deadline needs --drain")
    with connect(server, cert, key, ca) as conn:
        stub = pb_grpc.NodeManagerStub(conn.channel)
        reply = conn.call(
            stub.RemoveNode,
            pb.RemoveNodeRequest(
                node_id=node_id, drain=drain, drain_deadline_seconds=deadline or 0
            ),
        )
    if reply.HasField("node"):
        until = _shown(_when(reply.node, "drain_deadline"))
        click.echo(f"{node_id} draining; removed once idle, or at {until} UTC at the latest")
    else:
        click.echo(f"{node_id} removed")


@node.command("readmit")
@click.argument("node_id")
@client_options
def node_readmit(
    node_id: str, server: str | None, cert: str | None, key: str | None, ca: str | None
) -> None:
    """Let a removed node register again (admins only)."""
    with connect(server, cert, key, ca) as conn:
        stub = pb_grpc.NodeManagerStub(conn.channel)
        conn.call(stub.ReadmitNode, pb.ReadmitNodeRequest(node_id=node_id))
    click.echo(f"{node_id} may register again")


@node.command("events")
@click.argument("node_id")
@_json
@client_options
def node_events(
    node_id: str,
    as_json: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """A node's status history, newest first: registered, offline, online, drain, removal."""
    with connect(server, cert, key, ca) as conn:
        stub = pb_grpc.NodeManagerStub(conn.channel)
        events = _pages(
            lambda token: conn.call(
                stub.GetNodeEvents,
                pb.GetNodeEventsRequest(node_id=node_id, page_size=_PAGE, page_token=token),
            ),
            lambda page: list(page.events),
        )
    if as_json:
        _echo_json([_event_json(e) for e in events])
        return
    table = Table(title=f"events of {node_id}")
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("event")
    table.add_column("status")
    table.add_column("detail")
    for e in events:
        table.add_row(_shown(_when(e, "at")), e.event, _coloured(_status(e.status)), e.detail)
    _print(table)


@node.command("stats")
@_json
@client_options
def node_stats(
    as_json: bool, server: str | None, cert: str | None, key: str | None, ca: str | None
) -> None:
    """Node counts by status and the work waiting for them (admins only)."""
    with connect(server, cert, key, ca) as conn:
        stats = _stats(conn)
    if as_json:
        _echo_json(_stats_json(stats))
        return
    table = Table(title="pool")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, count in _stats_json(stats)["nodes"].items():
        table.add_row(Text(f"nodes {name}", style=_COLOURS[name]), str(count))
    table.add_row("task slots online", str(stats.task_slots_online))
    for name, count in _stats_json(stats)["tasks"].items():
        table.add_row(f"tasks {name}", str(count))
    _print(table)
