"""The Casbin policy names exactly the RPCs the server serves: no more, no fewer.

A served method missing from the policy would be denied to everyone; a policy method the
server does not serve is a stale grant waiting for a new RPC of the same name. The served
set comes from the generated descriptors of the services the server registers, not from a
hand-written list.
"""

from __future__ import annotations

import importlib
import pkgutil

from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import nodepool.server.reflection_v1  # registers the v1 reflection descriptor
import nodepool.v1
from nodepool.auth.authorization import Authorizer, default_policy_dir
from nodepool.server.app import SERVICE_NAMES
from nodepool.server.methods import HEALTH_SERVICE, METHOD_ACCESS, REFLECTION_SERVICES


def _register_descriptors() -> None:
    # Importing a generated module adds its file to the default pool. Every *_pb2 module
    # is imported, so a service added in a new .proto file is found without editing this.
    for module in pkgutil.iter_modules(nodepool.v1.__path__):
        if module.name.endswith("_pb2"):
            importlib.import_module(f"nodepool.v1.{module.name}")
    assert health_pb2.DESCRIPTOR.services_by_name["Health"].full_name == HEALTH_SERVICE
    assert reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


def served_methods() -> set[str]:
    _register_descriptors()
    pool = descriptor_pool.Default()
    services = (*SERVICE_NAMES, HEALTH_SERVICE, *REFLECTION_SERVICES)
    methods: set[str] = set()
    for name in services:
        service = pool.FindServiceByName(name)
        methods.update(f"/{service.full_name}/{method.name}" for method in service.methods)
    return methods


def policy_methods() -> set[str]:
    return set(Authorizer.from_directory(default_policy_dir()).methods())


def test_served_methods_are_found() -> None:
    # Guards the comparison below against an empty or half-registered descriptor pool.
    served = served_methods()
    assert "/nodepool.v1.UserManager/LoginUser" in served
    assert "/grpc.health.v1.Health/Check" in served
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in served


def test_policy_names_exactly_the_served_methods() -> None:
    served = served_methods()
    policy = policy_methods()
    missing = sorted(served - policy)
    stale = sorted(policy - served)
    assert not missing, f"served but not in policies/policy.csv (denied to everyone): {missing}"
    assert not stale, f"in policies/policy.csv but not served (stale grant): {stale}"


def test_policy_names_exactly_the_method_table() -> None:
    table = set(METHOD_ACCESS)
    policy = policy_methods()
    missing = sorted(table - policy)
    stale = sorted(policy - table)
    assert not missing, f"in METHOD_ACCESS but not in policies/policy.csv: {missing}"
    assert not stale, f"in policies/policy.csv but not in METHOD_ACCESS: {stale}"
