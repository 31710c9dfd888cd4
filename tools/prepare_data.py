"""Tokenize and pack text into ArrayRecord shards plus meta.json for training.

    python tools/prepare_data.py INPUT [INPUT ...] --out DIR [--seq-len 2048] [--tokenizer byte]
        [--train-bpe VOCAB] [--val-fraction 0.01 | --val-input FILE ...] [--text-field text]
        [--column text] [--token-encoding-type int64] [--workers N] [--overwrite]

INPUT: text files (one document each), JSON Lines (one document per line, field --text-field),
Parquet (one per row, column --column), folders and globs of these, builtin:python-stdlib, or
an MDS folder (llm-foundry's convert_dataset_hf.py output: a text column is tokenized and packed,
a tokens column is taken one sample per row).
--tokenizer: 'byte' (built in), a tokenizer.json, or a transformers tokenizer folder.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="files, folders, globs or builtin:python-stdlib")
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", default="byte", help="byte | tokenizer.json | folder")
    parser.add_argument("--eos-token", default=None, help="end-of-text token of the tokenizer")
    parser.add_argument(
        "--train-bpe",
        type=int,
        default=None,
        metavar="VOCAB",
        help="train a byte-level BPE tokenizer of this size on the input",
    )
    parser.add_argument("--val-fraction", type=float, default=None, help="default 0.01")
    parser.add_argument("--val-input", nargs="+", default=(), help="separate validation input")
    parser.add_argument("--text-field", default="text", help="JSON Lines field")
    parser.add_argument(
        "--column",
        default=None,
        help="Parquet or MDS column (default text; MDS: text, else tokens)",
    )
    parser.add_argument(
        "--token-encoding-type",
        default="int64",
        help="dtype of an MDS bytes column of token ids (llm-foundry's token_encoding_type)",
    )
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from mpt_jax.atomic_write import stale_notes
    from mpt_jax.data import DataError, open_dataset, prepare_dataset

    # options that would be ignored are refused: the dataset must be what was asked for
    clash = None
    if args.val_input and args.val_fraction is not None:
        clash = "--val-fraction and --val-input: give one (a fraction or separate files)"
    elif args.train_bpe is not None and args.tokenizer != "byte":
        clash = "--tokenizer and --train-bpe: give one (a trained BPE is its own tokenizer)"
    elif args.eos_token is not None and (args.train_bpe is not None or args.tokenizer == "byte"):
        clash = "--eos-token: only with a --tokenizer file or folder (the others know their EOS)"
    if clash:
        print(f"error: {clash}", file=sys.stderr)
        return 2

    val_fraction = (
        0.0 if args.val_input else (args.val_fraction if args.val_fraction is not None else 0.01)
    )
    try:
        out = prepare_dataset(
            args.inputs,
            args.out,
            seq_len=args.seq_len,
            tokenizer=args.tokenizer,
            eos_token=args.eos_token,
            train_bpe_vocab=args.train_bpe,
            val_fraction=val_fraction,
            val_inputs=args.val_input,
            text_field=args.text_field,
            column=args.column,
            token_encoding_type=args.token_encoding_type,
            workers=args.workers,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = open_dataset(out)
    for split, counts in meta.splits.items():
        print(
            f"{split}: {counts['rows']:,} rows, {counts['tokens']:,} tokens, "
            f"{counts['documents']:,} documents, {len(counts['shards'])} shards"
        )
    print(f"wrote {out} (vocab {meta.vocab_size}, eos {meta.eos_id}, {meta.dtype.name})")
    for note in stale_notes(out):
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
