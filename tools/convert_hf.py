"""Export a run folder to HF format, or convert an HF MPT folder (re-shard, dtype, .bin).

    python tools/convert_hf.py SRC DST [--step N] [--dtype bfloat16] [--max-shard-size 5GB]
                               [--allow-pickle] [--overwrite] [--check]

SRC is an mpt_jax run folder (its latest checkpoint, or --step N; or a checkpoint step folder)
or an HF MPT folder (transformers' or llm-foundry's config); DST receives config.json and
safetensors that transformers' MptForCausalLM loads (or llm-foundry's class, for configs
transformers cannot express). --check compares logits of DST against SRC on random tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="run folder, checkpoint step folder or HF MPT folder")
    parser.add_argument("--step", type=int, default=None, help="run folder: this checkpoint")
    parser.add_argument("dst", help="folder to write")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="stored weight dtype (default: float32)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a PyTorch .bin checkpoint (torch.load with weights_only=True)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--check", action="store_true", help="compare logits of DST with SRC")
    args = parser.parse_args(argv)

    import jax.numpy as jnp

    from mpt_jax import count_params, from_pretrained
    from mpt_jax.atomic_write import stale_notes
    from mpt_jax.checkpoint import CheckpointError, quiet_abandoned_writes
    from mpt_jax.config import ConfigError
    from mpt_jax.hf_checkpoint import transformers_incompatibilities

    src, dst = Path(args.src).resolve(), Path(args.dst).resolve()
    if dst == src or dst in src.parents:
        # the old folder is removed once the new one is written: SRC's other files would go
        print(f"error: DST {args.dst} is SRC or holds it; write to another folder", file=sys.stderr)
        return 2
    try:
        extra = {"allow_pickle": True} if args.allow_pickle else {}
        model = from_pretrained(args.src, step=args.step, **extra)
        out = model.save_pretrained(
            args.dst,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            token_ids=_token_ids(args.src, args.step),
        )
    except CheckpointError as e:  # an unreadable run folder: exit 1, as eval and generate
        quiet_abandoned_writes()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.config
    print(f"wrote {out} ({count_params(cfg):,} parameters)")
    for note in stale_notes(out):
        print(note, file=sys.stderr)
    problems = transformers_incompatibilities(cfg)
    if problems:
        print(f"transformers: needs llm-foundry's MPT code (lacks {', '.join(problems)})")
    else:
        print("transformers: loadable with MptForCausalLM")
    if args.check:
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)))
        before = np.asarray(model(jnp.asarray(ids)), np.float64)
        after = np.asarray(from_pretrained(out)(jnp.asarray(ids)), np.float64)
        print(f"max |logits diff| SRC vs DST (mpt_jax): {np.abs(before - after).max():.3g}")
    return 0


def _token_ids(src: str, step: int | None) -> dict[str, int]:
    """SRC's special-token ids: an HF folder's config.json, or a run's EOS (its dataset's)."""
    from mpt_jax.data import DataError
    from mpt_jax.hf_checkpoint import read_token_ids
    from mpt_jax.loading import is_run_folder, load_tokenizer_for

    if not is_run_folder(Path(src)):
        return read_token_ids(src)
    try:
        return {"eos_token_id": load_tokenizer_for(src, step=step).eos_id}
    except DataError:  # no tokenizer to be found: the export goes on without the ids
        return {}


if __name__ == "__main__":
    sys.exit(main())
