"""Output for people (tables, coloured statuses) and for scripts (stable ``--json``).

The JSON contract, the same for every command:

- every field of a message is present; a message or timestamp that is not set, and an
  empty string, are ``null``; an empty list is ``[]``; maps are objects;
- numbers keep their type (64-bit ids are JSON numbers), enums are their names, timestamps
  RFC 3339 strings in UTC, bytes base64;
- a list that pages is an envelope: ``{"<items>": [...], "next_page_token": "..." | null}``;
  give the token back with ``--page-token``, or ask for everything with ``--all``.

New commands use :func:`json_option`, :func:`emit_json`, :func:`message_json` and
:func:`page_json` (and :func:`page_options` where the server pages).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import click
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "console",
    "emit_json",
    "json_option",
    "message_json",
    "page_json",
    "page_options",
    "print_table",
    "status_text",
    "wide_option",
]

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option(
    "--json", "as_json", is_flag=True, help="machine-readable output (a stable shape)"
)
wide_option = click.option(
    "--wide", is_flag=True, help="one line per row, however wide the terminal"
)


def page_options(function: F) -> F:
    """--page-token and --all for a listing the server returns page by page."""
    function = click.option(
        "--all", "all_pages", is_flag=True, help="follow next_page_token to the end"
    )(function)
    return click.option(
        "--page-token", default="", help="continue from a next_page_token a listing gave"
    )(function)


def _scalar(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        kind = field.message_type.full_name
        if kind == "google.protobuf.Timestamp":
            return str(value.ToJsonString())
        if kind == "google.protobuf.Duration":
            return value.ToTimedelta().total_seconds()
        return message_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        described = field.enum_type.values_by_number.get(value)
        return described.name if described is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode() if value else None
    if field.type == FieldDescriptor.TYPE_STRING:
        return value or None
    return value


def message_json(message: Message) -> dict[str, Any]:
    """Every field of ``message`` under its proto name, with the contract's null and []."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            result[field.name] = {
                str(k): v if isinstance(v, str) else _scalar(value_field, v)
                for k, v in sorted(value.items())
            }
        elif field.is_repeated:
            result[field.name] = [_scalar(field, item) for item in value]
        elif field.has_presence and not message.HasField(field.name):
            result[field.name] = None
        else:
            result[field.name] = _scalar(field, value)
    return result


def page_json(
    items_key: str, items: Iterable[Message | dict[str, Any]], next_page_token: str | None
) -> dict[str, Any]:
    """The envelope of a paged listing."""
    return {
        items_key: [item if isinstance(item, dict) else message_json(item) for item in items],
        "next_page_token": next_page_token or None,
    }


def emit_json(data: Any) -> None:
    """One JSON document on stdout (messages are converted with :func:`message_json`)."""
    if isinstance(data, Message):
        data = message_json(data)
    click.echo(json.dumps(data, indent=2, sort_keys=False))


_STATUS_STYLES = {
    # health, audit outcomes, accounts, keys, certificates; nodes and tasks can add theirs.
    "serving": "green",
    "allowed": "green",
    "active": "green",
    "valid": "green",
    "online": "green",
    "succeeded": "green",
    "completed": "green",
    "not_serving": "red",
    "denied": "red",
    "revoked": "red",
    "inactive": "red",
    "expired": "red",
    "offline": "red",
    "failed": "yellow",
    "superseded": "yellow",
    "draining": "yellow",
    "pending": "cyan",
    "queued": "cyan",
    "running": "blue",
    "cancelled": "magenta",
}


def status_text(status: str) -> Text:
    """A status word in its colour (no colour when output is not a terminal, or NO_COLOR)."""
    return Text(status, style=_STATUS_STYLES.get(status.lower(), ""))


def console(*, wide: bool = False) -> Console:
    # Piped output is not cut to 80 columns: scripts get whole rows.
    width = None
    if wide:
        width = 10_000
    elif not os.isatty(1) and not os.environ.get("COLUMNS"):
        width = 200
    return Console(width=width)


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[str | Text]],
    *,
    wide: bool = False,
    empty: str = "none",
) -> None:
    """A table whose cells wrap but are never cut (ids stay whole); ``wide``: no wrapping."""
    rows = list(rows)
    out = console(wide=wide)
    if not rows:
        click.echo(f"{title}: {empty}" if title else empty, err=True)
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=wide)
    for row in rows:
        table.add_row(*row)
    out.print(table)
