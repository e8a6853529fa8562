"""Waypoints in the controller: running them, configuring them, letting them in.

* `desired`: what runs a waypoint Gateway (ServiceAccount, Deployment, Service) and what its status
  says; pure.
* `reconciler`: keeps those objects and the Gateway's status in line with the configuration, through
  an `Applier`: `kubernetes.KubernetesApplier` (the API server) or `store.StoreApplier` (the lab's
  object store, plus `store.LabCredentialFiles`). Enabled by `--deploy-waypoints`.
* `xds`: each waypoint's WaypointConfig resource (loom/api/waypoint.proto), built after every
  translation and served to that waypoint only.
* `auth`: how a waypoint authenticates (lab credential, or its pod's service-account token) and is
  told apart from a node proxy; the xDS server and the CA scope what it may see and get from that.

Modules are imported by what they need: `kubernetes` pulls in kubernetes_asyncio and `store` the lab's
store, so the package itself imports none of them.
"""
