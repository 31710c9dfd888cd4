"""Data pipeline throughput: preparation (MB of text/s) and loading (tokens/s), as Markdown.

    python tools/bench_data.py [--seq-len 2048] [--global-batch 32] [--batches 300] [--workdir DIR]

Prepares the built-in corpus (the running Python's standard library) with the byte tokenizer and
with a BPE tokenizer.json trained on it, then times the grain loader on the prepared shards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep the datasets in a new folder here (default: a temporary folder, removed)",
    )
    args = parser.parse_args(argv)
    for name in ("seq_len", "global_batch", "batches", "bpe_vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")

    from mpt_jax.atomic_write import unwritable_reason
    from mpt_jax.data import DataError

    if args.workdir is not None and (reason := unwritable_reason(args.workdir)):
        print(f"error: --workdir: {reason}", file=sys.stderr)
        return 2
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    # a new folder of its own, also inside --workdir: nothing already there is replaced
    work = Path(tempfile.mkdtemp(prefix="bench_data-", dir=args.workdir))
    try:
        return _bench(args, work)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.workdir is None:  # kept inside --workdir, as the table says
            shutil.rmtree(work, ignore_errors=True)


def _bench(args, work: Path) -> int:
    from mpt_jax.data import BatchLoader, open_dataset, prepare_dataset
    from mpt_jax.data.sources import builtin_files

    corpus_mb = sum(f.path.stat().st_size for f in builtin_files("python-stdlib")) / 1e6
    rows = []
    common = dict(seq_len=args.seq_len, val_fraction=0.01, progress=False, overwrite=True)

    start = time.perf_counter()
    byte_ds = prepare_dataset(["builtin:python-stdlib"], work / "byte", **common)
    seconds = time.perf_counter() - start
    rows.append(("prepare, byte tokenizer", f"{corpus_mb / seconds:.1f} MB/s", f"{seconds:.1f} s"))

    start = time.perf_counter()
    trained = prepare_dataset(
        ["builtin:python-stdlib"], work / "bpe_train", train_bpe_vocab=args.bpe_vocab, **common
    )
    seconds = time.perf_counter() - start
    rows.append(
        (
            f"train BPE {args.bpe_vocab} + prepare",
            f"{corpus_mb / seconds:.1f} MB/s",
            f"{seconds:.1f} s",
        )
    )
    tokenizer = work / "tokenizer.json"
    shutil.copyfile(trained / "tokenizer.json", tokenizer)
    start = time.perf_counter()
    prepare_dataset(["builtin:python-stdlib"], work / "bpe", tokenizer=str(tokenizer), **common)
    seconds = time.perf_counter() - start
    rows.append(
        (
            f"prepare, BPE tokenizer.json ({os.cpu_count()} workers)",
            f"{corpus_mb / seconds:.1f} MB/s",
            f"{seconds:.1f} s",
        )
    )

    meta = open_dataset(byte_ds)
    for segment_ids in (False, True):
        loader = BatchLoader(
            [(meta, 1.0)],
            global_batch=args.global_batch,
            seed=0,
            segment_ids=segment_ids,
            process_index=0,
            process_count=1,
        )
        for _ in range(10):
            next(loader)
        start = time.perf_counter()
        tokens = 0
        for _ in range(args.batches):
            tokens += next(loader)["input_ids"].size
        seconds = time.perf_counter() - start
        loader.close()
        label = f"load seq {args.seq_len}, batch {args.global_batch}" + (
            " + segment_ids" if segment_ids else ""
        )
        rows.append((label, f"{tokens / seconds:,.0f} tokens/s", f"{args.batches} batches"))

    print(
        f"corpus: Python {sys.version.split()[0]} stdlib, {corpus_mb:.1f} MB; "
        f"{os.cpu_count()} CPU cores; shards in {work}"
    )
    print("| what | throughput | detail |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
