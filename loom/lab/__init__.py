"""The local lab: a cluster on one machine from network namespaces."""
