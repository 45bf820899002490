"""lock.skip_cidrs and lock.skip_ports are holes: what they list is neither captured nor checked,
and everything else still is (tests/sealed/pod.py's pod and world; real lock and sidecar)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trustme

from tests.sealed import pod
from tests.sealed.catchers import Catchers
from tests.sealed.locked import LockedPod, start

CONFIG = {
    "policy": {"default": "deny"},
    "lock": {"skip_cidrs": ["10.0.0.1/32"], "skip_ports": [5432]},
}


@pytest.fixture(scope="module")
def holes(ca: trustme.CA) -> Iterator[tuple[Catchers, LockedPod]]:
    made: list[Catchers] = []
    locked = start("holes", ca.cert_pem.bytes(), CONFIG,
                   before_lock=lambda locked: made.append(pod.in_netns(locked.net.world, Catchers,
                                                                      {80: None, 5432: None})))
    yield made[0], locked
    made[0].stop()
    locked.stop()


def _caught(catchers: Catchers, locked: LockedPod) -> list[tuple[str, int]]:
    pod.in_netns(locked.net.world, catchers.barrier)
    return [(c.address, c.port) for c in catchers.connections()]


@pytest.mark.parametrize(("url", "target"), [("http://10.0.0.1/", ("10.0.0.1", 80)),
                                             ("http://1.1.1.1:5432/", ("1.1.1.1", 5432))])
def test_a_hole_goes_direct_past_the_sidecar(holes: tuple[Catchers, LockedPod], url: str,
                                             target: tuple[str, int]) -> None:
    catchers, locked = holes
    catchers.clear()
    status, headers, body, _code = locked.curl(url)
    assert (status, body) == (200, f"caught {target[0]}:{target[1]}".encode())  # the catcher answered itself
    assert "x-egress-error" not in headers
    assert _caught(catchers, locked) == [target]
    assert not any(e.get("upstream") in (f"{target[0]}:{target[1]}",) for e in locked.logs())  # never seen


def test_outside_the_holes_the_lock_still_holds(holes: tuple[Catchers, LockedPod]) -> None:
    catchers, locked = holes
    catchers.clear()
    status, headers, _body, _code = locked.curl("http://1.1.1.1/")
    assert (status, headers.get("x-egress-error")) == (403, "denied_host")
    assert _caught(catchers, locked) == []
