"""Error paths of a disaggregated pair: every request gets exactly one final delta, and its pages and in-flight
KV bytes come back, when a step between the engines fails (a readmit, a transfer, the wait after an export) or
one engine loses its GPU.

Stepped by hand (no worker threads), with `test_disagg`'s `stepped_pair`; a failing poll is swallowed as the
importer thread's loop does, a failing decode step as the worker's loop does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import actors.disagg.engines as engines
from actors.disagg.engines import PrefillOnlyEngine
from actors.disagg.pair import DisaggPair
from actors.disagg.transport import CpuTransport, RequestState
from actors.engine.core import EngineDeadError
from actors.request import FinishReason, Request, SamplingParams

from test_disagg import LONG, Collected, assert_all_pages_back, make_prompts, stepped_pair_over
from test_disagg import stepped_pair  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(120)


def two_page_prompt(seed: int = 3) -> list[int]:
    """32 tokens: two full pages, so the first decode step needs a third page."""
    return make_prompts(seed)[-1][:32]


def import_all(pair: DisaggPair, n: int) -> None:
    """Prefill until `n` requests were exported, and import them all."""
    while pair.transport.num_sent < n:  # type: ignore[attr-defined]
        assert pair.prefill.workers[0].step()
    while pair.decode.num_imported < n:
        pair.decode.poll_imports(timeout=1.0)


def poll_quietly(pair: DisaggPair, times: int = 1) -> None:
    for _ in range(times):
        with contextlib.suppress(Exception):
            pair.decode.poll_imports(timeout=0.1)


def finals(out: Collected, rid: str) -> list[FinishReason | None]:
    return [d.finish_reason for d in out.deltas if d.request_id == rid and d.finished]


def test_a_readmit_that_fails_ends_its_request_and_the_others_go_back(
        stepped_pair: tuple[DisaggPair, Collected], monkeypatch: pytest.MonkeyPatch) -> None:
    """Four decodes that each need a page, none free: the last two are preempted in one step ("d", then "c") and go
    back to prefill. "d" cannot be taken back (rebuilding it fails, as a grammar that does not compile again would):
    it ends with an error, and "c" still goes back."""
    pair, out = stepped_pair
    prompts = make_prompts(3)
    for rid, seed in zip("abcd", range(4)):
        pair.add_request(rid, prompts[-1 - seed][:32], LONG)  # two full pages each
    import_all(pair, 4)
    held = pair.decode.allocator.allocate(pair.decode.allocator.num_free)
    assert held is not None
    rebuild = engines.request_from

    def refuse_d(state: RequestState, device: torch.device) -> Request:
        if state.request_id == "d":
            raise RuntimeError("grammar does not compile")
        return rebuild(state, device)

    monkeypatch.setattr(engines, "request_from", refuse_d)
    with contextlib.suppress(Exception):
        pair.decode.workers[0].step()
    assert pair.decode.num_preemptions == 2
    ended = [d for d in out.deltas if d.request_id == "d" and d.finished]
    assert [d.finish_reason for d in ended] == [FinishReason.ERROR]
    assert "grammar does not compile" in (ended[0].error or "")
    assert pair.prefill.prefill.num_waiting == 1  # "c", back for recomputation

    pair.decode.allocator.free(held)
    import_all(pair, 5)
    for rid in "abc":
        assert pair.abort(rid)
    pair.decode.workers[0].step()
    pair.decode.workers[0].step()
    assert [finals(out, rid) for rid in "abc"] == [[FinishReason.ABORT]] * 3 and pair.num_unfinished == 0
    assert_all_pages_back(pair)


class _CopyFails:
    """The event of a device copy that failed after `send` returned (`synchronize` raises)."""

    def synchronize(self) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class _AsyncCopyFails(CpuTransport):
    """Its copies fail on the device: the receiver learns it when it waits for them."""

    def _copy(self, kv: torch.Tensor) -> tuple[torch.Tensor, _CopyFails]:  # type: ignore[override]
        return kv.clone(), _CopyFails()


@pytest.fixture
def failing_copy_pair(tiny_llama: Path) -> Iterator[tuple[DisaggPair, Collected]]:
    yield stepped_pair_over(tiny_llama, _AsyncCopyFails())


def test_a_transfer_that_fails_on_receipt_ends_its_request_and_frees_its_room(
        failing_copy_pair: tuple[DisaggPair, Collected]) -> None:
    """A copy that failed on the device after the send: the request ends with an error naming why, and the bytes it
    held in flight come back (else later sends would wait for room that never frees)."""
    pair, out = failing_copy_pair
    pair.add_request("a", two_page_prompt(), LONG)
    pair.prefill.workers[0].step()
    assert pair.transport.in_flight_bytes > 0  # type: ignore[attr-defined]
    poll_quietly(pair)
    ended = [d for d in out.deltas if d.request_id == "a" and d.finished]
    assert [d.finish_reason for d in ended] == [FinishReason.ERROR]
    assert "illegal memory access" in (ended[0].error or "")
    assert pair.transport.in_flight_bytes == 0  # type: ignore[attr-defined]
    assert pair.num_unfinished == 0
    assert_all_pages_back(pair)


def test_when_decode_loses_its_gpu_requests_in_transit_end_and_new_ones_are_refused(
        stepped_pair: tuple[DisaggPair, Collected]) -> None:
    """Once the decode engine is dead, a payload waiting for its pages and one still in the transport end with an
    error (nothing will decode them), and the pair takes no new request."""
    pair, out = stepped_pair
    prompt = two_page_prompt()
    pair.add_request("waiting", prompt, LONG)
    pair.add_request("in transit", prompt[::-1], LONG)
    pair.prefill.workers[0].step()
    held = pair.decode.allocator.allocate(pair.decode.allocator.num_free)
    assert held is not None
    pair.decode.poll_imports(timeout=1.0)
    assert pair.decode.num_backlogged == 1
    pair.decode._device_lost(RuntimeError("GPU gone"))
    poll_quietly(pair, 3)
    assert finals(out, "waiting") == finals(out, "in transit") == [FinishReason.ERROR]
    assert pair.transport.in_flight_bytes == 0  # type: ignore[attr-defined]
    assert pair.num_unfinished == 0
    with pytest.raises(EngineDeadError):
        pair.add_request("late", prompt, LONG)
    assert pair.num_unfinished == 0
    pair.decode.allocator.free(held)
    assert_all_pages_back(pair)


def test_when_prefill_loses_its_gpu_a_preempted_decode_ends_instead_of_waiting_there(
        stepped_pair: tuple[DisaggPair, Collected]) -> None:
    """A decode preempted after the prefill engine died cannot be recomputed: it ends with an error, not queued on
    an engine whose workers have stopped."""
    pair, out = stepped_pair
    pair.add_request("a", two_page_prompt(), LONG)
    import_all(pair, 1)
    pair.prefill._device_lost(RuntimeError("GPU gone"))
    held = pair.decode.allocator.allocate(pair.decode.allocator.num_free)
    assert held is not None
    with contextlib.suppress(Exception):
        pair.decode.workers[0].step()
    assert pair.decode.num_preemptions == 1
    assert finals(out, "a") == [FinishReason.ERROR]
    assert pair.prefill.prefill.num_waiting == 0 and pair.num_unfinished == 0
    pair.decode.allocator.free(held)
    assert_all_pages_back(pair)


def test_an_export_that_fails_after_its_send_leaves_the_request_to_decode(
        stepped_pair: tuple[DisaggPair, Collected], monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the payload is sent the decode side owns the request: a failure after the send (on a GPU, the prefill
    stream's wait for the export stream) must not end it too, or the caller would get two final deltas."""
    pair, out = stepped_pair

    @contextlib.contextmanager
    def fails_on_exit(self: PrefillOnlyEngine) -> Iterator[None]:
        yield
        raise RuntimeError("CUDA error: the stream wait failed")

    monkeypatch.setattr(PrefillOnlyEngine, "_exporting", fails_on_exit)
    pair.add_request("a", two_page_prompt(), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    import_all(pair, 1)
    for _ in range(6):  # two tokens, overlapped: done within four steps
        pair.decode.workers[0].step()
    assert finals(out, "a") == [FinishReason.LENGTH]
    assert pair.num_unfinished == 0
    assert_all_pages_back(pair)
