"""Token sampling for a batch of requests with mixed parameters, on the logits' device.

Order (as vLLM): logprobs of the raw distribution; logit bias; allowed tokens; the grammar's mask
(structured outputs); min_tokens masking (a row these masks leave without a token is reported with the tokens:
`SampleResult.conflicts`); penalties (on the biased logits);
then greedy rows take the argmax, the others temperature, min-p, then top-k and top-p,
and draw with an exponential race (argmax p/q, q ~ Exp(1)), from the request's own
generator when it has a seed, so a seeded request's tokens do not depend on its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from actors.request import Request
from actors.runner.transfer import StagingRing, staging_ring, to_device
from actors.structured import fill_bitmasks, mask_logits


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of the chosen (or, for a prompt, the given) token and the `top` most likely ones (id, logprob);
    `rank`: 1 + how many tokens were more likely (tokens tied with it do not count)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    rank: int | None = None


@dataclass(frozen=True)
class SampleResult:
    """One token per row, with its logprobs where asked. `conflicts[i]`, when not None, says why row i had no token
    to draw (its constraints together allowed none: `conflict_message`); its token is then void."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    conflicts: Sequence[str | None] = ()  # () for none

    def __post_init__(self) -> None:
        if not self.conflicts:
            object.__setattr__(self, "conflicts", (None,) * len(self.token_ids))
        assert len(self.token_ids) == len(self.logprobs) == len(self.conflicts)

    def tail(self, start: int) -> SampleResult:
        """The rows from `start` on."""
        return SampleResult(self.token_ids[start:], self.logprobs[start:], self.conflicts[start:])


STRUCTURED, ALLOWED, MIN_TOKENS = "the structured output", "allowed_token_ids", "min_tokens (no stop token yet)"


def stops_barred(req: Request) -> bool:
    """Whether `req`'s next token may not be a stop token: it is short of `min_tokens` and no grammar decides its
    end (`Sampler._mask_early_stops`)."""
    return req.num_output_tokens < req.params.min_tokens and not req.grammar_holds


def masking_constraints(req: Request) -> tuple[str, ...]:
    """The constraints that mask `req`'s next token to -inf (`Sampler.draw`), as `conflict_message` names them."""
    names = []
    if req.grammar_holds:
        names.append(STRUCTURED)
    if req.params.allowed_token_ids is not None:
        names.append(ALLOWED)
    if stops_barred(req):
        names.append(MIN_TOKENS)
    return tuple(names)


def conflict_message(constraints: Sequence[str], output_index: int) -> str:
    """Why no token could be drawn at output token `output_index` (from 0) under `constraints` together."""
    *rest, last = constraints
    listed = last if not rest else f"{'both ' if len(rest) == 1 else 'all of '}{', '.join(rest)} and {last}"
    return f"no token satisfies {listed} at output token {output_index + 1}: the request's constraints conflict"


def score_tokens(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: Sequence[int],
                 top: int, rows_per_block: int = 256) -> list[TokenLogprobs]:
    """The logprob and rank of `targets[i]` after `hidden[i]` [R, H], with the `top` most likely tokens, from the
    raw distribution (`logits_of` maps hidden rows to logits). Blocks of `rows_per_block` rows bound the fp32
    logits held at once; the results come back to the host (a device sync)."""
    out: list[TokenLogprobs] = []
    for b in range(0, len(targets), rows_per_block):
        rows = hidden[b : b + rows_per_block]
        logprobs = torch.log_softmax(logits_of(rows).float(), dim=-1)  # [r, V]
        ids = to_device(targets[b : b + rows_per_block], torch.long, logprobs.device)
        chosen = logprobs.gather(1, ids[:, None])  # [r, 1]
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top_vals, top_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], ids[:, None][:, :0])
        for t, lp, rank, tv, ti in zip(targets[b : b + rows_per_block], chosen[:, 0].tolist(), ranks.tolist(),
                                       top_vals.tolist(), top_ids.tolist()):
            out.append(TokenLogprobs(t, lp, tuple(zip(ti, tv)), rank))
    return out


class Drawn:
    """Tokens drawn on the device, on their way to the host, with their logprobs where asked.

    `token_ids` [N] stays on the device (a next decode step can take its inputs from it). The logprobs asked for
    are reduced on the device at once (the chosen token's, and the top k); on a GPU their copies and the tokens'
    go into regions of the thread's staging ring, queued behind the draw, and `done` is the ring's mark after
    them, so `result()` waits for this step only, not for work queued on the stream after it. Call `result()`
    before the ring comes round (thousands of steps).
    """

    def __init__(self, token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, reqs: list[Request],
                 blocked: torch.Tensor | None = None) -> None:
        """`blocked` [N] (bool, on the device), where given: the rows whose masks left no token (`SampleResult`'s
        `conflicts`)."""
        self.token_ids = token_ids
        self.prompt_logprobs: list[list[TokenLogprobs]] = []  # per prefill chunk of the plan (`ModelRunner.launch`)
        self.done: torch.cuda.Event | None = None
        self._want = [r.params.logprobs for r in reqs]
        self._constraints = ([(masking_constraints(r), r.num_output_tokens) for r in reqs] if blocked is not None
                             else None)
        parts = [token_ids] + ([blocked] if blocked is not None else [])
        parts += _logprob_parts(raw_logprobs, token_ids, self._want) if raw_logprobs is not None else []
        self._host = parts
        self._ring: StagingRing[torch.cuda.Event] | None = None
        self._positions: list[int | None] = []
        if token_ids.device.type == "cuda":
            self._ring = staging_ring()
            self._host = []
            for part in parts:
                host = self._ring.take(part.shape, part.dtype)
                self._positions.append(self._ring.last_position)
                host.copy_(part, non_blocking=True)
                self._host.append(host)
            self.done = self._ring.mark(torch.cuda.current_stream(token_ids.device))

    @classmethod
    def nothing(cls, device: torch.device) -> Drawn:
        """The draw of an iteration that samples no token; on a GPU, `result()` still waits for the
        iteration (and all queued before it on the stream)."""
        return cls(torch.empty(0, dtype=torch.long, device=device), None, [])

    def wait(self) -> None:
        """Wait until the draw has ended on the device, its result not taken; a device error is left for `result()`
        to raise."""
        if self.done is None:
            return
        try:
            self.done.synchronize()
        except RuntimeError:
            pass

    def finished(self) -> bool:
        """Whether the draw has ended on the device (without waiting; a device error counts as ended)."""
        if self.done is None:
            return True
        try:
            return self.done.query()
        except RuntimeError:
            return True

    def result(self) -> SampleResult:
        if self.done is not None:
            self.done.synchronize()
        assert self._ring is None or all(self._ring.intact(p) for p in self._positions), \
            "sampled tokens overwritten before read"
        host = [t.tolist() for t in self._host]
        ids = host.pop(0)
        conflicts = () if self._constraints is None else [
            conflict_message(names, at) if blocked and names else None
            for blocked, (names, at) in zip(host.pop(0), self._constraints)]
        if not host:
            return SampleResult(ids, [None] * len(ids), conflicts)
        chosen, ranks, top_vals, top_ids = host
        return SampleResult(ids, [None if w is None else TokenLogprobs(ids[i], chosen[i],
                                                                       tuple(zip(top_ids[i][:w], top_vals[i][:w])),
                                                                       ranks[i])
                                  for i, w in enumerate(self._want)], conflicts)


def _logprob_parts(raw: torch.Tensor, token_ids: torch.Tensor, want: list[int | None]) -> list[torch.Tensor]:
    """On the device: the chosen tokens' logprobs [N] and ranks [N] (as `score_tokens`'), and the top k [N, k]
    (values, ids) of `raw` [N, V], k the most any request asks for."""
    k = max(w for w in want if w is not None)
    chosen = raw.gather(1, token_ids[:, None])  # [N, 1]
    ranks = (raw > chosen).sum(dim=-1) + 1  # [N]
    top_vals, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
    return [chosen.squeeze(1), ranks, top_vals, top_ids]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
        """logits [N, V], one row per request -> one token per request."""
        return self.draw(logits, reqs).result()

    def draw(self, logits: torch.Tensor, reqs: list[Request]) -> Drawn:
        """Queue the sampling of `logits` [N, V] (one row per request, any float dtype) on the current stream.

        Penalties, logprobs and random draws compute in fp32. A batch that only takes argmaxes keeps the logits'
        own dtype: widening changes no value, and argmax picks the first of equal maxima either way."""
        n = len(reqs)
        assert logits.shape[0] == n
        if not all(r.params.greedy and r.params.logprobs is None and not r.params.needs_penalties
                   and not r.params.logit_bias and r.params.allowed_token_ids is None for r in reqs):
            logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        if any(r.params.logit_bias for r in reqs):
            logits = self._add_logit_bias(logits, reqs)
        if any(r.params.allowed_token_ids is not None for r in reqs):
            logits = self._mask_disallowed(logits, reqs)
        if any(r.grammar_holds for r in reqs):
            logits = self._mask_by_grammar(logits, reqs)
        logits = self._mask_early_stops(logits, reqs)
        # a row these masks left all -inf has no token to draw (its constraints conflict): said with the tokens
        blocked = (logits.isneginf().all(dim=-1)
                   if any(r.params.allowed_token_ids is not None or r.grammar_holds for r in reqs) else None)
        if any(r.params.needs_penalties for r in reqs):  # after the bias, as vLLM (masked -inf logits stay -inf)
            logits = self._apply_penalties(logits.clone(), reqs)
        if all(r.params.greedy for r in reqs):
            chosen = logits.argmax(dim=-1)
        else:
            chosen = self._sample(logits, reqs)
        return Drawn(chosen, raw_logprobs, reqs, blocked)

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Repetition penalty over prompt and output tokens, presence and frequency over output tokens;
        the token indices go to the device in one queued copy each (no host wait)."""
        vocab, dev, dtype = logits.shape[1], logits.device, logits.dtype
        seen_rows: list[int] = []
        seen_ids: list[int] = []
        seen_penalty: list[float] = []
        out_rows: list[int] = []
        out_ids: list[int] = []
        presence, frequency = [0.0] * len(reqs), [0.0] * len(reqs)
        for i, r in enumerate(reqs):
            p = r.params
            if p.repetition_penalty != 1.0:
                seen = [t for t in set(r.token_ids) if 0 <= t < vocab]  # a step's void token stays PENDING_TOKEN
                seen_rows += [i] * len(seen)
                seen_ids += seen
                seen_penalty += [p.repetition_penalty] * len(seen)
            if p.presence_penalty or p.frequency_penalty:
                out = [t for t in r.output_token_ids if t < vocab]
                out_rows += [i] * len(out)
                out_ids += out
                presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
        if seen_rows:
            rows, ids = to_device(seen_rows, torch.long, dev), to_device(seen_ids, torch.long, dev)
            penalty = to_device(seen_penalty, dtype, dev)
            row = logits[rows, ids]
            logits[rows, ids] = torch.where(row > 0, row / penalty, row * penalty)
        if out_rows:
            counts = torch.zeros_like(logits)
            counts.index_put_((to_device(out_rows, torch.long, dev), to_device(out_ids, torch.long, dev)),
                              torch.ones(len(out_rows), dtype=dtype, device=dev), accumulate=True)
            logits -= (to_device(frequency, dtype, dev)[:, None] * counts
                       + to_device(presence, dtype, dev)[:, None] * (counts > 0).to(dtype))
        return logits

    @staticmethod
    def _add_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Each request's (token id, bias) pairs added to its row; ids past the logits' width are skipped."""
        vocab = logits.shape[1]
        pairs = [(i, t, b) for i, r in enumerate(reqs) for t, b in r.params.logit_bias if t < vocab]
        if not pairs:
            return logits
        rows, ids, bias = zip(*pairs)
        dev = logits.device
        logits = logits.clone()
        logits.index_put_((to_device(rows, torch.long, dev), to_device(ids, torch.long, dev)),
                          to_device(bias, logits.dtype, dev), accumulate=True)
        return logits

    @staticmethod
    def _mask_disallowed(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Rows of requests with `allowed_token_ids` keep only those tokens' logits (others -inf)."""
        vocab, dev = logits.shape[1], logits.device
        pairs = [(i, t) for i, r in enumerate(reqs) for t in (r.params.allowed_token_ids or ()) if t < vocab]
        free = [i for i, r in enumerate(reqs) if r.params.allowed_token_ids is None]
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[to_device(free, torch.long, dev)] = True
        if pairs:
            rows, ids = zip(*pairs)
            keep[to_device(rows, torch.long, dev), to_device(ids, torch.long, dev)] = True
        return logits.masked_fill(~keep, float("-inf"))

    @staticmethod
    def _mask_by_grammar(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Rows of requests with a grammar keep only the tokens it allows next (filled on the host, one queued copy
        to the device)."""
        rows = [i for i, r in enumerate(reqs) if r.grammar_holds]
        bitmask = fill_bitmasks([reqs[i].grammar for i in rows])  # type: ignore[misc]
        dev = logits.device
        return mask_logits(logits, to_device(rows, torch.long, dev), to_device(bitmask.numpy(), torch.int32, dev))

    @staticmethod
    def _mask_early_stops(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Rows of requests short of `min_tokens` cannot pick a stop token, unless a grammar decides the end."""
        rows: list[int] = []
        banned: list[int] = []
        for i, r in enumerate(reqs):
            if stops_barred(r):
                stops = [t for t in (*r.eos_token_ids, *r.params.stop_token_ids) if t < logits.shape[1]]
                rows += [i] * len(stops)
                banned += stops
        if not rows:
            return logits
        logits = logits.clone()
        logits[to_device(rows, torch.long, logits.device), to_device(banned, torch.long, logits.device)] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        dev = logits.device
        greedy = to_device([r.params.greedy for r in reqs], torch.bool, dev)
        temp = to_device([r.params.temperature or 1.0 for r in reqs], logits.dtype, dev)
        argmax = logits.argmax(dim=-1)
        logits = logits / temp[:, None]
        if any(r.params.min_p > 0 for r in reqs):  # before top-k and top-p (whose top-p mass is then of the rest)
            probs = torch.softmax(logits, dim=-1)  # [N, V]
            min_p = to_device([r.params.min_p for r in reqs], probs.dtype, dev)
            logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        logits = _top_k_top_p(logits, reqs)
        probs = torch.softmax(logits, dim=-1)
        q = torch.empty_like(probs)
        for i, r in enumerate(reqs):
            q[i].exponential_(generator=r.generator if r.generator is not None else self.generator)
        drawn = (probs / q).argmax(dim=-1)
        return torch.where(greedy, argmax, drawn)


def _top_k_top_p(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """`logits` [N, V] with the tokens past each row's top-k, then past its top-p mass, at -inf (the first always
    kept). A row with top_p 1 keeps its tail whatever the batch: the fp32 cumulative mass may round to 1 before it."""
    vocab = logits.shape[1]
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in reqs]
    top_p = [r.params.top_p if r.params.top_p < 1.0 else math.inf for r in reqs]
    if all(k == vocab for k in top_k) and all(p == math.inf for p in top_p):
        return logits
    dev = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= to_device(top_k, torch.long, dev)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= to_device(top_p, probs.dtype, dev)[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
