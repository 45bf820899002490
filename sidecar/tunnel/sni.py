"""The TLS ClientHello a tunnel's client sends first, and the server name in it. Pure, no I/O.

A CONNECT tunnel (and a captured TLS connection) is checked on its first client bytes
before any of them goes upstream (sidecar/tunnel/tunnels.py): they must be a TLS ClientHello
(RFC 8446 4.1.2, RFC 5246 7.4.1.2) whose server_name (RFC 6066 3) names the host that was
checked. `parse_client_hello` is fed everything buffered so far and says one of:

- `Incomplete(need)`: a ClientHello may still come; read until `need` bytes in all (the end
  of the record under way), then ask again (bounded by the caller);
- `NotClientHello(reason, detail)`: `not_tls` (the first byte is not a TLS handshake
  record: plain HTTP, SSH, an SSLv2 hello) or `bad_hello` (a TLS record that is not a
  well-formed ClientHello: wrong message, lengths that do not add up, two server names, a
  name that is not ASCII, or a hello larger than the caller's bound);
- `ClientHello(sni)`: the host name, or None when the extension is absent.

The handshake message may be split over several records (at most MAX_HELLO_RECORDS) and
each record over several reads; both are reassembled here. With `need`, a hello trickled a
byte per read is parsed once per record, not once per byte. Records are 2^14 bytes at most (RFC 8446 5.1); a
ClientHello is a few hundred bytes to a few KiB (post-quantum key shares), so the caller's
bound (64 KiB by default) is generous and still keeps a silent or hostile client cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.policy.hostnames import canonical_host

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_HOST_NAME = 0x00
_MAX_RECORD = 1 << 14  # TLSPlaintext.length limit
MAX_HELLO_BYTES = 65536
# A ClientHello fits one record; a few middleboxes split it in two or three. Far more is an
# attempt to make the reassembly expensive (a record per byte): refused.
MAX_HELLO_RECORDS = 16


@dataclass(frozen=True, slots=True)
class Incomplete:
    """More bytes are needed to decide: at least `need` in all (parsing sooner is wasted work)."""

    need: int = 1


@dataclass(frozen=True, slots=True)
class NotClientHello:
    reason: str  # "not_tls" or "bad_hello"
    detail: str


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None  # as sent (ASCII); compare with `names_match`


Parsed = Incomplete | NotClientHello | ClientHello


class _Bad(Exception):
    pass


def parse_client_hello(data: bytes, limit: int = MAX_HELLO_BYTES) -> Parsed:
    """What the first client bytes `data` are (see the module doc); `limit` bounds the hello."""
    if not data:
        return Incomplete(1)
    if data[0] != _HANDSHAKE:
        return NotClientHello("not_tls", f"first byte 0x{data[0]:02x} is not a TLS handshake record")
    try:
        message = _reassemble(data, limit)
        if isinstance(message, int):
            if len(data) > limit:
                return NotClientHello("bad_hello", f"no complete ClientHello in {len(data)} bytes")
            return Incomplete(message)
        return ClientHello(_server_name(message))
    except _Bad as exc:
        return NotClientHello("bad_hello", str(exc))


def _reassemble(data: bytes, limit: int) -> bytes | int:
    """The complete ClientHello body from the handshake records at the start of `data`, or
    the number of bytes `data` must reach before another try can get further."""
    fragments: list[bytes] = []
    have = 0
    needed = -1  # handshake message length (header included) once its 4-byte header is in
    offset = 0
    while True:
        if len(fragments) >= MAX_HELLO_RECORDS:
            raise _Bad(f"ClientHello split over more than {MAX_HELLO_RECORDS} records")
        if len(data) - offset < 5:
            return offset + 5
        kind, major, length = data[offset], data[offset + 1], int.from_bytes(data[offset + 3 : offset + 5], "big")
        if kind != _HANDSHAKE:
            raise _Bad(f"record type {kind} before the ClientHello was complete")
        if major != 3:
            raise _Bad(f"record version {major}.{data[offset + 2]} is not TLS")
        if length == 0 or length > _MAX_RECORD:
            raise _Bad(f"record length {length}")
        if len(data) - offset - 5 < length:
            return offset + 5 + length
        fragments.append(data[offset + 5 : offset + 5 + length])
        have += length
        offset += 5 + length
        if needed < 0 and have >= 4:
            head = b"".join(fragments)
            if head[0] != _CLIENT_HELLO:
                raise _Bad(f"handshake message type {head[0]} is not a ClientHello")
            needed = 4 + int.from_bytes(head[1:4], "big")
            if needed > limit:
                raise _Bad(f"ClientHello of {needed} bytes is over the {limit}-byte bound")
        if needed >= 0 and have >= needed:
            if have > needed:
                raise _Bad("bytes after the ClientHello in its records")
            return b"".join(fragments)[4:]


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise _Bad("ClientHello shorter than its lengths say")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _server_name(body: bytes) -> str | None:
    reader = _Reader(body)
    reader.take(2 + 32)  # legacy_version, random
    if len(reader.vector(1)) > 32:
        raise _Bad("session id longer than 32 bytes")
    suites = reader.vector(2)
    if not suites or len(suites) % 2:
        raise _Bad("bad cipher suite list")
    if not reader.vector(1):
        raise _Bad("no compression method")
    if reader.left == 0:
        return None  # no extensions at all (TLS 1.0 style)
    extensions = _Reader(reader.vector(2))
    if reader.left:
        raise _Bad("bytes after the extensions")
    found: str | None = None
    seen: set[int] = set()
    while extensions.left:
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind in seen:
            raise _Bad(f"extension {kind} sent twice")  # RFC 8446 4.2
        seen.add(kind)
        if kind == _SERVER_NAME:
            found = _host_name(data)
    return found


def _host_name(data: bytes) -> str:
    names = _Reader(_Reader(data).vector(2))
    if len(data) != 2 + len(names.data):
        raise _Bad("bytes after the server name list")
    host: str | None = None
    while names.left:
        kind = names.number(1)
        name = names.vector(2)
        if kind != _HOST_NAME:
            continue  # no other type is defined; RFC 6066 lets a server ignore unknown ones
        if host is not None:
            raise _Bad("two host names in server_name")  # RFC 6066 3: at most one per type
        if not name or not name.isascii():
            raise _Bad("server name is empty or not ASCII")
        host = name.decode("ascii")
    if host is None:
        raise _Bad("server_name extension without a host name")
    return host


def names_match(sni: str, host: str) -> bool:
    """Whether a ClientHello's server name names `host`, compared like host rules.

    Case, one trailing dot and IDNA form are ignored (hostnames.canonical_host); an
    invalid name never matches.
    """
    try:
        return canonical_host(sni) == canonical_host(host)
    except ValueError:
        return False
