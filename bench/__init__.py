"""Side-by-side benchmark of egress-sidecar and its peers: `make bench` (see bench/README.md)."""
