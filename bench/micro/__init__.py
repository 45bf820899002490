"""Micro-benchmarks: one part of the sidecar alone, in process, apart from the side-by-side harness.

| module                   | measures                                                        |
|--------------------------|-----------------------------------------------------------------|
| `transport_micro`        | our HTTP11Transport vs httpx's default transport, 100 B over TLS |
| `transport_reset_memory` | RSS growth per failed request, ours vs httpx's                  |
| `limits_overhead`        | what the head limits (sidecar/ingress/protocol.py) cost per request       |
| `metrics_cost`           | `Metrics.record` alone, per request                             |
| `observe_cost`           | the access-log line and the observer, per request               |

Run each as `python -m bench.micro.<module>` (after `make compile`); `make bench` runs none of them.
"""
