"""Kubernetes-format configuration: the typed model (`model`) and the validating YAML loader (`loader`)."""
