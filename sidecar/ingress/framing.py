"""Request framing the sidecar accepts, whatever parser read the request (RFC 9112 section 6).

Pure functions over what a parser hands on; the listeners (limits.py for httptools,
h11_protocol.py for h11) and the forward path apply them, so both parsers answer alike:

| request                                                    | answer                   |
|------------------------------------------------------------|--------------------------|
| Content-Length not a plain run of digits (sign, spaces,    | 400 `bad_request`        |
| hex, a list), or two that differ                           |                          |
| both Content-Length and Transfer-Encoding (CL.TE, TE.CL)   | 400 `bad_request`        |
| Transfer-Encoding in an HTTP/1.0 request (section 6.1)     | 400 `bad_request`        |
| a head with a bare CR or LF, or obs-fold (section 5.2)     | 400 `bad_request`        |
| any transfer coding but one `chunked` (`xchunked`,         | 501 `unsupported`        |
| `gzip, chunked`, `chunked, identity`, two TE fields)       |                          |

Each of these errors closes the connection (errors.py), so no byte after a request whose
end is in doubt is ever read as the next request: that is what request smuggling needs.
Section 6.3 asks exactly this of a server that meets CL and TE together ("MUST close the
connection after responding"); 400 rather than processing by TE alone, as llhttp does.
Section 6.1 lets a server answer 501 to a transfer coding it does not understand; the
sidecar understands `chunked` only, applied once.

A Content-Length is forwarded as its normalised number: some back ends read `010` as octal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sidecar.errors import EgressError

Header = tuple[bytes, bytes]

_CHUNKED = b"chunked"
_OWS = b" \t"
# The end of a request head as h11 finds it (a line break, perhaps a CR, a line break).
_HEAD_END = re.compile(rb"\n\r?\n")


def request_framing(headers: Iterable[Header], http_version: str) -> tuple[bool, bool, bytes | None]:
    """(has_body, chunked, content_length) of a request, or EgressError if it is refused.

    `headers` as the listener hands them (names lower-case); `content_length` is the
    normalised number to forward, None when the request has none. See the module table.
    """
    length: bytes | None = None
    codings = 0  # Transfer-Encoding fields
    only_chunked = True
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():  # ASCII digits only: no sign, space, hex, list
                raise EgressError("bad_request", f"invalid Content-Length {value[:32]!r}")
            number = value.lstrip(b"0") or b"0"
            if length is not None and number != length:
                raise EgressError("bad_request", "conflicting Content-Length values")
            length = number
        elif name == b"transfer-encoding":
            codings += 1
            only_chunked = only_chunked and value.strip(_OWS).lower() == _CHUNKED
    if codings:
        if length is not None:
            raise EgressError("bad_request", "both Content-Length and Transfer-Encoding (RFC 9112 section 6.3)")
        if http_version == "1.0":
            raise EgressError("bad_request", "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)")
        if codings > 1 or not only_chunked:
            raise EgressError("unsupported", "a transfer coding other than one chunked (RFC 9112 section 6.1)")
        return True, True, None
    return length is not None and length != b"0", False, length


def head_problem(buffered: bytes | bytearray) -> str | None:
    """Why the request head at the start of `buffered` is refused; None if it is fine or not
    complete yet.

    llhttp refuses a bare CR or LF and obsolete line folding in a head; h11 takes LF alone as
    a line end and joins folded lines, so the h11 listener asks this first. RFC 9112 section
    2.2 lets a recipient accept a bare LF and section 5.2 lets a server unfold, but two
    parsers that disagree on where a line ends disagree on the headers: refused on both.
    """
    end = _HEAD_END.search(buffered)
    if end is None:
        return None
    head = buffered[: end.end()]
    line_ends = head.count(b"\r\n")
    if head.count(b"\n") != line_ends or head.count(b"\r") != line_ends:
        return "a bare CR or LF in the request head"
    if b"\n " in head or b"\n\t" in head:
        return "obsolete line folding in the request head (RFC 9112 section 5.2)"
    return None


# llhttp's messages for a Transfer-Encoding it will not parse: `chunked, identity` and two TE
# fields while reading the head; `xchunked` after it (the listener's own check comes first).
# Its message for CL and TE together names no backticked header and stays 400.
_LLHTTP_CODING_ERRORS = ("Request has invalid `Transfer-Encoding`", "Invalid `Transfer-Encoding` header value")


def parse_error_kind(message: str) -> str:
    """The error kind for an httptools parse error: `unsupported` for a transfer coding the
    sidecar does not understand (as `request_framing` answers what llhttp lets through),
    `bad_request` for everything else. tests/unit/test_framing.py feeds llhttp the cases."""
    return "unsupported" if message.startswith(_LLHTTP_CODING_ERRORS) else "bad_request"
