"""The node proxy's state: the workload API (workloads, services, L4 policies) as received over xDS.

`ProxyState` (in `store`) is written by the xDS client one response at a time and read by the data
path and the identity manager; `workload` holds the pure helpers for reading the protos it keeps.
"""

from ztunnel.state.store import (
    BrokenAddress,
    Endpoint,
    ProxyState,
    StateChange,
    WaypointBackends,
    WaypointUnavailable,
)
from ztunnel.state.workload import (
    HBONE_PORT,
    AddressError,
    IPAddress,
    Service,
    Workload,
    packed_ip,
    same_family_ip,
    service_key,
    speaks_hbone,
    validate_address,
    workload_identity,
    workload_ips,
)

__all__ = [
    "HBONE_PORT",
    "AddressError",
    "BrokenAddress",
    "Endpoint",
    "IPAddress",
    "ProxyState",
    "Service",
    "StateChange",
    "WaypointBackends",
    "WaypointUnavailable",
    "Workload",
    "packed_ip",
    "same_family_ip",
    "service_key",
    "speaks_hbone",
    "validate_address",
    "workload_identity",
    "workload_ips",
]
