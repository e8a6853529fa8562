"""In-pod mode: ztunnel's side of the node agent protocol (ZDS) and its work inside pod namespaces.

`protocol` is the sans-IO codec and state machine, `client` the asyncio client that runs proxies through
a `ProxyManager`, and `netns` the namespace handle with the socket factories the proxies use.
"""

from ztunnel.inpod.client import InpodClient, InpodClientConfig, ProxyManager, WorkloadStatus
from ztunnel.inpod.netns import InpodNetns, NetnsError, original_dst
from ztunnel.inpod.protocol import ProtocolError, WorkloadInfo

__all__ = [
    "InpodClient",
    "InpodClientConfig",
    "InpodNetns",
    "NetnsError",
    "ProtocolError",
    "ProxyManager",
    "WorkloadInfo",
    "WorkloadStatus",
    "original_dst",
]
