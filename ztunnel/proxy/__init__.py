"""The node proxy's data path: per-pod listeners inside pod namespaces, and what they do.

* `manager`: `InpodProxyManager`, the `ProxyManager` the ZDS client drives (one proxy per pod);
* `workload`: `WorkloadProxy`, one pod's 15001 / 15006 / 15008 and their connection handling;
* `context`: `ProxyContext` / `ProxySettings`, what every pod proxy of one ztunnel shares;
* `local`: which Workload an enrolled pod is, and waiting for it to arrive over xDS;
* `relay`: plain TCP socket-to-socket copying with back-pressure, and RST refusal.
"""

from ztunnel.proxy.context import CertificateSource, ProxyContext, ProxySettings
from ztunnel.proxy.local import StateChanges, find_local_workload
from ztunnel.proxy.manager import InpodProxyManager
from ztunnel.proxy.relay import RelayResult, refuse, relay
from ztunnel.proxy.workload import UnknownWorkload, WorkloadProxy

__all__ = [
    "CertificateSource",
    "InpodProxyManager",
    "ProxyContext",
    "ProxySettings",
    "RelayResult",
    "StateChanges",
    "UnknownWorkload",
    "WorkloadProxy",
    "find_local_workload",
    "refuse",
    "relay",
]
