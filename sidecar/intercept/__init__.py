"""Opt-in TLS interception: the per-pod name-constrained CA, leaf minting, and terminating an app's TLS inside a tunnel."""
