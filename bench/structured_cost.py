"""What structured outputs cost a decode step's host: wrapping the tokenizer, compiling a request's grammar, filling
a batch's bitmasks and advancing each grammar by its token, and masking the logits (on the GPU too when there is one).

    python3 bench/structured_cost.py TOKENIZER_DIR [--vocab N] [--out FILE.md]
    python3 bench/structured_cost.py DIR --make-tokenizer   (a 128K BPE trained on this Python's own sources)

The tokenizer decides the cost: use the model's own, or, where no hub is reachable, one made with
`--make-tokenizer`, not make-model's byte tokenizer (its fillers are 128K tokens of one shape). Each batch's grammars are advanced a few dozen tokens first (drawn at
random from what each allows, its masks filled at each), and the fills timed are each at a state new to its
grammar, as in decode.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from actors.request import StructuredOutputsParams as Spec
from actors.structured import Grammar, GrammarCompiler, fill_bitmasks, mask_logits

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                         "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                                      "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                     "required": ["city", "zip"]}}}
SPECS = {"json schema": Spec(json=SCHEMA, disable_any_whitespace=True),  # a random path stays in whitespace else
         "json object": Spec(json_object=True, disable_any_whitespace=True),
         "regex": Spec(regex=r"[A-Z][a-z]{2,12}( [A-Z][a-z]{2,12}){0,3}, [0-9]{1,4} [a-z ]{3,30}"),
         "choice": Spec(choice=["positive", "negative", "neutral", "mixed"])}
BATCHES = (1, 8, 64, 256)
WARM_TOKENS = 24
REPEATS = 8


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of `fn` over `repeat` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def path(compiler: GrammarCompiler, spec: Spec, rng: random.Random, length: int) -> list[int]:
    """Up to `length` tokens that `spec` allows one after another (drawn at random, never its end), found on a
    grammar of their own."""
    grammar, tokens = compiler.compile(spec), []
    for _ in range(length):
        allowed = [t for t in allowed_tokens(grammar) if t not in compiler.eos_token_ids]
        if not allowed:
            break
        tokens.append(rng.choice(allowed))
        if grammar.accept(tokens[-1]):
            break
    return tokens


def fill_times(compiler: GrammarCompiler, spec: Spec, batch: int, rng: random.Random) -> float:
    """Median seconds to fill `batch` grammars' masks at a state none has had a mask for, after WARM_TOKENS steps
    of taking a token and filling the masks, as decode does (a grammar whose path ended stays at its end)."""
    paths = [path(compiler, spec, rng, WARM_TOKENS + REPEATS) for _ in range(batch)]
    grammars = [compiler.compile(spec) for _ in range(batch)]
    times = []
    for step in range(WARM_TOKENS + REPEATS):
        for g, p in zip(grammars, paths):
            if step < len(p):
                g.accept(p[step])
        t0 = time.perf_counter()
        fill_bitmasks(grammars)
        if step >= WARM_TOKENS:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def allowed_tokens(grammar: Grammar) -> list[int]:
    """The tokens `grammar` allows next."""
    words = fill_bitmasks([grammar])
    logits = mask_logits(torch.zeros(1, words.shape[1] * 32), torch.tensor([0]), words)
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def make_tokenizer(out: str, vocab: int = 128_000) -> None:
    """A byte-level BPE of `vocab` tokens trained on the standard library's sources and those of the installed
    packages (what a machine without a model hub has), saved as a transformers tokenizer in `out`."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    roots = [Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib")]
    files = sorted(str(f) for root in roots for f in root.rglob("*.py") if _utf8(f))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(out)
    print(f"{out}: {tok.get_vocab_size()} tokens from {len(files)} files")


def _utf8(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer", help="a directory with the model's tokenizer")
    ap.add_argument("--make-tokenizer", action="store_true", help="make the tokenizer in that directory, then stop")
    ap.add_argument("--vocab", type=int, default=None, help="the model's vocabulary (default: the tokenizer's)")
    ap.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = ap.parse_args()
    if args.make_tokenizer:
        make_tokenizer(args.tokenizer)
        return
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = args.vocab or len(hf)
    compiler = GrammarCompiler(args.tokenizer, vocab, [hf.eos_token_id])
    lines = [f"tokenizer {args.tokenizer}: {len(hf)} tokens, vocabulary {vocab}"]
    t0 = time.perf_counter()
    compiler.compile(SPECS["regex"])
    lines.append(f"wrapping the tokenizer (once per engine, at its start): {time.perf_counter() - t0:.2f} s")
    lines += ["", "| spec | compile ms | fill ms, batch " + " | ".join(map(str, BATCHES)) + " | accept us |",
              "|---|---|" + "---|" * len(BATCHES) + "---|"]
    rng = random.Random(0)
    for name, spec in SPECS.items():
        compile_s = timed(lambda: compiler.compile(spec), 5)
        fills = [fill_times(compiler, spec, n, rng) for n in BATCHES]
        probe = compiler.compile(spec)
        token = allowed_tokens(probe)[0]
        accept_s = timed(lambda: probe.matcher.try_consume_tokens([token]) and probe.matcher.rollback(1), 50)
        lines.append(f"| {name} | {1e3 * compile_s:.2f} | " + " | ".join(f"{1e3 * s:.3f}" for s in fills)
                     + f" | {1e6 * accept_s:.1f} |")
    lines += ["", "| device | mask_logits ms, batch " + " | ".join(map(str, BATCHES)) + " |",
              "|---|" + "---|" * len(BATCHES)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        cells = []
        for n in BATCHES:
            logits = torch.randn(n, vocab, device=dev)
            rows = torch.arange(n, device=dev)
            bits = torch.randint(-(1 << 31), 1 << 31, (n, (vocab + 31) // 32), dtype=torch.int32, device=dev)
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            cells.append(1e3 * timed(lambda: (mask_logits(logits, rows, bits), sync()), 20))
        lines.append(f"| {dev} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, {device}, "
              f"`python3 bench/structured_cost.py {args.tokenizer}{f' --vocab {args.vocab}' if args.vocab else ''}`")
    text = "\n".join([header, "", *lines])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
