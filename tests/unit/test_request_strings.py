"""The one input rule: no control characters in any string field of any request."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from nodepool.errors import InvalidArgumentError
from nodepool.server.inputs import check_request_strings
from nodepool.v1 import audit_pb2, node_manager_pb2, user_manager_pb2


@pytest.mark.parametrize(
    "message",
    [
        user_manager_pb2.RevokeApiKeyRequest(key_id="\0"),
        user_manager_pb2.UpdateUserProfileRequest(username="alice\x00"),
        user_manager_pb2.UpdateUserProfileRequest(email="a\x1b[2Jb@example.com"),  # optional
        user_manager_pb2.CreateApiKeyRequest(scopes=["user", "adm\x7fin"]),  # repeated
        user_manager_pb2.LoginUserRequest(password="\x85"),  # a C1 control
        node_manager_pb2.RegisterNodeRequest(labels={"zone\0": "eu"}),  # map key
        node_manager_pb2.RegisterNodeRequest(labels={"zone": "e\x07u"}),  # map value
        audit_pb2.AuditEvent(detail={"reason": "\x00"}),
        health_pb2.HealthListResponse(  # a map of messages, then a nested message
            statuses={"a\x01": health_pb2.HealthCheckResponse()}
        ),
    ],
)
def test_control_characters_are_refused_anywhere(message: object) -> None:
    with pytest.raises(InvalidArgumentError, match="control characters"):
        check_request_strings(message)


@pytest.mark.parametrize(
    "message",
    [
        user_manager_pb2.RegisterUserRequest(username="alice", password="pässwörd ✓ 🐝"),
        user_manager_pb2.UpdateUserProfileRequest(email="", new_password="tab\tnew\nline\r"),
        node_manager_pb2.RegisterNodeRequest(labels={"zone": "eu-west"}),
        user_manager_pb2.LogoutUserRequest(),
        b"not a message",
    ],
)
def test_ordinary_text_passes(message: object) -> None:
    check_request_strings(message)
