"""What the sidecar reports: the observer, Prometheus metrics, the access log, the egress inventory, logging."""
