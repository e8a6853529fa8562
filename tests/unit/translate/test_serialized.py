"""Translated resources are kept serialized: the mapping contract, and no live messages retained."""

from __future__ import annotations

import gc
import types
from collections.abc import Iterator

import pytest
from google.protobuf.message import Message

from controller.translate import SerializedMessages, Translation, Translator
from controller.translate.serialized import serialize
from loom.api import authorization_pb2, workload_pb2
from loom.resources.model import ConfigSnapshot, PolicyRule, ServicePort

from .builders import AMBIENT, MESH, authz, namespace, peer_auth, pod, service, waypoint


def workload(name: str, *services: str) -> workload_pb2.Address:
    address = workload_pb2.Address()
    address.workload.uid = name
    address.workload.name = name
    for host in services:
        address.workload.services[host].ports.add(service_port=80, target_port=8080)
    return address


def test_reads_decode_fresh_values_and_leave_the_stored_bytes_alone() -> None:
    messages = SerializedMessages.of(workload_pb2.Address, {"a": workload("a"), "b": workload("b")})
    assert list(messages) == ["a", "b"] and len(messages) == 2
    assert "a" in messages and "z" not in messages
    first = messages["a"]
    assert first == workload("a")
    assert messages["a"] is not first
    first.workload.name = "changed"
    assert messages["a"].workload.name == "a"
    assert messages.get("z") is None
    with pytest.raises(KeyError):
        messages["z"]


def test_bytes_are_the_deterministic_serialization_and_the_same_object_every_time() -> None:
    # Map entries inserted in two orders: deterministic serialization sorts them, so the bytes agree.
    one = SerializedMessages.of(workload_pb2.Address, {"w": workload("w", "x/s1", "x/s2")})
    two = SerializedMessages.of(workload_pb2.Address, {"w": workload("w", "x/s2", "x/s1")})
    assert one.serialized("w") == two.serialized("w")
    assert one.serialized("w") is one.serialized("w") is one.blobs["w"]
    assert one.serialized("w") == workload("w", "x/s1", "x/s2").SerializeToString(deterministic=True)
    with pytest.raises(TypeError):
        one.blobs["w"] = b""  # type: ignore[index]


def test_equality_is_message_equality() -> None:
    stored = SerializedMessages.of(workload_pb2.Address, {"a": workload("a")})
    assert stored == SerializedMessages.of(workload_pb2.Address, {"a": workload("a")})
    assert stored == {"a": workload("a")}
    assert stored != SerializedMessages.of(workload_pb2.Address, {"a": workload("b")})
    assert stored != SerializedMessages.of(workload_pb2.Address, {"b": workload("a")})
    # Same bytes (empty), different message types: not equal.
    empty_address = SerializedMessages.of(workload_pb2.Address, {"a": workload_pb2.Address()})
    empty_policy = SerializedMessages.of(
        authorization_pb2.Authorization, {"a": authorization_pb2.Authorization()}
    )
    assert empty_address != empty_policy


def test_of_keeps_an_existing_mapping_and_rejects_the_wrong_message_type() -> None:
    stored = SerializedMessages.of(workload_pb2.Address, {"a": workload("a")})
    assert SerializedMessages.of(workload_pb2.Address, stored) is stored
    with pytest.raises(TypeError, match=r"resource 'p' is of type Authorization, expected Address"):
        SerializedMessages.of(workload_pb2.Address, {"p": authorization_pb2.Authorization()})


def test_a_translation_given_messages_stores_them_serialized() -> None:
    policy = authorization_pb2.Authorization(name="p", namespace="ns")
    translation = Translation(addresses={"a": workload("a")}, authorizations={"ns/p": policy})
    assert isinstance(translation.addresses, SerializedMessages)
    assert translation.serialized_authorizations.serialized("ns/p") == serialize(policy)
    assert translation.serialized_addresses is translation.addresses
    assert translation == Translation(addresses={"a": workload("a")}, authorizations={"ns/p": policy})
    assert Translation().addresses == {} and len(Translation().authorizations) == 0


def _reachable(root: object, limit: int = 2_000_000) -> Iterator[object]:
    """Every object reachable from `root` through containers and instances (not through classes,
    modules or functions, which reach the whole program)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen = {id(root)}
    stack = [root]
    while stack:
        assert len(seen) < limit, "object graph larger than expected"
        obj = stack.pop()
        yield obj
        for referent in gc.get_referents(obj):
            if id(referent) not in seen and not isinstance(referent, skip):
                seen.add(id(referent))
                stack.append(referent)


def test_the_translator_keeps_no_live_messages() -> None:
    snapshot = ConfigSnapshot.of(
        [
            namespace("default", AMBIENT),
            waypoint("sa1-wp", for_sa="sa1"),
            service("named", selector={"app": "a"}, ports=(ServicePort(80, name="http", target_port="web"),)),
            service("numeric", selector={"app": "a"}, cluster_ips=("172.16.0.2",)),
            authz("allow-a", selector={"app": "a"}, rules=(PolicyRule(),)),
            peer_auth("strict", mode="STRICT"),
            *(
                pod(f"a{i}", labels={"app": "a"}, sa="sa1", ips=(f"10.0.1.{i}",), ports={"web": 9080})
                for i in range(3)
            ),
        ]
    )
    translator = Translator(MESH)
    translator.update(snapshot)
    changed = pod("a0", labels={"app": "a"}, sa="sa2", ips=("10.0.1.0",), ports={"web": 9080})
    translation = translator.update(snapshot.with_changes(upserts=[changed]))
    assert translation.addresses[f"{MESH.cluster_id}//Pod/default/a0"].workload.service_account == "sa2"
    reached = list(_reachable(translator))
    assert any(isinstance(obj, bytes) for obj in reached)  # the walk does reach the resources
    assert [type(obj).__name__ for obj in reached if isinstance(obj, Message)] == []
