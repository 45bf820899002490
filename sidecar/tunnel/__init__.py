"""TCP tunnels under the egress policy: CONNECT (authority-form) and TLS captured by the egress lock; the SNI check; the splice."""
