"""loom-waypoint: the per-service-account L7 proxy (HTTP routing and authorization over HBONE)."""
