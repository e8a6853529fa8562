"""loom-cni: pod enrolment (the in-pod redirection rules in `cni.rules`, the CNI plugin, the node agent)."""
