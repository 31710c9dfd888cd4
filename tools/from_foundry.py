"""Translate an llm-foundry training YAML into an mpt_jax run config.

    python tools/from_foundry.py FOUNDRY.yaml --data DIR [--run-dir DIR] [--devices N] [-o OUT]
    python tools/from_foundry.py FOUNDRY.yaml --data NAME=DIR [--data NAME=DIR ...] ...

The YAML is read as llm-foundry reads it (OmegaConf: pip install -e '.[foundry]'). The model,
batch, duration, optimizer, scheduler, clipping, precision, FSDP, evaluation, checkpoint, ICL and
logging keys are translated, with llm-foundry's defaults where one is absent; keys that change
nothing here are dropped with a note (comments at the top of the output); a key that would train
differently is refused in one line (exit 2). `--data` names a dataset prepared with
tools/prepare_data.py (which reads the StreamingDataset's MDS folders), or builtin:NAME; a YAML
whose train_loader has `streams` takes one `--data NAME=DIR` per stream and becomes a weighted
data.mixture. Writes OUT (else prints the YAML).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("foundry_yaml", help="llm-foundry's training YAML (scripts/train/yamls)")
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        help="prepared dataset folder or builtin:NAME; NAME=DIR once per stream of a mixture",
    )
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
        data = _parse_data(args.data)
        folders = [data] if isinstance(data, str) else list(data.values())
        tokenizers = [_dataset_tokenizer(folder, open_dataset) for folder in folders]
    except DataError as e:
        print(f"error: --data: {e}", file=sys.stderr)
        return 2
    # each dataset keeps its own copy of the tokenizer: the copies' contents must agree
    contents = {t if t == "byte" else Path(t).read_bytes() for t in tokenizers}
    if len(contents) > 1 and args.tokenizer is None:
        print(
            f"error: --data: the streams' datasets were prepared with different tokenizers "
            f"({', '.join(tokenizers)}); prepare them with one",
            file=sys.stderr,
        )
        return 2
    tokenizer = args.tokenizer or tokenizers[0]
    try:
        foundry = load_foundry_yaml(args.foundry_yaml)
        translation = translate(
            foundry,
            data=data,
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


def _parse_data(values: list[str]) -> str | dict[str, str]:
    """One folder, or NAME=DIR pairs (a stream each)."""
    from mpt_jax.data import DataError

    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).exists()):
        return values[0]
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise DataError(f"{value}: with several --data, each is NAME=DIR (a stream's name)")
        if name in pairs:
            raise DataError(f"stream {name} is given twice")
        pairs[name] = folder
    return pairs


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
