"""The staging ring's bookkeeping (`actors.runner.transfer.StagingRing`) on a plain CPU buffer with fake events:
which regions it hands out, which marks it waits for before handing bytes out again, and what it refuses."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from actors.request import Request, SamplingParams
from actors.runner import transfer
from actors.runner.sampler import Sampler
from actors.runner.transfer import STAGING_ALIGN, StagingRing, to_device

CAPACITY = 4096  # largest take: 1024 bytes


class FakeEvent:
    """Remembers the stream it was recorded on; appends itself to `waited` on each `synchronize()`; `query()`
    says `completed`."""

    def __init__(self, waited: list[FakeEvent]) -> None:
        self.waited = waited
        self.stream: Any = "unrecorded"
        self.completed = False

    def record(self, stream: Any = None) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        self.waited.append(self)

    def query(self) -> bool:
        return self.completed


class Harness:
    def __init__(self, capacity: int = CAPACITY, max_pending_marks: int = 1024) -> None:
        self.buffer = torch.zeros(capacity, dtype=torch.uint8)
        self.waited: list[FakeEvent] = []
        self.oversize_calls: list[int] = []
        self.ring = StagingRing(self.buffer, lambda: FakeEvent(self.waited), self._oversize, max_pending_marks)

    def _oversize(self, nbytes: int) -> torch.Tensor:
        self.oversize_calls.append(nbytes)
        return torch.zeros(nbytes, dtype=torch.uint8)

    def offset(self, t: torch.Tensor) -> int:
        return t.data_ptr() - self.buffer.data_ptr()

    def take_marked(self, nbytes: int) -> tuple[torch.Tensor, FakeEvent]:
        region = self.ring.take((nbytes,), torch.uint8)
        return region, self.ring.mark()


def test_regions_are_aligned_views_that_do_not_overlap_within_a_lap() -> None:
    h = Harness()
    shapes = [((3,), torch.int64), ((5,), torch.int32), ((7,), torch.bool), ((2, 3), torch.float16),
              ((1,), torch.int64), ((33,), torch.int32)]
    regions = []
    for shape, dtype in shapes:
        t = h.ring.take(shape, dtype)
        assert t.shape == shape and t.dtype == dtype
        assert h.offset(t) % STAGING_ALIGN == 0
        regions.append(t)
        h.ring.mark()
    spans = sorted((h.offset(t), h.offset(t) + t.numel() * t.element_size()) for t in regions)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    for i, t in enumerate(regions):
        t.view(torch.uint8).fill_(i + 1)
    assert all(bool((t.view(torch.uint8) == i + 1).all()) for i, t in enumerate(regions))
    assert h.waited == []


def test_stage_puts_a_copy_of_the_host_tensor_in_a_region_of_the_ring() -> None:
    h = Harness()
    values = torch.arange(7, dtype=torch.int32)
    staged = h.ring.stage(values)
    assert torch.equal(staged, values) and staged.dtype == torch.int32
    assert 0 <= h.offset(staged) < CAPACITY and h.ring.last_position is not None
    values[0] = 99  # a copy: the region keeps what was staged
    assert int(staged[0]) == 0


def test_wrapping_waits_for_exactly_the_marks_whose_bytes_it_hands_out_again() -> None:
    h = Harness()
    marks = [h.take_marked(1024)[1] for _ in range(3)]  # [0, 3072)
    h.take_marked(512)  # [3072, 3584)
    region, _ = h.take_marked(768)  # does not fit before the end: at 0 of the next lap
    assert h.offset(region) == 0
    assert h.waited == [marks[0]]
    h.take_marked(512)  # [768, 1280): into the second mark's bytes
    assert h.waited == [marks[0], marks[1]]
    h.take_marked(256)  # [1280, 1536): the second mark's bytes again, already waited for
    assert h.waited == [marks[0], marks[1]]


def test_a_take_that_skips_the_buffers_end_waits_for_the_marks_there_too() -> None:
    h = Harness()
    first_lap = [h.take_marked(n)[1] for n in (1024, 1024, 1024, 768, 256)]  # the last: [3840, 4096)
    second_lap = [h.take_marked(n)[1] for n in (1024, 1024, 1024, 512)]  # [0, 3584)
    assert h.waited == first_lap[:4]
    region, _ = h.take_marked(1024)  # does not fit in [3584, 4096): at 0 of the third lap
    assert h.offset(region) == 0
    assert h.waited == [*first_lap, second_lap[0]]


def test_the_mark_covers_every_region_since_the_last_one() -> None:
    h = Harness()
    for _ in range(3):
        h.ring.take((256,), torch.uint8)  # three regions, one mark
    first = h.ring.mark()
    second = h.take_marked(1024)[1]  # [768, 1792)
    h.take_marked(1024)  # [1792, 2816)
    h.take_marked(1024)  # [2816, 3840)
    h.take_marked(256)  # [3840, 4096): full
    h.take_marked(256)  # next lap [0, 256): bytes of the first mark's first region
    assert h.waited == [first]
    h.take_marked(512)  # [256, 768): the rest of the first mark's regions, waited for already
    assert h.waited == [first]
    h.take_marked(256)  # [768, 1024): the second mark's
    assert h.waited == [first, second]


def test_taking_bytes_of_an_unmarked_region_raises() -> None:
    h = Harness()
    for _ in range(4):
        h.ring.take((1024,), torch.uint8)  # the whole buffer, unmarked
    with pytest.raises(AssertionError, match="not marked"):
        h.ring.take((256,), torch.uint8)


def test_a_take_raises_only_once_it_reaches_unmarked_bytes() -> None:
    h = Harness()
    h.take_marked(1024)
    h.take_marked(1024)
    for _ in range(2):
        h.ring.take((1024,), torch.uint8)  # [2048, 4096) unmarked
    h.ring.take((1024,), torch.uint8)  # next lap [0, 1024): a marked region's bytes
    h.ring.take((1024,), torch.uint8)  # [1024, 2048)
    with pytest.raises(AssertionError):
        h.ring.take((256,), torch.uint8)  # [2048, ...): unmarked


def test_intact_until_the_ring_hands_the_region_out_again() -> None:
    h = Harness()
    h.take_marked(256)
    read = h.ring.take((4,), torch.int64)
    position = h.ring.last_position
    read.copy_(torch.tensor([7, 8, 9, 10]))
    h.ring.mark()
    for n in (1024, 1024, 1024, 512):
        h.take_marked(n)  # [512, 4096)
        assert h.ring.intact(position)
    assert read.tolist() == [7, 8, 9, 10]
    overwriting, _ = h.take_marked(512)  # [0, 512) of the next lap: `read`'s bytes [256, 288) among them
    assert h.offset(overwriting) == 0
    assert not h.ring.intact(position)
    overwriting.fill_(0)
    assert read.tolist() == [0, 0, 0, 0]
    assert h.ring.intact(None)


def test_intact_holds_while_later_takes_use_other_bytes() -> None:
    h = Harness()
    h.ring.take((8,), torch.int64)
    position = h.ring.last_position
    h.ring.mark()
    for _ in range(3):
        h.take_marked(1024)  # [256, 3328)
    h.take_marked(768)  # [3328, 4096): full, the region untouched
    assert h.ring.intact(position)
    h.take_marked(64)  # next lap [0, 64)
    assert not h.ring.intact(position)


def test_oversized_takes_get_a_tensor_of_their_own() -> None:
    h = Harness()
    assert h.ring.largest == CAPACITY // 4
    big = h.ring.take((h.ring.largest // 8 + 1,), torch.int64)
    assert h.oversize_calls == [h.ring.largest + 8] and h.ring.oversized == 1
    assert not h.buffer.data_ptr() <= big.data_ptr() < h.buffer.data_ptr() + CAPACITY
    assert big.shape == (h.ring.largest // 8 + 1,) and big.dtype == torch.int64
    assert h.ring.last_position is None and h.ring.intact(None)
    largest = h.ring.take((h.ring.largest,), torch.uint8)
    assert h.offset(largest) == 0 and h.ring.oversized == 1  # the oversized take consumed nothing


def test_empty_takes_consume_nothing_and_a_mark_without_regions_still_records() -> None:
    h = Harness()
    empty = h.ring.take((0,), torch.int64)
    assert empty.shape == (0,) and h.ring.last_position is None
    event = h.ring.mark("stream-a")
    assert event.stream == "stream-a"
    region = h.ring.take((1,), torch.int64)
    assert h.offset(region) == 0
    for _ in range(4):
        h.take_marked(1024)  # wraps over [0, 4096): waits for the regions' marks, not for the empty one
    assert event not in h.waited


def test_beyond_the_pending_limit_marks_that_completed_are_dropped_unwaited() -> None:
    h = Harness(max_pending_marks=2)
    a, b = h.take_marked(256)[1], h.take_marked(256)[1]
    a.completed = True
    c = h.take_marked(256)[1]  # three pending: the oldest has completed, so it goes
    d = h.take_marked(256)[1]  # three pending again, the oldest (b) not completed: all stay
    for _ in range(3):
        h.take_marked(1024)  # [1024, 4096)
    h.take_marked(1024)  # next lap [0, 1024): a's bytes (dropped), then b's, c's and d's
    assert h.waited == [b, c, d]


def test_mark_records_on_the_stream_given_else_the_current_one() -> None:
    h = Harness()
    h.ring.take((1,), torch.int64)
    assert h.ring.mark("decode-stream").stream == "decode-stream"
    h.ring.take((1,), torch.int64)
    assert h.ring.mark().stream is None  # torch.cuda.Event.record(None): the current stream


def test_each_thread_gets_a_ring_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "_pinned_bytes", lambda n: torch.zeros(n, dtype=torch.uint8))
    rings: dict[str, list[StagingRing[Any]]] = {}

    def run(name: str) -> None:
        rings[name] = [transfer.staging_ring(), transfer.staging_ring()]

    threads = [threading.Thread(target=run, args=(name,)) for name in ("prefill", "decode")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (p1, p2), (d1, d2) = rings["prefill"], rings["decode"]
    assert p1 is p2 and d1 is d2 and p1 is not d1
    assert p1.capacity == transfer.STAGING_RING_BYTES


def test_the_cpu_path_takes_no_ring() -> None:
    def run() -> None:
        cpu = torch.device("cpu")
        out = to_device([1, 2, 3], torch.long, cpu)
        assert out.tolist() == [1, 2, 3] and not out.is_pinned()
        req = Request("r", [1, 2], 2, SamplingParams(temperature=0.0))
        drawn = Sampler(cpu).draw(torch.tensor([[0.0, 1.0, 0.5]]), [req])
        assert drawn.done is None and drawn.result().token_ids == [1]
        made.append(hasattr(transfer._local, "ring"))

    made: list[bool] = []
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert made == [False]
