"""`loom-cni-agent`: the per-node agent that enrols pods into the mesh (in-pod redirection + ZDS)."""
