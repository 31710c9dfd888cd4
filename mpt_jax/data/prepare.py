"""Tokenize and pack documents into fixed-length rows stored as ArrayRecord shards plus meta.json.

Packing follows llm-foundry's concatenating dataset: every document is followed by EOS, the token
stream is cut into rows of seq_len tokens (documents span rows), and the incomplete tail is
dropped. MDS folders of token ids (llm-foundry's `convert_dataset_hf.py --concat_tokens`) are
taken as they are: each sample is one row, cut to seq_len as llm-foundry's StreamingTextDataset
cuts it. Output is byte-identical for the same inputs and options.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mpt_jax.atomic_write import replace_folder, temporary_sibling, unwritable_reason
from mpt_jax.data import mds, sources
from mpt_jax.data.errors import DataError
from mpt_jax.data.tokenizer import ByteTokenizer, JsonTokenizer, load_tokenizer, train_bpe

FORMAT_VERSION = 1
# how documents are drawn for validation (meta.json's val.draw); the second draw hashes the text
# alone, the first hashed the input's path as given, so one corpus in two folders split apart
VAL_DRAW = "sha1 of the document's UTF-8 text"
VAL_DRAW_VERSION = 2
VAL_DRAW_TOKENS = "sha1 of the sample's token ids as little-endian int64"
META_FILE = "meta.json"
SPLITS = ("train", "val")
_BATCH_CHARS = 1 << 21  # documents are sent to workers in batches of about 2M characters
_SHARD_BYTES = 128 << 20


def prepare_dataset(
    inputs: Sequence[str],
    out_dir: str | Path,
    *,
    seq_len: int = 2048,
    tokenizer: str = "byte",
    eos_token: str | None = None,
    train_bpe_vocab: int | None = None,
    val_fraction: float = 0.01,
    val_inputs: Sequence[str] = (),
    text_field: str = "text",
    column: str | None = None,
    token_encoding_type: str = "int64",
    workers: int | None = None,
    shard_bytes: int = _SHARD_BYTES,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Prepare a dataset folder; see tools/prepare_data.py for the meaning of each option."""
    out_dir = Path(out_dir)
    if seq_len < 2:
        raise DataError(f"seq_len: must be at least 2, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    if workers is not None and workers < 1:
        raise DataError(f"workers: must be >= 1, got {workers}")
    if token_encoding_type not in mds.TOKEN_ENCODING_TYPES:
        raise DataError(
            f"token_encoding_type: {token_encoding_type!r} is not one of "
            f"{', '.join(mds.TOKEN_ENCODING_TYPES)}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out: {out_dir} is a file; the dataset is written as a folder")
    if reason := unwritable_reason(out_dir.parent):
        raise DataError(f"--out: {reason}")
    replaces = out_dir.exists() and any(out_dir.iterdir())
    if replaces and not overwrite:
        raise DataError(
            f"{out_dir}: already exists and is not empty (overwrite=True; --overwrite in "
            "tools/prepare_data.py)"
        )
    files = sources.resolve_inputs(inputs)
    val_files = sources.resolve_inputs(val_inputs) if val_inputs else []
    out_resolved = out_dir.resolve()
    for f in files + val_files:
        # an MDS folder's files: its index.json, and shards that may sit in subfolders (a
        # merged index)
        for path in sources.files_of(f):
            resolved = path.resolve()
            if out_resolved == resolved or out_resolved in resolved.parents:  # to be deleted
                raise DataError(f"--out: {out_dir} holds the input {path}; choose another folder")
    if replaces and not _is_dataset(out_dir):  # a training run, say: never deleted for data
        raise DataError(
            f"--out: {out_dir} holds no prepared dataset (no meta.json of one); overwrite "
            "replaces datasets only: choose another folder"
        )
    _check_mds_nesting(files, val_files)
    # a validation file is validation only, however its path was spelled or wherever it sits
    val_paths = {f.path.resolve() for f in val_files}
    files = [f for f in files if f.path.resolve() not in val_paths]
    val_sources = set(val_files)
    if not files:
        raise DataError("input: every training input is also a validation input (val inputs)")
    read = dict(text_field=text_field, column=column)
    token_column = _token_column(files + val_files, column, train_bpe_vocab)
    if token_encoding_type != "int64" and (
        token_column is None or token_column.encoding != "bytes"
    ):
        raise DataError(
            f"token_encoding_type: {token_encoding_type} is for an MDS bytes column of token "
            "ids, and no input has one"
        )

    tmp = temporary_sibling(out_dir)
    try:
        if train_bpe_vocab is not None:
            train_docs = (
                d.text
                for d in sources.iter_documents(files, **read)
                if val_files or not _is_val(d, val_fraction)
            )
            tok = JsonTokenizer(train_bpe(train_docs, train_bpe_vocab, tmp / "tokenizer.json"))
        else:
            tok = load_tokenizer(tokenizer, eos_token)
            if isinstance(tok, JsonTokenizer):
                shutil.copyfile(tok.path, tmp / "tokenizer.json")
        spec = tok.spec()
        if isinstance(tok, JsonTokenizer):
            spec["path"] = "tokenizer.json"  # the dataset carries its own copy
        dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")

        writers = {s: _SplitWriter(tmp, s, seq_len, dtype, shard_bytes) for s in SPLITS}
        bar = _InputProgress(files + val_files, disable=not progress)
        if token_column is not None:
            for sample in sources.iter_token_samples(
                files + val_files, column=column, token_encoding_type=token_encoding_type
            ):
                where = f"{sample.source.name} sample {sample.record}"
                _check_vocab(sample.tokens, tok.vocab_size, tokenizer, where)
                if val_files:
                    is_val = sample.source in val_sources
                else:
                    is_val = _is_val_tokens(sample.tokens, val_fraction)
                writers["val" if is_val else "train"].add_row(sample.tokens, where)
                bar.advance(sample.source, sample.tokens.nbytes)
        else:
            docs = sources.iter_documents(files, **read)
            if val_files:
                docs = _chain(docs, sources.iter_documents(val_files, **read))
            for batch, token_lists in _tokenize(docs, spec, tmp, workers):
                for doc, tokens in zip(batch, token_lists, strict=True):
                    where = f"{doc.source.name} record {doc.record}"
                    _check_vocab(tokens, tok.vocab_size, None, where)
                    # the training files exclude the val files: a val file's documents are val
                    is_val = doc.source in val_sources if val_files else _is_val(doc, val_fraction)
                    writers["val" if is_val else "train"].add(tokens, tok.eos_id)
                    bar.advance(doc.source, len(doc.text.encode("utf-8")))
        bar.close()
        counts = {s: w.close() for s, w in writers.items()}
        _check_counts(counts, files, val_fraction, bool(val_files), seq_len)
        meta = {
            "format_version": FORMAT_VERSION,
            "seq_len": seq_len,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer": spec,
            "packing": (
                "concat: EOS after each document, rows of seq_len, tail dropped"
                if token_column is None
                else "mds tokens: each sample one row, cut to seq_len"
            ),
            "val": (
                {"inputs": list(val_inputs)}
                if val_files
                else {
                    "fraction": val_fraction,
                    "draw": VAL_DRAW if token_column is None else VAL_DRAW_TOKENS,
                }
            ),
            "splits": counts,
            "sources": sources.describe(files),
            "val_sources": sources.describe(val_files),
        }
        if token_column is not None:
            meta["mds_tokens"] = {"column": token_column.name, "encoding": token_column.encoding}
            if token_column.encoding == "bytes":
                meta["mds_tokens"]["token_encoding_type"] = token_encoding_type
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class _InputProgress:
    """A bar over the inputs' bytes that reaches each input's end when the next one starts.

    What is read (a document's text, a sample's ids) is fewer bytes than the file holds (JSON
    keys and quoting, MDS headers and other columns), so within an input the bar advances by
    what was read, capped at the input's end, and jumps to where the next input starts.
    """

    def __init__(self, inputs: list[sources.SourceFile], *, disable: bool):
        self._span: dict[sources.SourceFile, tuple[int, int]] = {}
        offset = 0
        for f in inputs:
            size = sources.source_bytes(f)
            self._span[f] = (offset, offset + size)
            offset += size
        self._bar = tqdm(
            total=offset, unit="B", unit_scale=True, desc="prepare", disable=disable, smoothing=0.1
        )

    def advance(self, source: sources.SourceFile, nbytes: int) -> None:
        start, end = self._span[source]
        self._bar.update(max(0, min(max(self._bar.n, start) + nbytes, end) - self._bar.n))

    def close(self) -> None:
        self._bar.update(self._bar.total - self._bar.n)
        self._bar.close()


def _token_column(inputs, column: str | None, train_bpe_vocab: int | None) -> mds.Column | None:
    """The MDS token column when the inputs are token ids; text and token ids do not mix."""
    kinds = {
        f: sources.mds_column(f, column) if f.kind == "mds" else mds.Column("", "str")
        for f in inputs
    }
    tokens = [f for f, c in kinds.items() if c.kind == "tokens"]
    if not tokens:
        return None
    text = [f for f, c in kinds.items() if c.kind != "tokens"]
    if text:
        raise DataError(
            f"input: {tokens[0].name} holds token ids (column {kinds[tokens[0]].name}) and "
            f"{text[0].name} holds text; prepare them as separate datasets"
        )
    if train_bpe_vocab is not None:
        raise DataError(
            f"train_bpe: {tokens[0].name} holds token ids already; give the tokenizer they were "
            "made with (--tokenizer)"
        )
    first = kinds[tokens[0]]
    for f in tokens[1:]:
        if kinds[f] != first:
            raise DataError(
                f"input: {f.name}'s token column {kinds[f].name} ({kinds[f].encoding}) differs "
                f"from {tokens[0].name}'s {first.name} ({first.encoding})"
            )
    return first


def _check_mds_nesting(files, val_files) -> None:
    """An MDS folder inside another (a merged index's part) is one input's samples twice."""
    folders = [f for f in files + val_files if f.kind == "mds"]
    for a in folders:
        for b in folders:
            if a is not b and a.path.resolve() in b.path.resolve().parents:
                raise DataError(
                    f"input: the MDS folder {b.name} is inside the MDS folder {a.name}, whose "
                    "index may list its samples too; give the parts, or the whole, not both"
                )


def _check_vocab(tokens: np.ndarray, vocab_size: int, tokenizer: str | None, where: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        hint = ""
        if tokenizer is not None:  # ids read from MDS: the tokenizer given is not theirs
            hint = f" of --tokenizer {tokenizer}; give the tokenizer the MDS was made with"
        raise DataError(
            f"{where}: token id {int(tokens.max())} is beyond the vocabulary ({vocab_size}){hint}"
        )


def _chain(*iterators: Iterator) -> Iterator:
    for it in iterators:
        yield from it


def _is_val(doc: sources.Document, fraction: float) -> bool:
    """A draw from the document's text alone: paths, file names and order do not move it."""
    return _drawn(doc.text.encode(), fraction)


def _is_val_tokens(tokens: np.ndarray, fraction: float) -> bool:
    """A draw from the sample's token ids alone, as _is_val draws from a document's text."""
    return _drawn(tokens.astype("<i8").tobytes(), fraction)


def _drawn(content: bytes, fraction: float) -> bool:
    """True for `fraction` of all contents, by their SHA-1."""
    if fraction <= 0:
        return False
    digest = hashlib.sha1(content).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def _check_counts(counts, files, val_fraction, separate_val, seq_len) -> None:
    names = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
    if counts["train"]["documents"] == 0 and counts["val"]["documents"] > 0 and not separate_val:
        raise DataError(
            f"input: all {counts['val']['documents']} documents of {names} were drawn for "
            f"validation (val_fraction {val_fraction}); documents are drawn whole and a text "
            "file is one document: give more documents or separate val inputs"
        )
    if counts["train"]["documents"] == 0:
        raise DataError(f"input: no documents found in {names}")
    if counts["train"]["rows"] == 0:
        raise DataError(
            f"input: {counts['train']['documents']} documents give fewer than seq_len "
            f"({seq_len}) tokens, so no complete row ({names})"
        )
    if (separate_val or val_fraction > 0) and counts["val"]["rows"] == 0:
        raise DataError(
            f"input: the validation split has no complete row of {seq_len} tokens "
            f"({counts['val']['documents']} documents, drawn whole: a text file is one "
            "document); raise val_fraction or give val inputs"
        )


def _is_dataset(folder: Path) -> bool:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and {"format_version", "splits"} <= meta.keys()


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: appeared while preparing; not replaced")
    replace_folder(tmp, out_dir)


# ---------------------------------------------------------------------------------------------
# Tokenization in worker processes, results in input order

_WORKER_TOKENIZER: Any = None


def _worker_init(spec: dict[str, Any], folder: str) -> None:
    global _WORKER_TOKENIZER
    from mpt_jax.data.tokenizer import tokenizer_from_spec

    _WORKER_TOKENIZER = tokenizer_from_spec(spec, Path(folder))


def _encode(texts: list[str]) -> list[np.ndarray]:
    return _WORKER_TOKENIZER.encode_batch(texts)


def _batches(docs: Iterator[sources.Document]) -> Iterator[list[sources.Document]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(docs, spec, folder: Path, workers: int | None):
    """Yield (documents, token arrays) batch by batch, in input order."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or spec["kind"] == "byte":
        # bytes need no real work: a pool would only add pickling
        tok = ByteTokenizer() if spec["kind"] == "byte" else None
        if tok is None:
            _worker_init(spec, str(folder))
            tok = _WORKER_TOKENIZER
        for batch in _batches(docs):
            yield batch, tok.encode_batch([d.text for d in batch])
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(spec, str(folder))) as pool:

        def encoded(window):
            return zip(
                window, pool.imap(_encode, [[d.text for d in b] for b in window]), strict=True
            )

        window: list[list[sources.Document]] = []
        # bounded look-ahead keeps memory flat while both cores stay busy
        for batch in _batches(docs):
            window.append(batch)
            if len(window) == 4 * workers:
                yield from encoded(window)
                window = []
        yield from encoded(window)


# ---------------------------------------------------------------------------------------------
# Packing and shard writing


class _SplitWriter:
    """Concatenates documents (+EOS), cuts rows of seq_len, writes ArrayRecord shards."""

    def __init__(self, folder: Path, split: str, seq_len: int, dtype: np.dtype, shard_bytes: int):
        self.folder, self.split, self.seq_len, self.dtype = folder, split, seq_len, dtype
        self.rows_per_shard = max(1, shard_bytes // (seq_len * dtype.itemsize))
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.shards: list[dict[str, Any]] = []
        self.writer = None
        self.rows_in_shard = 0
        self.documents = 0
        self.dropped = 0
        self.rows_digest = hashlib.sha256()  # identifies the rows wherever the folder goes

    def add(self, tokens: np.ndarray, eos_id: int) -> None:
        self._check_fits(tokens, self.split)
        self.documents += 1
        self.pending.append(tokens.astype(self.dtype, copy=False))
        self.pending.append(np.asarray([eos_id], self.dtype))
        self.pending_len += tokens.size + 1
        if self.pending_len >= self.seq_len:
            stream = np.concatenate(self.pending)
            n_rows = stream.size // self.seq_len
            for row in stream[: n_rows * self.seq_len].reshape(n_rows, self.seq_len):
                self._write(row)
            rest = stream[n_rows * self.seq_len :]
            self.pending, self.pending_len = [rest], rest.size

    def add_row(self, tokens: np.ndarray, where: str) -> None:
        """One MDS sample as one row: llm-foundry reads `tokens[:max_seq_len]`."""
        if tokens.size < self.seq_len:
            raise DataError(
                f"{where}: {tokens.size} tokens, fewer than seq_len {self.seq_len}; a sample of "
                "token ids is one row (prepare with a --seq-len no longer than the samples)"
            )
        self._check_fits(tokens, where)
        self.documents += 1
        self.dropped += tokens.size - self.seq_len
        self._write(tokens[: self.seq_len].astype(self.dtype))

    def _check_fits(self, tokens: np.ndarray, where: str) -> None:
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise DataError(
                f"{where}: token id {int(tokens.max())} does not fit the stored {self.dtype.name}"
            )

    def _write(self, row: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None:
            name = f"{self.split}-{len(self.shards):05d}.arrayrecord"
            self.writer = ArrayRecordWriter(str(self.folder / name), "group_size:1")
            self.shards.append({"file": name, "rows": 0})
        self.writer.write(row.tobytes())
        self.rows_digest.update(row.tobytes())
        self.shards[-1]["rows"] += 1
        if self.shards[-1]["rows"] == self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self.writer.close()
        self.writer = None
        self.shards[-1]["bytes"] = (self.folder / self.shards[-1]["file"]).stat().st_size

    def close(self) -> dict[str, Any]:
        if self.writer is not None:
            self._close_shard()
        rows = sum(s["rows"] for s in self.shards)
        return {
            "rows": rows,
            "tokens": rows * self.seq_len,
            "documents": self.documents,
            # text: the stream's incomplete last row; MDS token ids: what seq_len cut off
            "dropped_tail_tokens": self.pending_len + self.dropped,
            "shards": self.shards,
            "rows_sha256": self.rows_digest.hexdigest(),
        }
