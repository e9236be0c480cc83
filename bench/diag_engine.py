"""Reproduce semi-pd engine start on a fresh process: `python3 bench/diag_engine.py ORDER` (GPU machine)."""

from __future__ import annotations

import sys
import traceback

sys.path.insert(0, ".")

from actors.config import CacheConfig, SchedulerConfig  # noqa: E402
from actors.engine.frontend import LLM  # noqa: E402
from actors.models.make_model import make_model  # noqa: E402
from actors.request import SamplingParams  # noqa: E402

model = make_model("tiny-llama", "/tmp/models/tiny-llama")
prompts = [[(7 * i + j) % 500 for j in range(5 + 13 * i)] for i in range(8)]
for mode in sys.argv[1].split(","):
    try:
        with LLM(model, dtype="float16", mode=mode, cache=CacheConfig(num_pages=512),
                 scheduler=SchedulerConfig(max_prefill_tokens=256, max_decode_seqs=64)) as llm:
            outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
            print(mode, "ok", outs[0].token_ids, flush=True)
    except Exception:
        print(mode, "FAILED", traceback.format_exc()[-1500:], flush=True)
