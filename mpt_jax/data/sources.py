"""Inputs for data preparation: text, JSON Lines, Parquet and MDS, the built-in corpus."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpt_jax.data import mds
from mpt_jax.data.errors import DataError

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("python-stdlib",)
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class SourceFile:
    """One input file, or MDS folder; `name` is how meta.json and errors refer to it."""

    path: Path
    name: str
    kind: str  # text | jsonl | parquet | mds (path is the folder)
    skip_invalid: bool = False  # only for the built-in corpus: skip files that are not UTF-8


@dataclass(frozen=True)
class Document:
    source: SourceFile
    record: int  # line (JSON Lines, 1-based), row (Parquet) or sample (MDS, 0-based); text file: 0
    text: str


@dataclass(frozen=True)
class TokenSample:
    """A pre-tokenized sample of an MDS folder (llm-foundry's `tokens` column)."""

    source: SourceFile
    record: int  # the sample's number across the folder, 0-based
    tokens: np.ndarray


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def builtin_files(corpus: str) -> list[SourceFile]:
    """The files of a built-in corpus; python-stdlib is the running Python's own .py sources."""
    if corpus not in BUILTIN_CORPORA:
        raise DataError(
            f"{BUILTIN_PREFIX}{corpus}: unknown built-in corpus "
            f"(known: {', '.join(BUILTIN_CORPORA)})"
        )
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for fname in sorted(filenames):
            if fname.endswith(".py"):
                path = Path(dirpath) / fname
                files.append(SourceFile(path, str(path.relative_to(root)), "text", True))
    return files


def resolve_inputs(inputs: Sequence[str]) -> list[SourceFile]:
    """Expand files, folders, globs and builtin:NAME into a sorted, de-duplicated file list."""
    if not inputs:
        raise DataError("input: no input given")
    files: list[SourceFile] = []
    for item in inputs:
        if item.startswith(BUILTIN_PREFIX):
            files.extend(builtin_files(item[len(BUILTIN_PREFIX) :]))
            continue
        path = Path(item)
        if path.name == mds.INDEX_FILE and mds.is_mds_folder(path.parent):
            path, item = path.parent, str(path.parent)
        if path.is_dir() and mds.is_mds_folder(path):
            files.append(SourceFile(path, item, "mds"))
            continue
        if any(c in item for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{item}: the pattern matches no file")
            # a pattern's index.json of an MDS folder is that folder, as when given by itself
            found = [p for p in matches if p.name == mds.INDEX_FILE and mds.is_mds_folder(p.parent)]
            files.extend(SourceFile(p.parent, str(p.parent), "mds") for p in found)
            matches = [p for p in matches if p not in found]
        elif path.is_dir():
            matches = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES
            )
            if not matches:
                raise DataError(f"{item}: the folder holds no .txt, .jsonl or .parquet file")
        elif path.is_file():
            matches = [Path(item)]
        else:
            raise DataError(f"{item}: no such file or folder")
        for parent in sorted({p.parent for p in matches}):
            if mds.is_mds_folder(parent):
                # read as text or JSON Lines it would fail far from the cause, or not at all
                raise DataError(
                    f"{item}: holds the MDS dataset {parent}; give MDS folders as inputs of "
                    "their own (a training split, and its validation split by --val-input)"
                )
        files.extend(SourceFile(p, str(p), _kind(p)) for p in matches)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def describe(files: Sequence[SourceFile]) -> list[dict]:
    """Name, size and sha256 of each input, for meta.json; an MDS folder's cover its index.json
    and then its shard files, in the index's order."""
    out = []
    for f in files:
        digest, size = hashlib.sha256(), 0
        for path in files_of(f):
            with open(path, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
            size += path.stat().st_size
        out.append({"name": f.name, "bytes": size, "sha256": digest.hexdigest()})
    return out


def source_bytes(f: SourceFile) -> int:
    """The input's size for the progress bar: an MDS folder's uncompressed shards."""
    return _mds(f).raw_bytes() if f.kind == "mds" else f.path.stat().st_size


def files_of(f: SourceFile) -> list[Path]:
    return _mds(f).files() if f.kind == "mds" else [f.path]


def _mds(f: SourceFile) -> mds.MdsDataset:
    return mds.MdsDataset(f.path, f.name)


def mds_column(f: SourceFile, column: str | None) -> mds.Column:
    """The MDS column read: `column`, else text, else tokens (llm-foundry's order)."""
    dataset = _mds(f)
    if column is None:
        column = (
            "text" if dataset.has_column("text") or not dataset.has_column("tokens") else "tokens"
        )
    found = dataset.column(column)
    if found.kind == "other":
        raise DataError(
            f"{f.name}: column {column!r} is {found.encoding}; text is a str column and token "
            "ids a bytes or ndarray column"
        )
    return found


def iter_documents(
    files: Sequence[SourceFile], *, text_field: str = "text", column: str | None = None
) -> Iterator[Document]:
    """Documents in file order: a text file is one document, a JSON line, Parquet row or MDS
    sample one each. `column` (Parquet and MDS) defaults to text."""
    for f in files:
        if f.kind == "text":
            doc = _read_text(f)
            if doc is not None:
                yield doc
        elif f.kind == "jsonl":
            yield from _read_jsonl(f, text_field)
        elif f.kind == "mds":
            yield from _read_mds_text(f, mds_column(f, column).name)
        else:
            yield from _read_parquet(f, column or "text")


def iter_token_samples(
    files: Sequence[SourceFile], *, column: str | None, token_encoding_type: str
) -> Iterator[TokenSample]:
    """The token ids of each sample of MDS folders with a token column, in order."""
    for f in files:
        found = mds_column(f, column)
        for record, value in _mds(f).iter_values(found.name):
            where = f"{f.name} sample {record}"
            tokens = mds.decode_tokens(value, found.encoding, token_encoding_type, where)
            yield TokenSample(f, record, tokens)


def _read_mds_text(f: SourceFile, column: str) -> Iterator[Document]:
    for record, value in _mds(f).iter_values(column):
        yield Document(f, record, mds.decode_text(value, f"{f.name} sample {record}"))


def _read_text(f: SourceFile) -> Document | None:
    data = f.path.read_bytes()
    try:
        return Document(f, 0, data.decode("utf-8"))
    except UnicodeDecodeError as e:
        if f.skip_invalid:
            return None
        raise DataError(f"{f.name}: invalid UTF-8 at byte {e.start}") from None


def _read_jsonl(f: SourceFile, field: str) -> Iterator[Document]:
    with open(f.path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{f.name} line {lineno}: invalid UTF-8 at byte {e.start}"
                ) from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f.name} line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise DataError(f"{f.name} line {lineno}: no {field!r} field")
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{f.name} line {lineno}: field {field!r} is not a string")
            if "\\u" in line:  # only a \u escape can make a lone surrogate
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise DataError(
                        f"{f.name} line {lineno}: field {field!r} holds a lone surrogate "
                        f"(\\u{ord(text[e.start]):04x}), which is not valid Unicode"
                    ) from None
            yield Document(f, lineno, text)


def _read_parquet(f: SourceFile, column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{f.name}: not a readable Parquet file ({str(e).splitlines()[0]})") from e
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(f"{f.name}: no column {column!r} (columns: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        try:
            texts = batch.column(0).to_pylist()
        except UnicodeDecodeError as e:
            raise DataError(
                f"{f.name} rows {row}..{row + batch.num_rows - 1}: column {column!r} has invalid "
                f"UTF-8 ({e.reason})"
            ) from None
        for text in texts:
            if not isinstance(text, str):  # a null too, as in JSON Lines: no silent gaps
                kind = "null" if text is None else "not a string"
                raise DataError(f"{f.name} row {row}: column {column!r} is {kind}")
            yield Document(f, row, text)
            row += 1
