from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Manifest(_message.Message):
    __slots__ = ("kind", "namespace", "name", "resource_version", "json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    namespace: str
    name: str
    resource_version: str
    json: bytes
    def __init__(self, kind: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ..., resource_version: _Optional[str] = ..., json: _Optional[bytes] = ...) -> None: ...

class ServedService(_message.Message):
    __slots__ = ("namespace", "name", "hostname")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    hostname: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class WaypointConfig(_message.Message):
    __slots__ = ("namespace", "name", "trust_domain", "service_account", "traffic_type", "gateway", "services", "routes", "policies")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_TYPE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    trust_domain: str
    service_account: str
    traffic_type: str
    gateway: Manifest
    services: _containers.RepeatedCompositeFieldContainer[ServedService]
    routes: _containers.RepeatedCompositeFieldContainer[Manifest]
    policies: _containers.RepeatedCompositeFieldContainer[Manifest]
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., trust_domain: _Optional[str] = ..., service_account: _Optional[str] = ..., traffic_type: _Optional[str] = ..., gateway: _Optional[_Union[Manifest, _Mapping]] = ..., services: _Optional[_Iterable[_Union[ServedService, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[Manifest, _Mapping]]] = ..., policies: _Optional[_Iterable[_Union[Manifest, _Mapping]]] = ...) -> None: ...
