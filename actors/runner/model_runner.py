"""Turns a plan into tensors, runs the model and samples.

One runner per worker: the weights and the KV pool are shared, the attention
backend (with its workspace) and the stream are the worker's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from actors.attention.base import AttentionBackend, BatchLayout
from actors.engine.partitioner import Partition
from actors.kv.pool import KVPool
from actors.models.llama import AttentionFn, CausalLM
from actors.request import Request, SamplingParams
from actors.runner.cublas import set_sm_count_target
from actors.runner.launch_window import LaunchWindow
from actors.runner.sampler import Drawn, Sampler, SampleResult, TokenLogprobs, score_tokens
from actors.runner.transfer import staging_ring, to_device

if TYPE_CHECKING:
    from actors.runner.cuda_graphs import DecodeGraphs
from actors.scheduler.plan import BatchPlan


class Carry:
    """Input ids a decode batch takes from the previous step's draw, still on the device.

    Row i of the batch (a decode whose token is `PENDING_TOKEN` in the plan) gets
    `prev.token_ids[src[i]]`; rows with `src[i] < 0` keep the plan's token.
    """

    def __init__(self, prev: Drawn, src: list[int]) -> None:
        self.prev = prev
        self.src = src

    def follow(self) -> None:
        """Make the current stream wait for the previous step (it may have run on another split's
        stream, and this step rewrites the inputs that one read)."""
        if self.prev.done is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self.prev.done)
            self.prev.token_ids.record_stream(stream)

    def apply(self, input_ids: torch.Tensor) -> None:
        """Patch `input_ids` [>= len(src)] in place, on the current stream (after `follow`)."""
        n = len(self.src)
        src = to_device(self.src, torch.long, input_ids.device)
        taken = self.prev.token_ids[src.clamp(min=0)]
        input_ids[:n] = torch.where(src >= 0, taken, input_ids[:n])


@dataclass(frozen=True)
class Forwarded:
    """A queued forward pass: the hidden states of the rows that sample [N, H] (a CUDA graph's output buffer, valid
    until the runner's next iteration), and the prompt logprobs it scored (one list per prefill chunk)."""

    hidden: torch.Tensor
    prompt_logprobs: list[list[TokenLogprobs]]


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        attention: AttentionBackend,
        sampler: Sampler,
        graphs: DecodeGraphs | None = None,
        window: LaunchWindow | None = None,
    ) -> None:
        """`window`: how far the forward passes not run as CUDA graphs may run ahead of the device (None: a whole
        pass is queued at once)."""
        self.model = model
        self.pool = pool
        self.attention = attention
        self.sampler = sampler
        self.stream: torch.cuda.Stream | None = None
        self.sms = 0  # the SMs cuBLAS sizes this runner's GEMMs for (0: the whole GPU)
        # host time of `launch` by part: prepare (inputs), plan (attention), forward (kernel launches),
        # graph (a CUDA-graph decode step's inputs and plan), replay (its launch), sample; window: forward's wait
        # for the device (`LaunchWindow`)
        self.host_seconds = dict.fromkeys(("prepare", "plan", "forward", "window", "graph", "replay", "sample"), 0.0)
        self.graphs = graphs
        self.window = window
        self.device = pool.kv.device

    def set_partition(self, partition: Partition) -> None:
        """Run later iterations on `partition`'s stream, GEMMs sized for its SMs; called between iterations.

        The new stream first waits for all this runner queued on the old one: an iteration that
        samples nothing (a prompt chunk that is not the last) returns before the device ran it, and
        the next one, on another split's stream, would otherwise rewrite the attention plan, the
        inputs and the KV pages that one still reads.
        """
        old = self.stream
        if old is not None and partition.stream is not None and partition.stream != old:
            partition.stream.wait_stream(old)
        self.stream = partition.stream
        self.sms = partition.gemm_sms

    def enter_thread(self) -> None:
        """The calling thread runs this runner's iterations from now on: its current device becomes the runner's
        (a new thread starts on the first GPU; disagg's decode engine runs on the second), and it makes its
        pinned staging ring (`staging_ring`) now rather than in its first iteration."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            staging_ring()

    def leave_thread(self) -> None:
        """The calling thread runs no more iterations: its cuBLAS handle, which torch hands to a later
        thread, goes back to GEMMs sized for the whole GPU."""
        if self.device.type == "cuda" and self.sms:
            set_sm_count_target(0, self.device)

    def release_graphs(self) -> None:
        """Destroy the decode CUDA graphs (their pool goes back to the allocator); later
        iterations run eagerly. Call once the device has finished every queued iteration."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def execute(self, plan: BatchPlan, sample_reqs: list[Request]) -> SampleResult:
        """Run one iteration; `sample_reqs` are the requests of the plan's `sample` chunks, in order."""
        return self.launch(plan, sample_reqs).result()

    def launch(self, plan: BatchPlan, sample_reqs: list[Request], carry: Carry | None = None,
               before_kernels: Callable[[], None] | None = None) -> Drawn:
        """Queue one iteration on the worker's stream and return its draw without waiting for it.

        `carry` fills decode input ids from the previous step's draw (overlapped decode). `before_kernels` is called
        once the iteration's inputs and attention plan are made (a CUDA graph's: before its replay), before its
        model's first kernel is queued: the overlapped prefill waits there for the iteration before it
        (`PrefillWorker`).
        """
        return self.draw(self.forward(plan, carry, before_kernels), sample_reqs)

    @torch.inference_mode()
    def forward(self, plan: BatchPlan, carry: Carry | None = None,
                before_kernels: Callable[[], None] | None = None) -> Forwarded:
        """Queue one iteration's forward pass on the worker's stream (`launch` without the draw: `draw` queues it,
        later if need be, before any later iteration of this runner)."""
        t = time.perf_counter()
        with self._on_stream():
            if carry is not None:
                carry.follow()
            scores: list[list[TokenLogprobs]] = []
            if self._use_graph(plan):
                if before_kernels is not None:
                    before_kernels()
                    t = time.perf_counter()
                graphs, stream = self.graphs, self.stream
                assert graphs is not None and stream is not None
                graph, hidden = graphs.stage(plan.decodes, stream, carry)
                t = self._spent("graph", t)
                graph.replay()
                self._spent("replay", t)
            else:
                input_ids, positions, layout, logits_idx = self.prepare(plan)
                if carry is not None:
                    carry.apply(input_ids)
                t = self._spent("prepare", t)
                attn = self.attention.plan(layout)
                t = self._spent("plan", t)
                if before_kernels is not None:
                    before_kernels()
                    t = time.perf_counter()  # its time is the caller's
                every = self._run_model(input_ids, positions, attn)  # [T, H]
                hidden = every[logits_idx]
                if any(c.scoring is not None for c in plan.prefills):
                    scores = self._score_prompts(plan, every)
                self._spent("forward", t)
            return Forwarded(hidden, scores)

    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        """The model's forward pass [T, H], held to the launch window if there is one (its waits count as the
        "window" part of `host_seconds`, not as "forward")."""
        window = self.window
        if window is None or self.stream is None:
            return self.model(input_ids, positions, attn)
        window.start()
        waited = window.waited_s
        every = self.model(input_ids, positions, attn, window.after_layer)
        spent = window.waited_s - waited
        self.host_seconds["window"] += spent
        self.host_seconds["forward"] -= spent
        return every

    @torch.inference_mode()
    def draw(self, forwarded: Forwarded, sample_reqs: list[Request]) -> Drawn:
        """Queue the draw of a queued forward pass's sampled rows (`sample_reqs`, in order) on the worker's
        stream."""
        t = time.perf_counter()
        with self._on_stream():
            drawn = (self.sampler.draw(self.model.compute_logits(forwarded.hidden), sample_reqs) if sample_reqs
                     else Drawn.nothing(self.device))
            drawn.prompt_logprobs = forwarded.prompt_logprobs
            if sample_reqs:
                self._spent("sample", t)
            return drawn

    @torch.inference_mode()
    def warm_up_draws(self, greedy_rows: Iterable[int], sampled_rows: Iterable[int]) -> None:
        """Queue, on the runner's stream, a draw from `n` rows of hidden states for each `n` of `greedy_rows`
        (argmax) and of `sampled_rows` (temperature, top-k and top-p: a sort, softmaxes, random draws).

        The LM head's GEMM and the sampler run outside the decode CUDA graphs, with one row per sequence that
        samples, and cuBLAS picks its kernels by that count; CUDA loads a kernel at its first launch, which may wait
        for the whole device. On the H100 (run 30) a fresh server's first windows at a load not seen before had
        prefill iterations spend a mean of 3 and 16 ms in their draws where later ones spent 0.2, and decode stood
        still for 100-280 ms at those times; prefill's warm-up iterations sample one or two rows. The draws take a
        generator of their own: the engine's seeded one is left where it was."""
        dtype = next(self.model.parameters()).dtype
        scratch = torch.Generator(device=self.device)
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        sampled = SamplingParams(max_tokens=1, temperature=1.0, top_k=50, top_p=0.9)
        with self._on_stream():
            for n, params in [(n, greedy) for n in greedy_rows] + [(n, sampled) for n in sampled_rows]:
                reqs = [Request(f"warm-up-draw-{i}", [1], 1, params, generator=scratch) for i in range(n)]
                hidden = torch.zeros(n, self.model.arch.hidden_size, dtype=dtype, device=self.device)  # [n, H]
                self.sampler.draw(self.model.compute_logits(hidden), reqs)

    def wait_for_stream(self) -> None:
        """Wait for everything queued on the worker's stream (nothing to wait for off the GPU). A failure there is
        not raised: whoever waits for the iteration that failed reports it."""
        if self.stream is None:
            return
        try:
            self.stream.synchronize()
        except Exception:
            pass

    @contextmanager
    def _on_stream(self) -> Iterator[None]:
        """The worker's stream as the current one, with cuBLAS sized for its partition (nothing off the GPU).

        If the body raises, what it had queued (a forward pass's KV writes, when its draw or a later layer failed) is
        waited for before the error goes on: its caller ends the iteration's requests and gives their pages back,
        which the other worker's stream may take at once."""
        try:
            if self.stream is None:
                yield
            else:
                with torch.cuda.stream(self.stream):
                    set_sm_count_target(self.sms, self.device)
                    yield
        except BaseException:
            self.wait_for_stream()
            raise

    def _score_prompts(self, plan: BatchPlan, hidden: torch.Tensor) -> list[list[TokenLogprobs]]:
        """The prompt logprobs of each prefill chunk of `plan` (`SeqChunk.scoring`; [] where none), from the hidden
        states of every token of the batch [T, H]; waits for the device."""
        out = []
        row = sum(c.num_tokens for c in plan.decodes)
        for c in plan.prefills:
            s = c.scoring
            if s is None:
                out.append([])
            else:
                rows = hidden[row + s.offset : row + s.offset + len(s.targets)]
                out.append(score_tokens(self.model.compute_logits, rows, s.targets, s.top))
            row += c.num_tokens
        return out

    def _spent(self, part: str, since: float) -> float:
        """Add the host time since `since` to `part` of `host_seconds`; returns now."""
        now = time.perf_counter()
        self.host_seconds[part] += now - since
        return now

    def _use_graph(self, plan: BatchPlan) -> bool:
        return (
            self.graphs is not None
            and self.stream is not None
            and not plan.prefills
            and len(plan.decodes) <= self.graphs.max_batch
        )

    def prepare(self, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor, BatchLayout, torch.Tensor]:
        """Flat input ids and positions [T], the attention layout, and the rows to sample."""
        ps = self.pool.page_size
        chunks = plan.chunks
        positions = np.concatenate([np.arange(c.start, c.context_len) for c in chunks])
        pages = np.concatenate([np.asarray(c.block_ids)[np.arange(c.start, c.context_len) // ps] for c in chunks])
        ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64, count=len(positions))
        ends = np.cumsum([c.num_tokens for c in chunks]) - 1
        sample_rows = ends[np.array([c.sample for c in chunks], dtype=bool)]
        layout = BatchLayout(
            num_decodes=len(plan.decodes),
            query_lens=tuple(c.num_tokens for c in chunks),
            context_lens=tuple(c.context_len for c in chunks),
            block_tables=tuple(c.block_ids for c in chunks),
            slot_mapping=to_device(pages * ps + positions % ps, torch.long, self.device),
        )
        dev = self.device
        return (to_device(ids, torch.long, dev), to_device(positions, torch.long, dev), layout,
                to_device(sample_rows, torch.long, dev))
