"""Property-based fuzzing of every unary RPC the server registers, over real mTLS, on both
backends (SQLite + in-process cache, PostgreSQL + Redis), as a device, a user, an
administrator and a node. Whatever arrives, the answer is never INTERNAL or UNKNOWN.

The methods are read from the registered services' descriptors, so an RPC added later is
fuzzed without touching this file; one not built yet answers UNIMPLEMENTED, which is fine.
The random messages are built from the same descriptors: every field, nested messages,
repeated fields and maps, with strings that are empty, odd (control characters, look-alike
names) or oversized, and numbers at the edges of their types.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodepool.server.app import SERVICE_NAMES
from nodepool.v1 import (
    audit_pb2,
    certificates_pb2,
    master_node_pb2,
    node_manager_pb2,
    user_manager_pb2,
)
from pki import CertificateAuthority, IssuedCertificate
from tests.fixtures.accounts import BACKENDS, Account, Pool, api_key_metadata, start_pool
from tests.fixtures.server import bearer

# A few hundred calls per backend keeps the suite quick (each is a real RPC): this many
# random requests per method, and one NUL per string field per caller below.
EXAMPLES_PER_METHOD = 8
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

_FILES = (
    node_manager_pb2,
    user_manager_pb2,
    master_node_pb2,
    certificates_pb2,
    audit_pb2,
    health_pb2,
)


def _registered_methods() -> list[MethodDescriptor]:
    """Every unary-unary method of every service the server registers."""
    services = {*SERVICE_NAMES, "grpc.health.v1.Health"}
    methods = []
    for module in _FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name not in services:
                continue
            for method in service.methods:
                if not method.client_streaming and not method.server_streaming:
                    methods.append(method)
    return sorted(methods, key=lambda m: m.full_name)


METHODS = _registered_methods()


def test_every_registered_service_is_fuzzed() -> None:
    fuzzed = {method.containing_service.full_name for method in METHODS}
    assert set(SERVICE_NAMES) <= fuzzed


# -- random messages from descriptors ------------------------------------------------------

_ODD_STRINGS = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "\x1b[2J",
        "admin",
        "ADMIN",
        "\u017f",  # a long s, which case-folds to "s"
        "../../etc/passwd",
        "'; DROP TABLE users; --",
        "spiffe://nodepool.test/client/alice-laptop",
        "npk_abc_def_ghi",
        "%s%n",
        "\u202e",
        "🐝" * 10,
    ]
)
_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
_OVERSIZED = st.integers(1_000, 200_000).map(lambda n: "x" * n)
_STRINGS = st.one_of(_TEXT, _ODD_STRINGS, _OVERSIZED)

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = st.sampled_from([low, high, 0, 1, -1 if low < 0 else 2, 365, 366, 10**6])
    return st.one_of(edges.filter(lambda v: low <= v <= high), st.integers(low, high))


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _STRINGS
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64) | st.integers(1_000, 100_000).map(lambda n: b"\0" * n)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    assert field.message_type is not None
    return _message(field.message_type, depth + 1)


def _message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            fields[field.name] = st.dictionaries(
                _scalar(key, depth), _scalar(value, depth), max_size=3
            )
        elif field.is_repeated:
            fields[field.name] = st.lists(_scalar(field, depth), max_size=3)
        else:
            fields[field.name] = _scalar(field, depth)
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, values))


def _build(cls: Any, values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(message, name)
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            getattr(message, name).extend(value)
        elif isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)  # the last member of a oneof wins
    return message


# -- callers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    with start_pool(
        request,
        tmp_path_factory.mktemp("fuzz"),
        request.param,
        # Fuzzed logins and sign-ups must reach the code behind the limits too.
        login_attempts_per_peer_per_minute=100_000,
        login_attempts_per_user_per_minute=100_000,
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def callers(
    pool: Pool,
    node_cert: IssuedCertificate,
    pki_ca: CertificateAuthority,
) -> dict[str, tuple[grpc.Channel, tuple[tuple[str, str], ...]]]:
    user = pool.new_user("fuzzer")
    key = pool.users().CreateApiKey(
        user_manager_pb2.CreateApiKeyRequest(name="fuzz"), metadata=user.auth, timeout=10
    )
    return {
        "device": (pool.channel(), ()),
        "user": (pool.channel(), bearer(user.access)),
        "api-key": (pool.channel(), api_key_metadata(key.secret)),
        "admin": (pool.channel(), pool.admin.auth),
        "node": (pool.channel(node_cert), ()),
    }


CALLERS = ["device", "user", "api-key", "admin", "node"]
Callers = dict[str, tuple[grpc.Channel, tuple[tuple[str, str], ...]]]


def _send(callers: Callers, caller: str, method: MethodDescriptor, request: Message) -> Any:
    """The status code of one call (OK when it succeeds); asserts it is never a failure."""
    channel, metadata = callers[caller]
    path = f"/{method.containing_service.full_name}/{method.name}"
    stub = channel.unary_unary(
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=bytes
    )
    try:
        stub(request, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        assert error.code() not in NEVER, f"{path} as {caller}: {error.code()} {error.details()}"
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_no_request_makes_the_server_fail(callers: Callers, method: MethodDescriptor) -> None:
    @settings(
        max_examples=EXAMPLES_PER_METHOD,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(caller=st.sampled_from(CALLERS), request=_message(method.input_type))
    def fuzz(caller: str, request: Message) -> None:
        _send(callers, caller, method, request)

    fuzz()


def _string_paths(descriptor: Descriptor, depth: int = 0) -> Iterator[list[FieldDescriptor]]:
    """Every string field of a request, nested ones included, as a path of fields."""
    for field in descriptor.fields:
        entry = field.message_type
        if field.type == FieldDescriptor.TYPE_STRING:
            yield [field]
        elif entry is not None and not entry.GetOptions().map_entry and depth < 2:
            if entry.full_name.startswith("google.protobuf."):
                continue
            for path in _string_paths(entry, depth + 1):
                yield [field, *path]


def _with_nul(method: MethodDescriptor, path: list[FieldDescriptor]) -> Message:
    request = GetMessageClass(method.input_type)()
    target: Any = request
    for field in path[:-1]:
        target = getattr(target, field.name)
        if field.is_repeated:
            target = target.add()
    last = path[-1]
    if last.is_repeated:
        getattr(target, last.name).append("a\x00b")
    else:
        setattr(target, last.name, "a\x00b")
    return request


STRING_FIELDS = [(method, path) for method in METHODS for path in _string_paths(method.input_type)]


@pytest.mark.parametrize(
    ("method", "path"),
    STRING_FIELDS,
    ids=[f"{m.name}.{'.'.join(f.name for f in p)}" for m, p in STRING_FIELDS],
)
def test_a_nul_in_any_string_field_is_invalid_on_every_backend(
    pool: Pool, callers: Callers, method: MethodDescriptor, path: list[FieldDescriptor]
) -> None:
    """PostgreSQL cannot store NUL where SQLite can: refused at the boundary instead, for
    every caller who gets past authorization (the others are refused before)."""
    request = _with_nul(method, path)
    # A session of its own: the fuzzing above may well have logged the admin out.
    admin = pool.login(Account(pool.admin.username))
    fresh = {**callers, "admin": (pool.channel(), admin.auth)}
    codes = {c: _send(fresh, c, method, request) for c in ("admin", "device", "node")}
    allowed = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
    assert set(codes.values()) - allowed <= {grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert grpc.StatusCode.INVALID_ARGUMENT in codes.values(), codes
