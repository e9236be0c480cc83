"""Plans: what one iteration computes, as plain data (ids, token counts, page ids)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptScoring:
    """Prompt logprobs a chunk computes: its positions `offset`.. `offset + len(targets)` (relative to the
    chunk's start) each give the logprob of the next prompt token, `targets`, and the `top` most likely."""

    offset: int
    targets: tuple[int, ...]
    top: int


@dataclass(frozen=True)
class SeqChunk:
    """`token_ids` of one request at positions `start`.. computed in one iteration.

    `block_ids` is the request's page table, long enough for every position written.
    `sample` is true when the chunk ends at the request's last token, so the logits of
    its last position give the next token. `scoring`: the prompt logprobs it computes, if any.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    block_ids: tuple[int, ...]
    sample: bool
    scoring: PromptScoring | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache after this chunk (cached prefix plus the chunk)."""
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class BatchPlan:
    """One forward pass: decode chunks (one token each) first, then prefill chunks."""

    decodes: tuple[SeqChunk, ...] = ()
    prefills: tuple[SeqChunk, ...] = ()

    @property
    def chunks(self) -> tuple[SeqChunk, ...]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


def chunk_of(request_id: str, token_ids: list[int], start: int, n: int, block_ids: list[int],
             scoring: PromptScoring | None = None) -> SeqChunk:
    return SeqChunk(
        request_id=request_id,
        token_ids=tuple(token_ids[start : start + n]),
        start=start,
        block_ids=tuple(block_ids),
        sample=start + n == len(token_ids),
        scoring=scoring,
    )


def prompt_scoring(token_ids: list[int], num_prompt_tokens: int, num_scored: int, start: int, n: int,
                   top: int) -> PromptScoring | None:
    """What a chunk of positions `start`..`start + n` scores of a prompt whose first `num_scored` positions are
    scored already (None: nothing). Position p scores token p + 1; the prompt's last position samples instead."""
    first, end = num_scored, min(start + n, num_prompt_tokens - 1)
    if first >= end:
        return None
    assert start <= first, "prompt positions would go unscored"
    return PromptScoring(first - start, tuple(token_ids[first + 1 : end + 1]), top)
