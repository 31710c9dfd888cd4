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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    args = parser.parse_args(argv)

    import yaml

    from mpt_jax.atomic_write import write_atomic
    from mpt_jax.config import ConfigError
    from mpt_jax.data import DataError, check_compatible, open_dataset
    from mpt_jax.foundry_yaml import load_foundry_yaml, translate

    try:
        data = _parse_data(args.data)
        _check_out(args.out, args.foundry_yaml, data, overwrite=args.overwrite)
        tokenizer = _tokenizer(data, args.tokenizer, open_dataset)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    cfg = translation.run_config
    for name, folder in _folders(data).items():
        try:  # the trainer's own check, now rather than at its start
            check_compatible(
                open_dataset(folder), seq_len=cfg.seq_len, vocab_size=cfg.model.vocab_size
            )
        except DataError as e:
            print(f"error: {args.foundry_yaml} with --data {name or folder}: {e}", file=sys.stderr)
            return 2
    header = [f"# Translated from {args.foundry_yaml} by tools/from_foundry.py."]
    header += [f"# {note}" for note in translation.notes]
    text = "\n".join(header) + "\n" + yaml.safe_dump(translation.config, sort_keys=False)
    if args.out is None:
        print(text, end="")
    else:
        try:
            write_atomic(Path(args.out), text)
        except OSError as e:
            print(f"error: -o: {args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
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
            raise DataError(
                f"--data: {value}: with several --data, each is NAME=DIR (a stream's name)"
            )
        if name in pairs:
            raise DataError(f"--data: stream {name} is given twice")
        pairs[name] = folder
    return pairs


def _folders(data: str | dict[str, str]) -> dict[str, str]:
    """The prepared folders by stream name ("" for a single --data), built-in corpora aside."""
    named = {"": data} if isinstance(data, str) else data
    return {name: folder for name, folder in named.items() if not folder.startswith("builtin:")}


def _check_out(
    out: str | None, foundry_yaml: str, data: str | dict[str, str], *, overwrite: bool
) -> None:
    """Refuse an -o that is a folder, lies under a file, would replace an input, or exists
    (without --overwrite)."""
    from mpt_jax.atomic_write import unwritable_reason
    from mpt_jax.data import DataError

    if out is None:
        return
    target = Path(out).resolve()
    if target.is_dir():
        raise DataError(f"-o: {out} is a folder; name the YAML file to write")
    if reason := unwritable_reason(target.parent):
        raise DataError(f"-o: {reason}")
    if target == Path(foundry_yaml).resolve():
        raise DataError(f"-o: {out} is the llm-foundry YAML read; name another file")
    for folder in _folders(data).values():
        if Path(folder).resolve() in target.parents:
            raise DataError(f"-o: {out} is inside the dataset {folder}; name another file")
    if target.exists() and not overwrite:
        raise DataError(f"-o: {out} already exists; pass --overwrite to replace it")


def _tokenizer(data: str | dict[str, str], given: str | None, open_dataset) -> str:
    """The tokenizer the datasets were prepared with, the same for every stream (by content and
    EOS: each dataset keeps its own copy); `given` (--tokenizer) must be theirs too."""
    from mpt_jax.data import DataError

    found: list[tuple[str, str, tuple]] = []  # (the --data argument, tokenizer, identity)
    # built-in corpora are prepared at training time with data.tokenizer, whatever it is
    for name, folder in _folders(data).items():
        argument = f"--data {name}={folder}" if name else f"--data {folder}"
        try:
            meta = open_dataset(folder)
            tokenizer = _dataset_tokenizer(folder, meta)
            found.append((argument, tokenizer, (_content(tokenizer), meta.eos_id)))
        except (DataError, OSError) as e:
            raise DataError(f"{argument}: {e}") from None
    for argument, tokenizer, identity in found[1:]:
        if identity != found[0][2]:
            raise DataError(
                f"{argument} was prepared with another tokenizer or EOS than {found[0][0]} "
                f"({tokenizer}, {found[0][1]}); prepare the streams with one"
            )
    if given is not None:
        try:
            content = _content(given)
        except OSError as e:
            raise DataError(f"--tokenizer: {given}: {e.strerror or e}") from None
        for argument, tokenizer, identity in found:
            if content != identity[0]:
                raise DataError(
                    f"{argument} was prepared with {tokenizer}, not --tokenizer {given}"
                )
        return given
    return found[0][1] if found else "byte"


def _content(tokenizer: str) -> bytes | str:
    return tokenizer if tokenizer == "byte" else Path(tokenizer).read_bytes()


def _dataset_tokenizer(data: str, meta) -> str:
    """The dataset's own tokenizer.json, or byte."""
    if meta.tokenizer.get("kind") == "byte":
        return "byte"
    return str(Path(data) / meta.tokenizer.get("path", "tokenizer.json"))


if __name__ == "__main__":
    sys.exit(main())
