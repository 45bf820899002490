"""Every test server in one place: the upstreams the sidecar and its transport are tested against.

| module          | what it serves                                                        | used by |
|-----------------|-----------------------------------------------------------------------|---------|
| `upstream`      | `UpstreamServer`: a TLS (or plain) HTTP/1.1 upstream in a thread, with | e2e, sealed, soak |
|                 | paths for every behaviour (`/status/N`, `/bytes/N`, `/slow`...);        |         |
|                 | `SilentTLSServer`, `ResettingServer`; `wait_until`                     |         |
| `loop_upstream` | an asyncio upstream on the test's own loop, for in-process transport   | tests/transport |
|                 | tests (counts connections and handshakes, scripted misbehaviour)       |         |
| `nginx`         | `NginxUpstream`: a real nginx (HTTP/1.1 and HTTP/2) as upstream         | e2e (HTTP/2) |
"""
