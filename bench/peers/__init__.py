"""The peers the sidecar is measured against (each a small, idiomatic program of its kind)."""
