"""vLLM reference for the offline job; run with `vllm-python bench/vllm_offline.py MODEL_DIR OUT.json`.

Same prompts (cluster.bench.offline_job), same shape (random weights via load_format=dummy).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bench.offline_job import JOB, offline_prompts  # noqa: E402


def main(model_dir: str, out_path: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in offline_prompts(vocab)]
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, gpu_memory_utilization=0.85)
    params = SamplingParams(max_tokens=JOB.output_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:8], params, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    result = dict(version=vllm.__version__, seconds=dt, output_tokens=generated, output_tokens_per_s=generated / dt,
                  total_tokens_per_s=(generated + prompt_tokens) / dt)
    Path(out_path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
