"""egress-sidecar: a Kubernetes sidecar egress proxy."""

__version__ = "0.1.0"
