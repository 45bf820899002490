"""The egress lock: `egress-sidecar lock` installs rules that send every outbound connection through the sidecar."""
