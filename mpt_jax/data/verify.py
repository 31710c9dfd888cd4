"""Read a prepared dataset's every row and tokenizer.json; check them against its meta.json."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from mpt_jax.data.errors import DataError
from mpt_jax.data.loader import DatasetMeta, open_dataset
from mpt_jax.data.prepare import META_FILE


def verify_dataset(folder: str | Path, on_rows: Callable[[int], None] | None = None) -> DatasetMeta:
    """Check every split's rows, in order, against `rows_sha256`; `on_rows(n)` after each shard.

    The tokenizer.json meta.json names is checked first, against its recorded sha256.

    Catches what open_dataset's size check cannot: shards that were altered, swapped or copied
    wrongly but kept their sizes (a per-host copy gone bad keeps the content id of its meta.json).
    """
    from array_record.python.array_record_module import ArrayRecordReader

    meta = open_dataset(folder)
    _verify_tokenizer_file(meta)
    row_bytes = meta.seq_len * meta.dtype.itemsize
    for split, counts in meta.splits.items():
        if "rows_sha256" not in counts:
            raise DataError(
                f"{meta.folder / META_FILE}: split {split!r} records no rows_sha256 (prepared "
                "before row digests were recorded, 2026-12-07); prepare it again to verify it"
            )
        digest = hashlib.sha256()
        for shard, path in zip(counts["shards"], meta.shard_paths(split), strict=True):
            try:
                reader = ArrayRecordReader(str(path))
                records = reader.read_all()
                reader.close()
            except Exception as e:  # array_record raises plain RuntimeErrors
                raise DataError(f"{path}: unreadable ({str(e).splitlines()[0]})") from e
            if len(records) != shard["rows"]:
                raise DataError(f"{path}: {len(records)} rows, meta.json records {shard['rows']}")
            for i, record in enumerate(records):
                if len(record) != row_bytes:
                    raise DataError(
                        f"{path} record {i}: {len(record)} bytes, a row of seq_len "
                        f"{meta.seq_len} has {row_bytes}"
                    )
                digest.update(record)
            if on_rows is not None:
                on_rows(len(records))
        if digest.hexdigest() != counts["rows_sha256"]:
            raise DataError(
                f"{meta.folder}: the {split} rows differ from those meta.json records "
                f"(sha256 {digest.hexdigest()[:12]}, recorded {counts['rows_sha256'][:12]}): "
                "a shard was altered or replaced; copy or prepare the dataset again"
            )
    return meta


def _verify_tokenizer_file(meta: DatasetMeta) -> None:
    """The tokenizer.json meta.json names, against the sha256 it records."""
    spec = meta.tokenizer
    if spec.get("kind") == "byte" or "path" not in spec:
        return
    path = Path(spec["path"])
    if not path.is_absolute():
        path = meta.folder / path
    recorded = spec.get("sha256", "")
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise DataError(
            f"{path}: missing, meta.json names it (sha256 {recorded[:12]}); "
            "copy or prepare the dataset again"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e})") from e
    # the rows are ids of this file: another one reads them as other text
    if recorded and digest != recorded:
        raise DataError(
            f"{path}: sha256 {digest[:12]}, meta.json records {recorded[:12]} (truncated or "
            "altered); copy or prepare the dataset again"
        )
