"""Delta xDS: serving the workload API (Address, Authorization) to node proxies.

`resources` versions and pre-serializes what is served (once per content, shared by all streams);
`delta` is the sans-IO per-stream protocol state; `server` is the grpc.aio servicer that authenticates
each stream, debounces publications and fans them out so that a slow stream never delays the others.
"""
