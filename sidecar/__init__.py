"""egress-sidecar: a Kubernetes sidecar egress proxy.

The package is laid out along the request path; `ls sidecar/` is the map:

    app ──▶ ingress/      listeners and bytes in: accept (burst accept), protocol (our httptools
       │                  protocol: head limits, request-target forms, CONNECT hand-off), framing,
       │                  h11_protocol, writer (response writes), transparent + capture (the egress
       │                  lock's redirected connections), admin (/metrics /healthz /readyz /config
       │                  /destinations)
       ├─ HTTP ──▶ proxy/        the raw ASGI app: routing (scope -> Target), headers, credentials
       │                │
       │                ▼
       │           policy/       host rules, address rules (addresses, hostnames), the connect
       │                │        guard, cloud metadata identity, suggest-policy
       │                ▼
       │           resilience/   sender (breaker, retries, budget), retry, breaker, shedding
       │                ▼
       │           upstream/     client (the one pooled httpx client), tls, transport/ (our
       │                         HTTP/1.1 and HTTP/2 transports) ──▶ upstreams
       ├─ CONNECT / captured TLS ──▶ tunnel/   sni (ClientHello), tunnels (policy, connect, drain),
       │                                        splice (bytes both ways), captured_tls
       │                    └─ intercepted SNI ──▶ intercept/ (per-pod CA, TLS termination) ──▶ proxy/
       └─ observe/   exchange records -> observer -> metrics, access_log, inventory; log

Around it: config (+ default.yaml) and preflight (validation, files), runtime (what the request
path needs, rebuilt on reload), reload, server and lifecycle (processes, signals, drain), cli,
errors (the one error table), exchange (the per-request record; imports nothing of ours),
lock/ (`egress-sidecar lock`: the pod's iptables/nft rules), inject/ (the admission webhook; no
data path), _compat/ (every use of another library's internals).
"""
__version__ = "0.1.0"
