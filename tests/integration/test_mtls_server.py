"""The server speaks mutual TLS only, with client certificates from our CA."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nodepool.client import secure_channel
from nodepool.v1 import (
    master_node_pb2,
    master_node_pb2_grpc,
    node_manager_pb2,
    node_manager_pb2_grpc,
)
from tests.fixtures.server import ServerThread, bearer, sign_up


def _channel(server: ServerThread, issued: Any) -> grpc.Channel:
    return secure_channel(
        server.target, cert=issued.cert_path, key=issued.key_path, ca=issued.ca_path
    )


def test_health_answers_serving_over_mtls(mtls_server: ServerThread, client_cert: Any) -> None:
    with _channel(mtls_server, client_cert) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        service = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="nodepool.v1.NodeManager"), timeout=10
        )
        assert service.status == health_pb2.HealthCheckResponse.SERVING


def test_health_list_answers_every_service(mtls_server: ServerThread, client_cert: Any) -> None:
    # The method is allowed and advertised; it used to raise NotImplementedError.
    with _channel(mtls_server, client_cert) as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
    assert reply.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
    assert (
        reply.statuses["nodepool.v1.UserManager"].status == health_pb2.HealthCheckResponse.SERVING
    )


def test_reflection_lists_the_three_services(mtls_server: ServerThread, node_cert: Any) -> None:
    with _channel(mtls_server, node_cert) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {
        "nodepool.v1.NodeManager",
        "nodepool.v1.UserManager",
        "nodepool.v1.MasterNodeService",
        "grpc.health.v1.Health",
    } <= names


def test_a_task_id_nobody_made_is_not_found(mtls_server: ServerThread, client_cert: Any) -> None:
    token = sign_up(mtls_server, client_cert, "unbuilt-user").access_token
    with _channel(mtls_server, client_cert) as channel:
        stub = master_node_pb2_grpc.MasterNodeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetTaskStatus(
                master_node_pb2.GetTaskStatusRequest(task_id="x"),
                metadata=bearer(token),
                timeout=10,
            )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_method_no_service_has_answers_unimplemented(
    mtls_server: ServerThread, client_cert: Any
) -> None:
    # A name the server does not know is not kept by the pipeline; gRPC answers it.
    token = sign_up(mtls_server, client_cert, "unknown-method-user").access_token
    with _channel(mtls_server, client_cert) as channel:
        unknown = channel.unary_unary("/nodepool.v1.MasterNodeService/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as raised:
            unknown(b"", metadata=bearer(token), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_node_method_refuses_a_client_certificate(
    mtls_server: ServerThread, client_cert: Any
) -> None:
    """The peer identity reaches the pipeline: a client certificate is not a node."""
    with _channel(mtls_server, client_cert) as channel:
        stub = node_manager_pb2_grpc.NodeManagerStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.RegisterNode(node_manager_pb2.RegisterNodeRequest(node_id="node-a"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_tls_client_without_certificate_cannot_call(
    mtls_server: ServerThread, server_cert: Any
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=server_cert.ca_path.read_bytes())
    with (
        grpc.secure_channel(mtls_server.target, credentials) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_a_foreign_ca_cannot_call(
    mtls_server: ServerThread, foreign_client_cert: Any, server_cert: Any
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server_cert.ca_path.read_bytes(),
        private_key=foreign_client_cert.key_path.read_bytes(),
        certificate_chain=foreign_client_cert.cert_path.read_bytes(),
    )
    with (
        grpc.secure_channel(mtls_server.target, credentials) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_never_answered(mtls_server: ServerThread) -> None:
    insecure = grpc.insecure_channel(mtls_server.target)
    with insecure, pytest.raises(grpc.RpcError) as raised:
        health_pb2_grpc.HealthStub(insecure).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_handshake_without_certificate_is_refused_by_tls(
    mtls_server: ServerThread, server_cert: Any
) -> None:
    """Below gRPC: the TLS handshake itself demands a client certificate."""
    context = ssl.create_default_context(cafile=str(server_cert.ca_path))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("localhost", mtls_server.port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                # TLS 1.3 reports the missing certificate on the first read.
                answer = tls.recv(1)
        except (ssl.SSLError, ConnectionError):
            return
    assert answer == b"", "the server answered a client that showed no certificate"
