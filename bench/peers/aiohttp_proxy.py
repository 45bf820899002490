"""Peer: the proxy an experienced aiohttp user would write, to measure egress-sidecar against.

An aiohttp.web server (uvloop, like ours) and ONE aiohttp.ClientSession with a pooled
TCPConnector (limit 100 = our default pool size, verified TLS against the given CA). A request
to `<prefix>/path?q` goes to `<upstream>/path?q`; the request body streams up, the raw response
body (no decompression) streams down chunk by chunk. Hop-by-hop headers (RFC 9110 §7.6.1, and
those the Connection header names) are dropped both ways; the client adds none of its own.
No access log (aiohttp's default when logging is not configured).

Run: python bench/peers/aiohttp_proxy.py --port 8080 --upstream https://127.0.0.1:8443 \
         --prefix /up --ca-file ca.pem
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
SESSION = web.AppKey("session", aiohttp.ClientSession)


def end_to_end(headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """The headers a proxy passes on: all but hop-by-hop ones, repeated ones kept in order."""
    named = {token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")}
    skip = HOP_BY_HOP | named | drop
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in skip)


def make_app(upstream: str, prefix: str, ca_file: str | None, pool: int) -> web.Application:
    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        context = ssl.create_default_context(cafile=ca_file)
        connector = aiohttp.TCPConnector(limit=pool, limit_per_host=0, ssl=context, keepalive_timeout=60)
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=30),
        ) as session:
            app[SESSION] = session
            yield

    async def proxy(request: web.Request) -> web.StreamResponse:
        path = request.raw_path
        if not path.startswith(prefix):
            return web.Response(status=404, text="no route\n")
        url = upstream + path[len(prefix):]
        response: web.StreamResponse | None = None
        try:
            async with request.app[SESSION].request(
                request.method, url,
                headers=end_to_end(request.headers, drop=frozenset({"host"})),
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            ) as answer:
                response = web.StreamResponse(status=answer.status, reason=answer.reason,
                                              headers=end_to_end(answer.headers))
                await response.prepare(request)
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            if request.transport is None or request.transport.is_closing():
                # The client went away (e.g. wrk stopping): leaving the `async with` has already
                # released the upstream connection; there is nobody to answer.
                return response or web.Response(status=499)
            if response is not None and response.prepared:
                raise  # headers already went out: aiohttp aborts the connection (truncated body)
            return web.Response(status=502, text=f"upstream error: {type(exc).__name__}\n")

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. https://127.0.0.1:8443")
    parser.add_argument("--prefix", default="/up")
    parser.add_argument("--ca-file")
    parser.add_argument("--pool", type=int, default=100)
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(args.upstream.rstrip("/"), args.prefix, args.ca_file, args.pool),
                host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
