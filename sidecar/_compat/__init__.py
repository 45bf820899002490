"""The one seam for other libraries' internals: private attributes and copied private code.

Speed sometimes needs what a library does not promise to keep: an httpx object built without
its constructor, httpcore's network backend swapped, an h2 error told apart by its text, a
uvicorn method rewritten. Every such use lives here, one module per library, each with a
docstring listing exactly what it touches. pyproject.toml bounds these libraries to the
minors they were tested with, constraints.txt pins the exact versions, and
tests/unit/test_compat_contract.py fails on an upgrade naming what to re-read.

| module      | library   | touches                                                          |
|-------------|-----------|------------------------------------------------------------------|
| `httpx`     | httpx     | `URL._uri_reference`, `_urlparse.ParseResult`, `Headers._list`,  |
|             |           | `Request`/`Response` built with `__new__`, `ByteStream._stream`  |
| `httpcore`  | httpcore  | `AsyncHTTPTransport._pool`, `AsyncConnectionPool._network_backend`,|
|             |           | `AsyncHTTP11Connection._response_closed` (replaced)              |
| `h2`        | h2        | exception/event class names, the text of a closed-state error    |
| `h11`       | h11       | `Connection._receive_buffer`; uvicorn's `H11Protocol` (h11 listener)|
| `uvicorn`   | uvicorn   | the httptools protocol and cycle we subclass and partly rewrite, |
|             |           | `Server.capture_signals`, the protocol factory of `startup`      |

Only `_compat` may import these libraries' private names; tests/unit/test_layering.py keeps
the rest of the sidecar away from them.
"""
