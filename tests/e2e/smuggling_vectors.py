"""Request-smuggling vectors from the public collections (PortSwigger's desync research and
http-request-smuggler's Transfer-Encoding permutations, defparam's smuggler, the llhttp and
h11 test suites): CL.TE, TE.CL, TE.TE obfuscations, Content-Length spellings, line folding.

Each vector is a request head template and a body style. `{n}` in the head becomes the
length of the body. Every body carries a second request (`smuggled`): a sidecar that ends
the first request anywhere but where the client's Content-Length says would read that one
as the next request and forward it.

- CL.TE: Content-Length covers the whole body; a chunked reading ends at `0\\r\\n\\r\\n`,
  right before the smuggled request.
- TE.CL: the smuggled request sits inside one chunk; a Content-Length reading ends after
  the chunk-size line, right before it.
- CL: Content-Length spellings alone; the smuggled request starts where a misread length
  (0, the other of two values) would end the body.
- TE: chunked alone, with chunk lines spelled oddly ("funky chunks": a bare LF ending a
  chunk-size or extension line, a sign, a 0x prefix); the smuggled request sits inside a
  chunk, so only a parser that loses the chunk boundaries could see it as a request.

Outcomes: refused with an answer (a head-level refusal: 400/501 and the connection closed),
refused mid-body (`CLOSED`: the request was already on its way, so the connection is closed
without an answer and the upstream sees a cut body, never a second request), or forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass

CLTE, TECL, CL, TE = "CL.TE", "TE.CL", "CL", "TE"
CLOSED = "closed"  # refused mid-body: closed without an answer (see the module doc)


@dataclass(frozen=True)
class Vector:
    name: str
    head: bytes  # framing header lines, CRLF-separated, no final CRLF; `{n}` = body length
    style: str
    # What the sidecar answers: a refusal's kind (the connection is then closed and nothing
    # forwarded), or None: forwarded as one request, its body intact.
    refused: str | None
    # The h11 listener's answer where it differs: with Content-Length beside a transfer coding
    # other than `chunked`, h11 meets the coding first (501), llhttp the pair (400). Both refuse.
    refused_h11: str | None = "same"
    body: bytes = b""  # style TE: the chunked body; `{s}` becomes a chunk holding the smuggled request

    @property
    def id(self) -> str:
        return f"{self.style}-{self.name}"

    def answer(self, parser: str) -> str | None:
        return self.refused if parser == "httptools" or self.refused_h11 == "same" else self.refused_h11


def _te(name: str, line: bytes, refused: str | None = "bad_request", style: str = CLTE,
        refused_h11: str | None = "same") -> Vector:
    head = b"Content-Length: {n}\r\n" + line if style == CLTE else line + b"\r\nContent-Length: {n}"
    return Vector(name, head, style, refused, refused_h11)


def _coding(name: str, line: bytes, style: str = CLTE) -> Vector:
    return _te(name, line, style=style, refused_h11="unsupported")


VECTORS = [
    # CL.TE and TE.CL with the plain header, then TE.TE obfuscations (each next to a CL).
    _te("plain", b"Transfer-Encoding: chunked"),
    _te("plain", b"Transfer-Encoding: chunked", style=TECL),
    _te("space-before-colon", b"Transfer-Encoding : chunked"),
    _te("tab-before-colon", b"Transfer-Encoding\t: chunked"),
    _te("tab-value", b"Transfer-Encoding:\tchunked"),
    _te("tab-value", b"Transfer-Encoding:\tchunked", style=TECL),
    _te("no-space", b"Transfer-Encoding:chunked"),
    _te("double-space", b"Transfer-Encoding:  chunked"),
    _te("tab-suffix", b"Transfer-Encoding: chunked\t"),
    _te("vtab-value", b"Transfer-Encoding:\x0bchunked"),
    _te("formfeed-value", b"Transfer-Encoding:\x0cchunked"),
    _te("name-prefix-space", b" Transfer-Encoding: chunked"),
    _te("obs-fold", b"Transfer-Encoding:\r\n chunked"),
    _te("obs-fold-tab", b"X-Pad: a\r\n\tTransfer-Encoding: chunked"),
    _te("uppercase", b"TRANSFER-ENCODING: CHUNKED"),
    _te("mixed-case", b"TrAnSFer-EnCODinG: cHuNkeD"),
    _coding("chunked-identity", b"Transfer-Encoding: chunked, identity"),
    _coding("identity-chunked", b"Transfer-Encoding: identity, chunked"),
    _coding("gzip-chunked", b"Transfer-Encoding: gzip, chunked"),
    _coding("xchunked", b"Transfer-Encoding: xchunked"),
    _coding("xchunked", b"Transfer-Encoding: xchunked", style=TECL),
    _coding("chunk", b"Transfer-Encoding: chunk"),
    _coding("quoted", b'Transfer-Encoding: "chunked"'),
    _coding("cow-then-chunked", b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked"),
    _coding("chunked-then-cow", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: cow"),
    _coding("chunked-twice", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
    _te("cr-suffix", b"Transfer-Encoding: chunked\r"),
    _te("cr-in-name", b"Transfer\r-Encoding: chunked"),
    _te("lf-line-end", b"Transfer-Encoding: chunked\n"),
    _te("nul-suffix", b"Transfer-Encoding: chunked\x00"),
    # Look-alikes: not framing headers at all (forwarded by Content-Length, look-alike dropped).
    _te("underscore", b"Transfer_Encoding: chunked", refused=None),
    _te("space-in-name", b"Transfer Encoding: chunked"),
    _te("backslash-in-name", b"Transfer\\Encoding: chunked"),
    _te("content-encoding", b"Content-Encoding: chunked", refused=None),
    # Content-Length spellings.
    Vector("two-values", b"Content-Length: {n}\r\nContent-Length: 0", CL, "bad_request"),
    Vector("two-values-reversed", b"Content-Length: 0\r\nContent-Length: {n}", CL, "bad_request"),
    Vector("list", b"Content-Length: {n}, 0", CL, "bad_request"),
    Vector("plus-sign", b"Content-Length: +{n}", CL, "bad_request"),
    Vector("minus-zero", b"Content-Length: -0\r\nContent-Length: {n}", CL, "bad_request"),
    Vector("space-inside", b"Content-Length: 0 {n}", CL, "bad_request"),
    Vector("hex", b"Content-Length: 0x0{n}", CL, "bad_request"),
    Vector("underscore", b"Content-Length: {n}\r\nContent_Length: 0", CL, None),
    Vector("leading-zeros", b"Content-Length: 000{n}", CL, None),
    Vector("obs-fold", b"Content-Length:\r\n {n}", CL, "bad_request"),
    Vector("space-before-colon", b"Content-Length : {n}", CL, "bad_request"),
    # Chunk lines (TE alone).
    Vector("size-bare-lf", b"Transfer-Encoding: chunked", TE, CLOSED, body=b"2\nxx\r\n{s}0\r\n\r\n"),
    Vector("ext-bare-lf", b"Transfer-Encoding: chunked", TE, CLOSED, body=b"2;a\nxx\r\n{s}0\r\n\r\n"),
    Vector("data-bare-lf", b"Transfer-Encoding: chunked", TE, CLOSED, body=b"2\r\nxx\n{s}0\r\n\r\n"),
    Vector("size-0x", b"Transfer-Encoding: chunked", TE, CLOSED, body=b"0x2\r\nxx\r\n{s}0\r\n\r\n"),
    Vector("size-sign", b"Transfer-Encoding: chunked", TE, CLOSED, body=b"+2\r\nxx\r\n{s}0\r\n\r\n"),
    # h11 reads whitespace before a chunk-size line's CRLF as the BWS of an empty extension
    # (RFC 9112 7.1.1): the same size, the same boundaries, so it forwards; llhttp refuses.
    Vector("size-space", b"Transfer-Encoding: chunked", TE, CLOSED, refused_h11=None,
           body=b"2 \r\nxx\r\n{s}0\r\n\r\n"),
    Vector("ext-quoted-crlf", b"Transfer-Encoding: chunked", TE, CLOSED,
           body=b'2;a="\r\nxx\r\n"\r\nxx\r\n{s}0\r\n\r\n'),
    Vector("size-leading-zeros", b"Transfer-Encoding: chunked", TE, None, body=b"0002\r\nxx\r\n{s}0\r\n\r\n"),
    Vector("ext-plain", b"Transfer-Encoding: chunked", TE, None, body=b"2;name=value\r\nxx\r\n{s}0\r\n\r\n"),
]


def payload(vector: Vector, tag: str, host: str) -> tuple[bytes, int]:
    """The bytes to send in one write (the vector's request, then a `Connection: close`
    marker request), and the body length the client framed by Content-Length."""
    smuggled = f"GET /up/echo/{tag}/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    if vector.style == CLTE:
        body = b"0\r\n\r\n" + smuggled
        length = len(body)
    elif vector.style == TECL:
        size_line = b"%x\r\n" % len(smuggled)
        body = size_line + smuggled + b"\r\n0\r\n\r\n"
        length = len(size_line)
    elif vector.style == TE:
        chunk = b"%x\r\n" % len(smuggled) + smuggled + b"\r\n"
        body = vector.body.replace(b"{s}", chunk)
        length = 2 + len(smuggled)  # "xx" and the smuggled bytes, de-chunked
    else:
        body = smuggled
        length = len(body)
    head = vector.head.replace(b"{n}", str(length).encode())
    first = f"POST /up/echo/{tag}/first HTTP/1.1\r\nHost: {host}\r\n".encode() + head + b"\r\n\r\n"
    marker = f"GET /up/echo/{tag}/marker HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    return first + body + marker, length
