"""Check prepared datasets' rows against their meta.json (after copying one, say).

    python tools/verify_data.py DIR [DIR ...] [--no-progress]

Reads every row of every split, and the dataset's tokenizer.json, and compares them with the
SHA-256s that tools/prepare_data.py recorded; exits 2 naming the folder and split or file at fault.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="prepared dataset folders")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from mpt_jax.data import DataError, open_dataset, verify_dataset

    for folder in args.folders:
        try:
            total = sum(c["rows"] for c in open_dataset(folder).splits.values())
            with tqdm(total=total, unit="row", desc=folder, disable=args.no_progress) as bar:
                meta = verify_dataset(folder, on_rows=bar.update)
        except (DataError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows = ", ".join(f"{split} {c['rows']:,} rows" for split, c in meta.splits.items())
        print(f"{folder}: {rows}: as meta.json records (content id {meta.content_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
