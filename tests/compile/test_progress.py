"""Progress of long sweeps: a short job's log stays short, an hour-long one's keeps moving."""

from __future__ import annotations

from types import SimpleNamespace

from lsaq_compile.progress import throttled


def _dones(lines: list[str]) -> list[int]:
    return [int(s.split("done=")[1].split(",")[0]) for s in lines]


def test_throttled_prints_first_last_and_every_interval():
    now = [0.0]
    said: list[str] = []
    show = throttled(said.append, seconds=30, clock=lambda: now[0])
    for done in range(1, 33):          # a layer every 10 s: a line every third layer
        now[0] += 10
        show(SimpleNamespace(done=done, total=32))
    assert _dones(said) == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 32]
    quick: list[str] = []
    show = throttled(quick.append, seconds=30, clock=lambda: 0.0)   # a pass in no time
    for done in range(1, 31):
        show(SimpleNamespace(done=done, total=30))
    assert _dones(quick) == [1, 30]
