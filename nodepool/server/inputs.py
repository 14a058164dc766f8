"""One rule for every string in every request: no control characters.

PostgreSQL text cannot hold NUL (psycopg raises, and the call became INTERNAL) while SQLite
stores it without complaint, so the two backends accepted different inputs. Other control
characters have no business in names, ids or addresses either, and in logs and terminals
they can forge lines or escape sequences. Tab, line feed and carriage return stay allowed:
free text (a task payload, a description) may span lines.

Checked once per call on the decoded request, before any servicer runs, by walking every
string field, nested messages, repeated fields and map keys and values.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from nodepool.errors import InvalidArgumentError

__all__ = ["check_request_strings"]

# C0 controls except \t \n \r, DEL, and the C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Deeper than any request of ours nests; protobuf itself stops at 100.
_MAX_DEPTH = 64


def check_request_strings(request: object) -> None:
    """Raises :class:`InvalidArgumentError` naming the field; anything else passes."""
    if isinstance(request, Message):
        _check_message(request, 0)


def _check_message(message: Message, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise InvalidArgumentError("the request nests too deeply")
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _check_map(field, value, depth)
        elif field.is_repeated:
            for item in value:
                _check_value(field, item, depth)
        else:
            _check_value(field, value, depth)


def _check_map(field: FieldDescriptor, entries: Any, depth: int) -> None:
    entry = field.message_type
    assert entry is not None  # a map field always has its entry type
    value_field = entry.fields_by_name["value"]
    for key, value in entries.items():
        if isinstance(key, str):
            _check_text(field, key)
        _check_value(value_field, value, depth, name=field.name)


def _check_value(field: FieldDescriptor, value: Any, depth: int, name: str = "") -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        _check_text(field, value, name)
    elif field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        _check_message(value, depth + 1)


def _check_text(field: FieldDescriptor, text: str, name: str = "") -> None:
    if _CONTROL.search(text):
        raise InvalidArgumentError(f"{name or field.name} must not contain control characters")
