"""Plans: what one iteration computes, as plain data (ids, token counts, page ids)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeqChunk:
    """`token_ids` of one request at positions `start`.. computed in one iteration.

    `block_ids` is the request's page table, long enough for every position written.
    `sample` is true when the chunk ends at the request's last token, so the logits of
    its last position give the next token.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    block_ids: tuple[int, ...]
    sample: bool

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


def chunk_of(request_id: str, token_ids: list[int], start: int, n: int, block_ids: list[int]) -> SeqChunk:
    return SeqChunk(
        request_id=request_id,
        token_ids=tuple(token_ids[start : start + n]),
        start=start,
        block_ids=tuple(block_ids),
        sample=start + n == len(token_ids),
    )
