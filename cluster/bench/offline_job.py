"""The offline throughput job and the decode table's shapes of the engine benchmark, shared with the vLLM
reference script.

Plain Python only (no torch), so the vLLM environment can import it too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class OfflineJob:
    num_requests: int = 256
    min_prompt: int = 128
    max_prompt: int = 1024
    output_tokens: int = 128
    seed: int = 0


JOB = OfflineJob()
DECODE_BATCHES = (1, 8, 32, 64, 128)  # the decode table's batches and contexts (ours and vLLM's)
DECODE_CONTEXTS = (512, 2048)


def offline_prompts(vocab_size: int, job: OfflineJob = JOB) -> list[list[int]]:
    """Token-id prompts with lengths uniform in [min_prompt, max_prompt], seeded."""
    rng = random.Random(job.seed)
    return [
        [rng.randrange(vocab_size) for _ in range(rng.randint(job.min_prompt, job.max_prompt))]
        for _ in range(job.num_requests)
    ]
