"""loom-ztunnel: the per-node L4 proxy of the ambient mesh.

One process per node carries the TCP traffic of every enrolled pod on that node over HBONE (HTTP/2
CONNECT inside mutual TLS with SPIFFE identities), enforces L4 authorization, and load balances
services. The package splits along the line "decide in pure code, act in async code":

* `ztunnel.state`: the proxy's in-memory view of the workload API (workloads, services, policies), fed
  by the xDS client and read by the data path. No I/O.
* `ztunnel.decide`: pure outbound and inbound decisions over that state (where a connection goes, with
  which identities; whether an inbound connection is admitted), table-tested.
* `ztunnel.xds`: the delta xDS client to the controller (sans-IO session plus the grpclib stream).
* `ztunnel.identity`: workload certificates from the controller's CA, prefetched, rotated at
  half-life, kept while valid when the CA is unreachable.
* `ztunnel.inpod`: the node agent protocol and the listeners inside each pod's network namespace.
"""
