"""The mutating admission webhook that injects the egress sidecar into opted-in pods.

`settings` loads what the Helm chart rendered (the container spec from the chart's
`egress-sidecar.container` template: one source of truth for static and webhook injection),
`overrides` reads per-pod annotations, `patch` turns a pod into a JSONPatch (pure),
`review` speaks AdmissionReview v1 (pure), `app` is the ASGI callable, `server` runs it over TLS.
"""
