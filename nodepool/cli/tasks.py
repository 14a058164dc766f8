"""``nodepool task``: submit, watch, cancel and list compute tasks over gRPC.

People get tables with coloured statuses; scripts get ``--json`` (stable field names, from
the protobuf messages; bytes fields base64 as protobuf JSON does). Progress and notes go to
stderr, so stdout holds only the result or the JSON. Task ids are never shortened.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from nodepool.cli.connection import Connection, client_options, connect
from nodepool.cli.errors import CommandError
from nodepool.v1 import master_node_pb2 as pb
from nodepool.v1 import master_node_pb2_grpc as pb_grpc

__all__ = ["task"]

_STATUS_NAMES = {
    pb.TASK_STATUS_PENDING: "pending",
    pb.TASK_STATUS_ASSIGNED: "assigned",
    pb.TASK_STATUS_RUNNING: "running",
    pb.TASK_STATUS_COMPLETED: "completed",
    pb.TASK_STATUS_FAILED: "failed",
    pb.TASK_STATUS_CANCELLED: "cancelled",
}
_STATUS_VALUES = {name: value for value, name in _STATUS_NAMES.items()}
_STATUS_STYLES = {
    "pending": "yellow",
    "assigned": "cyan",
    "running": "blue",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
}
_TERMINAL = frozenset({pb.TASK_STATUS_COMPLETED, pb.TASK_STATUS_FAILED, pb.TASK_STATUS_CANCELLED})
# One long poll asks the server to wait this long (its limit is 60 s).
_WAIT_SLICE = 30
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

_json = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


def _duration(_ctx: Any, _param: Any, value: str | None) -> int:
    if value is None:
        return 0
    match = _DURATION.fullmatch(value.strip())
    if match is None or int(match.group(1)) == 0:
        raise click.BadParameter("a duration such as 90, 90s, 10m, 2h or 1d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _label(_ctx: Any, _param: Any, values: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE")
        labels[key] = text
    return labels


def _status_name(task: pb.Task) -> str:
    return _STATUS_NAMES.get(task.status, "unknown")


def _coloured(task: pb.Task) -> str:
    name = _status_name(task)
    style = _STATUS_STYLES.get(name, "white")
    return f"[{style}]{name}[/{style}]"


def _when(message: Any, field: str) -> str:
    if not message.HasField(field):
        return "-"
    return str(getattr(message, field).ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC"))


def _task_json(task: pb.Task) -> dict[str, Any]:
    data: dict[str, Any] = MessageToDict(task, preserving_proto_field_name=True)
    # Plain names for people reading the JSON too; every key is always present.
    data["status"] = _status_name(task)
    data.setdefault("task_id", task.task_id)
    data.setdefault("attempts", task.attempts)
    data.setdefault("error", task.error)
    data.setdefault("assigned_node_id", task.assigned_node_id)
    return data


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _result_text(result: bytes) -> tuple[str, str | None]:
    """The result for a terminal, and a note (on stderr) when it is not text."""
    try:
        return result.decode("utf-8"), None
    except UnicodeDecodeError:
        encoded = base64.b64encode(result).decode("ascii")
        return encoded, f"the result is {len(result)} bytes of binary data, shown as base64"


def _show_task(task: pb.Task) -> None:
    table = Table(title=f"task {task.task_id}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    rows = [
        ("task id", task.task_id),
        ("status", _coloured(task)),
        ("type", task.task_type),
        ("owner", task.owner),
        ("node", task.assigned_node_id or "-"),
        ("attempts", f"{task.attempts} of {task.max_attempts}"),
        ("priority", str(task.priority)),
        ("progress", f"{task.progress:.0%}"),
        ("created", _when(task, "created_at")),
        ("started", _when(task, "started_at")),
        ("finished", _when(task, "finished_at")),
    ]
    if task.HasField("exit_code"):
        rows.append(("exit code", str(task.exit_code)))
    if task.error:
        rows.append(("error", f"[red]{task.error}[/red]"))
    for name, value in rows:
        table.add_row(name, value)
    Console(stderr=True).print(table)


def _print_outcome(task: pb.Task, as_json: bool) -> None:
    """The task, and its result on stdout (the details table goes to stderr)."""
    if as_json:
        _print_json(_task_json(task))
        return
    _show_task(task)
    if task.result:
        text, note = _result_text(task.result)
        if note:
            click.echo(note, err=True)
        click.echo(text, nl=not text.endswith("\n"))


def _stub(conn: Connection) -> pb_grpc.MasterNodeServiceStub:
    return pb_grpc.MasterNodeServiceStub(conn.channel)


@contextmanager
def _spinner(task_id: str, quiet: bool) -> Iterator[Any]:
    if quiet:
        yield None
        return
    console = Console(stderr=True)
    with console.status(f"waiting for task {task_id}") as status:
        yield status


def _wait(conn: Connection, task: pb.Task, quiet: bool) -> pb.Task:
    """Long-polls until the task finishes, with a spinner on stderr."""
    stub = _stub(conn)
    with _spinner(task.task_id, quiet) as status:
        while task.status not in _TERMINAL:
            if status is not None:
                status.update(
                    f"task {task.task_id}: {_status_name(task)}"
                    + (f" {task.progress:.0%}" if task.progress else "")
                )
            began = time.monotonic()
            task = conn.call(
                stub.GetTaskStatus,
                pb.GetTaskStatusRequest(task_id=task.task_id, wait_seconds=_WAIT_SLICE),
            ).task
            if task.status not in _TERMINAL and time.monotonic() - began < 1:
                time.sleep(1)  # a server that answers early is not asked in a tight loop
    return task


def _exit_for(task: pb.Task) -> None:
    if task.status != pb.TASK_STATUS_COMPLETED:
        raise click.exceptions.Exit(1)


@click.group()
def task() -> None:
    """Compute tasks: submit, watch, cancel, list."""


@task.command("submit")
@click.argument("task_type")
@click.option("--payload", default=None, help="the task's input, as text")
@click.option(
    "--payload-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="read the input from this file ('-' for stdin)",
)
@click.option("--cpu", type=click.IntRange(0, 4096), default=0, help="CPU cores it needs")
@click.option("--memory-gb", type=click.FloatRange(0), default=0.0, help="memory it needs")
@click.option("--priority", type=click.IntRange(-100, 100), default=0, help="higher runs first")
@click.option(
    "--label", "labels", multiple=True, callback=_label, help="KEY=VALUE a node must carry"
)
@click.option("--timeout", callback=_duration, default=None, help="e.g. 90s, 10m, 2h [1h]")
@click.option("--max-attempts", type=click.IntRange(1, 100), default=None, help="[3]")
@click.option("--idempotency-key", default="", help="a retry with the same key is the same task")
@click.option("--wait", is_flag=True, help="wait for the result and print it")
@_json
@client_options
def task_submit(
    task_type: str,
    payload: str | None,
    payload_file: Path | None,
    cpu: int,
    memory_gb: float,
    priority: int,
    labels: dict[str, str],
    timeout: int,
    max_attempts: int | None,
    idempotency_key: str,
    wait: bool,
    as_json: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Submit a task of TASK_TYPE (echo, sleep, sha256, python); prints its id."""
    if payload is not None and payload_file is not None:
        raise click.UsageError("give --payload or --payload-file, not both")
    data = b""
    if payload is not None:
        data = payload.encode()
    elif payload_file is not None:
        try:
            if payload_file == Path("-"):
                data = sys.stdin.buffer.read()
            else:
                data = payload_file.read_bytes()
        except OSError as exc:
            raise CommandError(f"payload file: cannot read it ({exc.strerror})") from None
    request = pb.SubmitTaskRequest(
        task_type=task_type,
        payload=data,
        requirements=pb.ResourceRequirements(cpu_cores=cpu, memory_gb=memory_gb),
        priority=priority,
        labels=labels,
        timeout_seconds=timeout,
        max_attempts=max_attempts or 0,
        idempotency_key=idempotency_key,
    )
    with connect(server, cert, key, ca) as conn:
        reply = conn.call(_stub(conn).SubmitTask, request)
        if not wait:
            if as_json:
                _print_json(_task_json(reply.task))
            else:
                click.echo(f"submitted {task_type} task", err=True)
                click.echo(reply.task_id)
            return
        click.echo(f"submitted task {reply.task_id}", err=True)
        final = _wait(conn, reply.task, quiet=as_json)
        if as_json:
            # The submit reply leaves the payload and result out; the status has them.
            final = conn.call(
                _stub(conn).GetTaskStatus, pb.GetTaskStatusRequest(task_id=final.task_id)
            ).task
    _print_outcome(final, as_json)
    _exit_for(final)


@task.command("status")
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="wait until it finishes (long poll)")
@_json
@client_options
def task_status(
    task_id: str,
    wait: bool,
    as_json: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Show a task and its result (text as is; binary as base64)."""
    with connect(server, cert, key, ca) as conn:
        found = conn.call(_stub(conn).GetTaskStatus, pb.GetTaskStatusRequest(task_id=task_id)).task
        if wait:
            found = _wait(conn, found, quiet=as_json)
    _print_outcome(found, as_json)
    if wait:
        _exit_for(found)


@task.command("cancel")
@click.argument("task_id")
@_json
@client_options
def task_cancel(
    task_id: str,
    as_json: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Cancel a task (yours, or any if you are an admin); a running one is stopped."""
    with connect(server, cert, key, ca) as conn:
        reply = conn.call(_stub(conn).CancelTask, pb.CancelTaskRequest(task_id=task_id))
    if as_json:
        _print_json(_task_json(reply.task))
    else:
        click.echo(f"cancelled {reply.task.task_id}", err=True)


@task.command("list")
@click.option("--status", type=click.Choice(sorted(_STATUS_VALUES)), default=None)
@click.option("--owner", default="", help="one user's tasks (admins only)")
@click.option("--all", "fetch_all", is_flag=True, help="every page, not only the newest")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@_json
@client_options
def task_list(
    status: str | None,
    owner: str,
    fetch_all: bool,
    limit: int,
    as_json: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Your tasks, newest first (an admin sees everyone's)."""
    found: list[pb.Task] = []
    token = ""
    with connect(server, cert, key, ca) as conn:
        while True:
            reply = conn.call(
                _stub(conn).ListTasks,
                pb.ListTasksRequest(
                    status=_STATUS_VALUES[status] if status else pb.TASK_STATUS_UNSPECIFIED,
                    owner=owner,
                    page_size=limit,
                    page_token=token,
                ),
            )
            found.extend(reply.tasks)
            token = reply.next_page_token
            if not token or not fetch_all:
                break
    if as_json:
        _print_json({"tasks": [_task_json(t) for t in found], "more": bool(token)})
        return
    table = Table(title="tasks")
    table.add_column("task id", no_wrap=True, overflow="ignore", min_width=32)
    for column in ("status", "type", "owner", "node", "attempts", "created"):
        table.add_column(column)
    for t in found:
        table.add_row(
            t.task_id,
            _coloured(t),
            t.task_type,
            t.owner,
            t.assigned_node_id or "-",
            f"{t.attempts}/{t.max_attempts}",
            _when(t, "created_at"),
        )
    Console().print(table)
    if token:
        click.echo("more tasks: use --all, or --limit", err=True)
