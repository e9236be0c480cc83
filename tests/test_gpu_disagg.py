"""GPU path of the disaggregated baseline (run with `-m gpu`): `DeviceTransport` on one GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.config import CacheConfig, ModelArch, SchedulerConfig
from actors.disagg.frontend import DisaggLLM
from actors.disagg.transport import DeviceTransport
from actors.engine.frontend import LLM
from actors.kv.manager import pages_for
from actors.request import SamplingParams

from test_gpu import _divergences

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(300),
]

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
PAGE = 16


def _prompts(n: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = [3 + (37 * i) % 200 for i in range(n)]
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for length in lengths]


def test_disagg_with_device_transport_matches_unified_flashinfer(tiny_llama: Path) -> None:
    """Prefill and decode both on cuda:0 with separate pools, KV copied on the transport's stream: the
    unified engine's greedy tokens (except where it had a numerical tie; batches differ), and exactly the
    prompts' pages moved."""
    prompts = _prompts(20, 256)
    common = dict(dtype="float16", attention_backend="flashinfer",
                  scheduler=SchedulerConfig(max_prefill_tokens=256, max_decode_seqs=64))
    with LLM(tiny_llama, mode="unified", cache=CacheConfig(page_size=PAGE, num_pages=512), **common) as llm:
        reference = llm.generate(prompts, GREEDY)
    transport = DeviceTransport(torch.device("cuda"))
    with DisaggLLM(tiny_llama, transport=transport, prefill_cache=CacheConfig(page_size=PAGE, num_pages=256),
                   decode_cache=CacheConfig(page_size=PAGE, num_pages=512), **common) as llm:
        got = llm.generate(prompts, GREEDY)
        assert llm.pair.decode.num_preemptions == 0 and llm.pair.decode.num_imported == len(prompts)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in got)
    ties = _divergences(reference, got)
    assert len(ties) <= 2, f"{len(ties)} of {len(prompts)} prompts left the unified engine's tokens at ties: {ties}"
    a = ModelArch.from_dir(tiny_llama)
    per_page = a.num_layers * 2 * PAGE * a.num_kv_heads * a.head_dim * 2  # fp16
    assert transport.bytes_moved == sum(pages_for(len(p), PAGE) for p in prompts) * per_page
