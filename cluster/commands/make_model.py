"""`semipd make-model`: write a random-weight Hugging Face checkpoint of a preset."""

from __future__ import annotations

import argparse

from actors.models.make_model import PRESETS, make_model
from cluster.commands.files import check_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="write a random-weight HF checkpoint (no model hub needed)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="where to draw the random weights (cpu, cuda)")
    p.add_argument("--no-weights", action="store_true",
                   help="write config and tokenizer only (for load_format=dummy speed runs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    try:
        out = make_model(args.preset, args.out, seed=args.seed, device=args.device, dtype=args.dtype,
                         weights=not args.no_weights)
    except OSError as e:  # --out is a file, not writable, on a full disk, ...
        raise ValueError(f"cannot write the checkpoint to {args.out}: {e}") from None
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0
