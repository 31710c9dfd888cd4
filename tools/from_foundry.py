"""Translate an llm-foundry training YAML into an mpt_jax run config.

    python tools/from_foundry.py FOUNDRY.yaml --data DIR [--run-dir DIR] [--devices N] [-o OUT]

The YAML is read as llm-foundry reads it (OmegaConf: pip install -e '.[foundry]'). The model,
batch, duration, optimizer, scheduler, clipping, precision, FSDP, evaluation, checkpoint, ICL and
logging keys are translated, with llm-foundry's defaults where one is absent; keys that change
nothing here are dropped with a note (comments at the top of the output); a key that would train
differently is refused in one line (exit 2). `--data` names a dataset prepared with
tools/prepare_data.py (or builtin:NAME): StreamingDataset shards are not read. Writes OUT (else
prints the YAML).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("foundry_yaml", help="llm-foundry's training YAML (scripts/train/yamls)")
    parser.add_argument("--data", required=True, help="prepared dataset folder or builtin:NAME")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json the data was prepared with (default: the dataset's own copy)",
    )
    parser.add_argument("--run-dir", default=None, help="default: runs/RUN_NAME")
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices to train on: device_train_microbatch_size x N is the global microbatch "
        "(default: microbatch auto)",
    )
    parser.add_argument("-o", "--out", default=None, help="the run config YAML to write")
    args = parser.parse_args(argv)

    import yaml

    from mpt_jax.atomic_write import write_atomic
    from mpt_jax.config import ConfigError
    from mpt_jax.data import DataError, open_dataset
    from mpt_jax.foundry_yaml import load_foundry_yaml, translate

    try:
        tokenizer = args.tokenizer or _dataset_tokenizer(args.data, open_dataset)
    except DataError as e:
        print(f"error: --data: {e}", file=sys.stderr)
        return 2
    try:
        foundry = load_foundry_yaml(args.foundry_yaml)
        translation = translate(
            foundry,
            data=args.data,
            tokenizer=tokenizer,
            run_dir=args.run_dir,
            devices=args.devices,
        )
    except ConfigError as e:
        print(f"error: {args.foundry_yaml}: {e}", file=sys.stderr)
        return 2
    header = [f"# Translated from {args.foundry_yaml} by tools/from_foundry.py."]
    header += [f"# {note}" for note in translation.notes]
    text = "\n".join(header) + "\n" + yaml.safe_dump(translation.config, sort_keys=False)
    if args.out is None:
        print(text, end="")
    else:
        write_atomic(Path(args.out), text)
        print(f"wrote {args.out} ({len(translation.notes)} notes at its top)")
    return 0


def _dataset_tokenizer(data: str, open_dataset) -> str:
    """The dataset's own tokenizer.json, or byte (built-in corpora: byte unless told)."""
    if data.startswith("builtin:"):
        return "byte"
    meta = open_dataset(data)
    if meta.tokenizer.get("kind") == "byte":
        return "byte"
    return str(Path(data) / meta.tokenizer.get("path", "tokenizer.json"))


if __name__ == "__main__":
    sys.exit(main())
