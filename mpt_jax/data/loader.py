"""Deterministic, resumable grain pipelines over prepared datasets, sharded across processes.

Global order: each dataset's rows are shuffled with the seed (a new permutation every epoch) and
repeated endlessly; several datasets are interleaved by their weights. Global batch b is samples
[b*G, (b+1)*G) of that order, and process p of P reads only its contiguous share
[b*G + p*G/P, b*G + (p+1)*G/P). The order depends on the seed, the datasets and G, not on the
number of processes, so a run can resume on a different process count with the same batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from mpt_jax.data.errors import DataError
from mpt_jax.data.prepare import FORMAT_VERSION, META_FILE
from mpt_jax.data.tokenizer import ByteTokenizer, JsonTokenizer


@dataclass(frozen=True)
class DatasetMeta:
    """A prepared dataset folder and its meta.json."""

    folder: Path
    seq_len: int
    dtype: np.dtype
    vocab_size: int
    eos_id: int
    tokenizer: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    content_id: str = ""  # what decides the rows, whichever folder holds them: see content_id()

    def shard_paths(self, split: str) -> list[Path]:
        if split not in self.splits:
            raise DataError(f"{self.folder / META_FILE}: no split {split!r}")
        return [self.folder / s["file"] for s in self.splits[split]["shards"]]


def open_dataset(folder: str | Path) -> DatasetMeta:
    """Read meta.json and check that every shard is present with its recorded size."""
    folder = Path(folder)
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: missing (not a prepared dataset; see tools/prepare_data.py)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from e
    try:
        if meta["format_version"] != FORMAT_VERSION:
            raise DataError(f"{path}: format_version {meta['format_version']} is not supported")
        info = DatasetMeta(
            folder,
            int(meta["seq_len"]),
            np.dtype(meta["dtype"]).newbyteorder("<"),
            int(meta["vocab_size"]),
            int(meta["eos_id"]),
            dict(meta["tokenizer"]),
            _checked_splits(meta["splits"], path),
            content_id(meta),
        )
        shards = {
            split: [(folder / shard["file"], shard["bytes"]) for shard in counts["shards"]]
            for split, counts in info.splits.items()
        }
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed ({type(e).__name__}: {e})") from e
    for split, files in shards.items():
        for shard_path, recorded in files:
            if not shard_path.is_file():
                raise DataError(f"{shard_path}: shard of split {split!r} is missing")
            size = shard_path.stat().st_size
            if size != recorded:
                raise DataError(
                    f"{shard_path}: {size} bytes, meta.json records {recorded} "
                    "(truncated or corrupted)"
                )
    return info


def _checked_splits(splits: Any, path: Path) -> dict[str, dict[str, Any]]:
    """meta.json's splits (read from `path`), their shard files and counts checked."""

    def malformed(what: str) -> DataError:
        return DataError(f"{path}: malformed ({what})")

    def count(value: Any, where: str) -> int:
        if type(value) is not int or value < 0:
            raise malformed(f"{where} is {value!r}, not a count")
        return value

    if not isinstance(splits, dict):
        raise malformed(f"splits is a {type(splits).__name__}, not a mapping")
    for name, split in splits.items():
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise malformed(f"splits.{name} has no list of shards")
        rows = count(split.get("rows"), f"splits.{name}.rows")
        for i, shard in enumerate(split["shards"]):
            where = f"splits.{name}.shards[{i}]"
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
                raise malformed(f"{where} names no file")
            count(shard.get("rows"), f"{where}.rows")
            count(shard.get("bytes"), f"{where}.bytes")
        if sum(shard["rows"] for shard in split["shards"]) != rows:
            raise malformed(f"the rows of splits.{name}'s shards do not add up to its {rows}")
    return dict(splits)


def content_id(meta: dict[str, Any]) -> str:
    """A digest of the rows a dataset holds and their tokenizer, not of where the folder sits.

    From each split's `rows_sha256` (the SHA-256 of its rows' bytes in order), so a moved or
    copied dataset keeps its id and any other rows get another; a dataset prepared before
    row digests were recorded is known by its whole meta.json (counts, sources, options).
    """
    splits = meta["splits"]
    if not all("rows_sha256" in counts for counts in splits.values()):
        decided = meta
    else:
        decided = {
            "seq_len": meta["seq_len"],
            "dtype": meta["dtype"],
            "vocab_size": meta["vocab_size"],
            "eos_id": meta["eos_id"],
            "tokenizer": {k: v for k, v in meta["tokenizer"].items() if k != "path"},
            "splits": {name: [c["rows"], c["rows_sha256"]] for name, c in splits.items()},
        }
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:16]


def check_compatible(
    meta: DatasetMeta, *, seq_len: int, vocab_size: int, tokenizer: str | None = None
) -> None:
    """Refuse a dataset whose seq_len, vocabulary or tokenizer disagrees with the training."""
    where = meta.folder / META_FILE
    if meta.seq_len != seq_len:
        raise DataError(
            f"{where}: seq_len {meta.seq_len} differs from the training seq_len {seq_len}"
        )
    if meta.vocab_size > vocab_size:
        raise DataError(
            f"{where}: tokenizer vocabulary {meta.vocab_size} exceeds model.vocab_size {vocab_size}"
        )
    if tokenizer is not None:
        kind = meta.tokenizer.get("kind")
        ok = kind == tokenizer if tokenizer == "byte" else kind != "byte"
        if not ok:
            raise DataError(
                f"{where}: prepared with tokenizer {kind!r}, the config asks for {tokenizer!r}"
            )
        if tokenizer != "byte":
            check_tokenizer(
                meta,
                JsonTokenizer(tokenizer, meta.tokenizer.get("eos_token")),
                named=f"data.tokenizer {tokenizer}",
                remedy="name the tokenizer it was prepared with (the dataset keeps a copy: "
                "tokenizer.json)",
            )


def check_same_eos(first: DatasetMeta, meta: DatasetMeta) -> None:
    """Refuse a dataset whose documents end in another token than `first`'s (one tokenizer file
    prepared with another --eos-token): a run would learn two ends of text, and its HF export
    and evaluations know only the first."""
    if meta.eos_id == first.eos_id:
        return
    tokens = [m.tokenizer.get("eos_token") for m in (meta, first)]
    said = f" ({tokens[0]!r} and {tokens[1]!r})" if None not in tokens else ""
    raise DataError(
        f"{meta.folder / META_FILE}: documents end in token {meta.eos_id}, those of "
        f"{first.folder} in {first.eos_id}{said}; prepare every dataset of a run with the same "
        "end-of-text token (tools/prepare_data.py --eos-token)"
    )


def check_tokenizer(
    meta: DatasetMeta, tokenizer: ByteTokenizer | JsonTokenizer, *, named: str, remedy: str
) -> None:
    """Refuse a dataset whose ids `tokenizer` (`named` says whose) would read as other text."""
    where = meta.folder / META_FILE
    kind = meta.tokenizer.get("kind")
    if (kind == "byte") != (tokenizer.kind == "byte"):
        raise DataError(
            f"{where}: prepared with tokenizer {kind!r}, {named} is {tokenizer.kind!r}; {remedy}"
        )
    theirs = meta.tokenizer.get("sha256", "")
    if tokenizer.kind != "byte" and tokenizer.sha256 != theirs:
        raise DataError(
            f"{where}: prepared with a tokenizer.json of sha256 {theirs[:12]}, "
            f"{named} is {tokenizer.sha256[:12]}; {remedy}"
        )


class RowSource(grain.sources.RandomAccessDataSource):
    """Rows of one split as uint arrays; a bad record is an error naming its shard and index."""

    def __init__(self, meta: DatasetMeta, split: str):
        self.meta, self.split = meta, split
        self.paths = meta.shard_paths(split)
        self.counts = [s["rows"] for s in meta.splits[split]["shards"]]
        self.starts = np.cumsum([0, *self.counts])
        self._source = None

    def _open(self):
        if self._source is None:
            try:
                self._source = grain.sources.ArrayRecordDataSource([str(p) for p in self.paths])
            except Exception as e:  # array_record raises plain RuntimeErrors
                raise DataError(f"{self.meta.folder}: cannot open shards ({e})") from e
            if len(self._source) != self.starts[-1]:
                raise DataError(
                    f"{self.meta.folder}: {len(self._source)} rows in the {self.split} shards, "
                    f"meta.json records {self.starts[-1]} (truncated or corrupted)"
                )
        return self._source

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.paths[shard]} record {index - self.starts[shard]}"

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            raw = self._open()[index]
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self._where(index)}: unreadable ({e})") from e
        row = np.frombuffer(raw, dtype=self.meta.dtype)
        if row.size != self.meta.seq_len:
            raise DataError(
                f"{self._where(index)}: {len(raw)} bytes, expected {self.meta.seq_len} tokens "
                "(corrupted)"
            )
        return row

    def __getstate__(self):
        return {**self.__dict__, "_source": None}


def sequence_ids(row: np.ndarray, eos_id: int) -> np.ndarray:
    """llm-foundry's sequence_id: count of EOS strictly before each position (EOS ends its doc)."""
    is_eos = (row == eos_id).astype(np.int32)
    return np.concatenate([[0], np.cumsum(is_eos[:-1])]).astype(np.int32)


class _ProcessShare(grain.MapDataset):
    """Process p's contiguous share of every global batch of the parent's order."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
        super().__init__(parent)
        self.global_batch, self.local = global_batch, global_batch // count
        self.offset = index * self.local

    def __len__(self) -> int:
        return len(self._parent) // self.global_batch * self.local

    def __getitem__(self, n):
        if isinstance(n, slice):
            return self.slice(n)
        b, j = divmod(n, self.local)
        return self._parent[b * self.global_batch + self.offset + j]


class BatchLoader:
    """Batches of `input_ids` (and `segment_ids`) from one dataset or a weighted mixture.

    Without `sharding` each call returns this process's rows as NumPy arrays (G/P, S); with a
    `jax.sharding.Sharding` for the (G, S) batch it returns global jax.Arrays built with
    `jax.make_array_from_process_local_data`. Batches are prepared `prefetch` ahead in a
    background thread; `state()` counts only the batches handed out.
    """

    def __init__(
        self,
        datasets: Sequence[tuple[DatasetMeta, float]],
        *,
        global_batch: int,
        split: str = "train",
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        segment_ids: bool = False,
        sharding: Any = None,
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 2,
        prefetch: int = 2,
    ):
        if not datasets:
            raise DataError("data: no dataset given")
        seq_lens = {m.seq_len for m, _ in datasets}
        if len(seq_lens) != 1:
            raise DataError(
                f"data: datasets of different seq_len {sorted(seq_lens)} cannot be mixed"
            )
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if global_batch <= 0 or global_batch % process_count:
            raise DataError(
                f"data: global_batch {global_batch} must be a positive multiple of the "
                f"{process_count} processes"
            )
        if len(datasets) > 1 and not repeat:
            raise DataError("data: a mixture of datasets must repeat (repeat=True)")
        self.seq_len = seq_lens.pop()
        self.global_batch, self.split, self.seed = global_batch, split, seed
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self.sharding, self.prefetch = sharding, max(1, prefetch)
        self._names = [str(m.folder) for m, _ in datasets]
        self._contents = [m.content_id for m, _ in datasets]
        parts = []
        for i, (meta, _) in enumerate(datasets):
            ds = grain.MapDataset.source(RowSource(meta, split))
            if len(ds) == 0:
                raise DataError(f"{meta.folder}: the {split} split has no rows")
            if shuffle:
                # grain takes seeds in [0, 2**32): wrapped, so any train.seed works and the
                # seeds below 4295 keep the order they always had
                ds = ds.shuffle(seed=(seed * 1_000_003 + i) % 2**32)
            if repeat:
                ds = ds.repeat(None)
            eos = meta.eos_id
            ds = ds.map(lambda row, eos=eos: _example(row, eos, segment_ids))
            parts.append(ds)
        if len(parts) == 1:
            order = parts[0]
        else:
            weights = [float(w) for _, w in datasets]
            if min(weights) <= 0:
                raise DataError(f"data: mixture weights must be > 0, got {weights}")
            order = grain.MapDataset.mix(parts, weights)
        share = _ProcessShare(order, global_batch, process_index, process_count)
        if len(share) == 0:
            raise DataError(f"data: the {split} split has fewer rows than one global batch")
        self._dataset = share.batch(self.local_batch, drop_remainder=True)
        self._options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
        self._consumed = 0
        self._thread: threading.Thread | None = None
        self._start(0)

    def __len__(self) -> int:
        """Global batches per pass (very large when repeating)."""
        return len(self._dataset)

    def _start(self, batches: int) -> None:
        self._stop()
        iterator = iter(self._dataset.to_iter_dataset(self._options))
        if batches:
            iterator.set_state({"next_index": batches})
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(iterator,), daemon=True)
        self._thread.start()

    def _produce(self, iterator) -> None:
        try:
            for batch in iterator:
                if not self._offer(self._to_global(batch)):
                    return
            self._offer(StopIteration())
        except BaseException as e:  # handed to the consumer
            self._offer(e)

    def _offer(self, item) -> bool:
        """Queue an item unless the loader is stopping; never blocks a stop."""
        while not self._halt.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _to_global(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.sharding is None:
            return batch
        import jax

        shape = (self.global_batch, self.seq_len)
        return {
            k: jax.make_array_from_process_local_data(self.sharding, v, shape)
            for k, v in batch.items()
        }

    def _stop(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        item = self._queue.get()
        if isinstance(item, StopIteration):
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)  # the producer has stopped: every later call raises it too
            raise item
        self._consumed += 1
        return item

    def state(self) -> dict[str, Any]:
        """The position as plain data (JSON-serializable), independent of the process count."""
        return {
            "batches": self._consumed,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "split": self.split,
            "datasets": self._names,
            "contents": self._contents,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse a position saved over other rows or in another order than this loader's."""
        for key in ("global_batch", "seed", "split"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"data state: {key} {state.get(key)!r} differs from this loader's "
                    f"{getattr(self, key)!r}; the sample order would change"
                )
        saved = state.get("contents")
        if saved is None:  # saved before content ids were: the folders must be the same
            was = [str(p) for p in state.get("datasets", self._names)]
            if not all(map(_same_folder, was, self._names)) or len(was) != len(self._names):
                raise DataError(
                    f"data: {', '.join(self._names)} is not where the run's dataset was "
                    f"({', '.join(was)}), and its checkpoint is older than content ids, so the "
                    "rows cannot be checked; name the same folder, or start a new run with "
                    "init_from"
                )
            return
        if saved == self._contents:
            return
        if sorted(saved) == sorted(self._contents):
            raise DataError(
                f"data: the datasets are in another order than the run's "
                f"({', '.join(map(str, state.get('datasets', saved)))}), so the sample order "
                "would change; list them as the run did"
            )
        if len(saved) != len(self._contents):
            raise DataError(
                f"data state: saved over {len(saved)} datasets, this loader reads "
                f"{len(self._contents)}; the sample order would change"
            )
        i = next(i for i, (a, b) in enumerate(zip(saved, self._contents, strict=True)) if a != b)
        was = state.get("datasets", [None] * len(saved))[i]
        raise DataError(
            f"data: {self._names[i]} is not the dataset the run trained on ({was}): its content "
            f"id is {self._contents[i]}, the run's {saved[i]} (prepared from other inputs or "
            "with other options), so the sample order would change; prepare it as before, or "
            "start a new run with init_from"
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batches `state` counts."""
        self.check_state(state)
        self._consumed = int(state["batches"])
        self._start(self._consumed)

    def close(self) -> None:
        self._stop()

    def __del__(self):
        with contextlib.suppress(Exception):
            self._stop()


def _same_folder(a: str, b: str) -> bool:
    """The same folder, however named (relative, absolute, through a link)."""
    try:
        return a == b or Path(a).samefile(b)
    except OSError:
        return False


def _example(row: np.ndarray, eos_id: int, with_segments: bool) -> dict[str, np.ndarray]:
    out = {"input_ids": row.astype(np.int32)}
    if with_segments:
        out["segment_ids"] = sequence_ids(row, eos_id)
    return out
