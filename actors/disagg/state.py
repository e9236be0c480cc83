"""Request <-> RequestState: what crosses between the prefill and the decode engine."""

from __future__ import annotations

import torch

from actors.disagg.transport import RequestState
from actors.request import Request


def state_of(req: Request) -> RequestState:
    """Snapshot `req` (its pages are not part of the state)."""
    gen = req.generator
    return RequestState(
        request_id=req.request_id,
        token_ids=tuple(req.token_ids),
        num_prompt_tokens=req.num_prompt_tokens,
        params=req.params,
        eos_token_ids=req.eos_token_ids,
        max_model_len=req.max_model_len,
        arrival_time=req.arrival_time,
        priority=req.priority,
        requested_priority=req.requested_priority,
        deadline=req.deadline,
        num_computed_tokens=req.num_computed_tokens,
        num_cached_tokens=req.num_cached_tokens,
        num_preemptions=req.num_preemptions,
        first_token_time=req.first_token_time,
        generator_state=None if gen is None else gen.get_state().clone(),
        abort_reason=req.abort_requested,
    )


def request_from(state: RequestState, device: torch.device) -> Request:
    """A fresh `Request` (no pages) with `state`'s tokens, counters, params and RNG state."""
    gen = None
    if state.generator_state is not None:
        gen = torch.Generator(device=device)
        gen.set_state(state.generator_state)
    req = Request(
        request_id=state.request_id,
        token_ids=list(state.token_ids),
        num_prompt_tokens=state.num_prompt_tokens,
        params=state.params,
        eos_token_ids=state.eos_token_ids,
        max_model_len=state.max_model_len,
        arrival_time=state.arrival_time,
        priority=state.priority,
        requested_priority=state.requested_priority,
        deadline=state.deadline,
        num_computed_tokens=state.num_computed_tokens,
        num_cached_tokens=state.num_cached_tokens,
        num_preemptions=state.num_preemptions,
        first_token_time=state.first_token_time,
        generator=gen,
    )
    if state.abort_reason is not None:
        req.abort(state.abort_reason)
    return req
