"""Out to the upstreams: the one pooled httpx client, TLS contexts, and our HTTP/1.1 and HTTP/2 transports."""
