"""Read MosaicML streaming's MDS folders, as llm-foundry's `convert_dataset_hf.py` writes them.

A folder holds `index.json` (format version 2) and shard files. A shard is a uint32 sample count,
uint32 offsets (one more than the samples, from the file's start), the columns as JSON, then the
samples; a sample is
a uint32 size for each column without a fixed size, then the columns' bytes in `column_names`
order. Compressed shards (`zip_data`) are gz, bz2, zstd, br or snappy over the whole file. Shard
hashes listed in the index are checked where Python can compute them.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpt_jax.data.errors import DataError

INDEX_FILE = "index.json"
TOKEN_ENCODING_TYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
# streaming's NDArray encoding: a dtype code byte when the column names no dtype, and a byte
# (ndim << 2 | shape dtype code) plus the shape when it names no shape
_NDARRAY_DTYPES = {
    8: "uint8",
    9: "int8",
    16: "uint16",
    17: "int16",
    18: "float16",
    32: "uint32",
    33: "int32",
    34: "float32",
    64: "uint64",
    65: "int64",
    66: "float64",
}
_SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")
# the python package each compression needs, where the standard library has none
_COMPRESSION_PACKAGES = {"zstd": "zstandard", "br": "brotli", "snappy": "python-snappy"}


def is_mds_folder(path: Path) -> bool:
    """Whether `path` is a folder whose index.json is an MDS index (a JSON object with shards)."""
    index = path / INDEX_FILE
    if not index.is_file():
        return False
    try:
        obj = json.loads(index.read_bytes())
    except (ValueError, OSError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("shards"), list)


@dataclass(frozen=True)
class Column:
    name: str
    encoding: str

    @property
    def kind(self) -> str:
        """text (a str column), tokens (bytes or a 1-D integer ndarray) or other."""
        if self.encoding == "str":
            return "text"
        if self.encoding == "bytes" or self.encoding.split(":")[0] == "ndarray":
            return "tokens"
        return "other"


@dataclass(frozen=True)
class _Shard:
    file: str  # the file read: zip_data's when compressed and the raw file is absent
    raw: dict[str, Any]
    zip: dict[str, Any] | None
    compression: str | None
    samples: int
    sizes: tuple[int | None, ...]  # per column: fixed size, or None (a uint32 in each sample)


class MdsDataset:
    """One MDS folder: its columns, its shards' files, and the samples of one column in order."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        index_path = folder / INDEX_FILE
        try:
            index = json.loads(index_path.read_bytes())
        except (ValueError, OSError) as e:
            raise DataError(f"{name}/{INDEX_FILE}: not a readable MDS index ({e})") from None
        if index.get("version") != 2:
            raise DataError(
                f"{name}/{INDEX_FILE}: index version {index.get('version')!r}; only version 2 "
                "(mosaicml-streaming 0.2 and later) is read"
            )
        self.columns: tuple[Column, ...] | None = None
        self.shards: list[_Shard] = []
        for i, shard in enumerate(index["shards"]):
            where = f"{name}/{INDEX_FILE} shard {i}"
            try:
                self.shards.append(self._shard(shard, where))
            except DataError:
                raise
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        if not self.shards:
            raise DataError(f"{name}/{INDEX_FILE}: the index lists no shard")

    def _shard(self, shard: Any, where: str) -> _Shard:
        if not isinstance(shard, dict):
            raise DataError(f"{where}: not a JSON object")
        if shard.get("version", 2) != 2:
            raise DataError(f"{where}: shard version {shard.get('version')!r}; only 2 is read")
        if shard.get("format") != "mds":
            raise DataError(
                f"{where}: format {shard.get('format')!r}; only MDS shards are read (json, csv "
                "and xsv shards are not)"
            )
        names, encodings = shard["column_names"], shard["column_encodings"]
        sizes, raw, samples = shard["column_sizes"], shard["raw_data"], shard["samples"]
        if not (len(names) == len(encodings) == len(sizes)):
            raise DataError(f"{where}: column_names, column_encodings and column_sizes differ")
        columns = tuple(Column(n, e) for n, e in zip(names, encodings, strict=True))
        if self.columns is None:
            self.columns = columns
        elif columns != self.columns:
            raise DataError(
                f"{where}: columns {_describe(columns)} differ from the first shard's "
                f"{_describe(self.columns)}"
            )
        zip_data = shard.get("zip_data")
        compression = shard.get("compression")
        if zip_data is not None and not compression:
            raise DataError(f"{where}: zip_data without a compression")
        if zip_data is not None and not (self.folder / raw["basename"]).is_file():
            file = zip_data["basename"]
        else:
            file, zip_data = raw["basename"], None  # an uncompressed copy is read as it is
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise DataError(f"{where}: shard file {file!r} is outside the folder")
        return _Shard(file, raw, zip_data, compression, int(samples), tuple(sizes))

    def column(self, name: str) -> Column:
        for column in self.columns or ():
            if column.name == name:
                return column
        raise DataError(
            f"{self.name}: no column {name!r} (columns: {_describe(self.columns or ())})"
        )

    def has_column(self, name: str) -> bool:
        return any(c.name == name for c in self.columns or ())

    def files(self) -> list[Path]:
        """index.json, then the shard files read, in index order."""
        return [self.folder / INDEX_FILE] + [self.folder / s.file for s in self.shards]

    def raw_bytes(self) -> int:
        """The shards' uncompressed size."""
        return sum(int(s.raw.get("bytes", 0)) for s in self.shards)

    def iter_values(self, name: str) -> Iterator[tuple[int, bytes]]:
        """(sample number across the folder, the column's bytes) for every sample in order."""
        index = [c.name for c in self.columns or ()].index(self.column(name).name)
        first = 0
        for shard in self.shards:
            data = self._read(shard)
            where = f"{self.name}/{shard.file}"
            offsets = _offsets(data, shard.samples, where)
            dynamic = sum(size is None for size in shard.sizes)
            for i in range(shard.samples):
                sample = data[offsets[i] : offsets[i + 1]]
                yield first + i, _column_bytes(sample, shard.sizes, dynamic, index, where, i)
            first += shard.samples

    def _read(self, shard: _Shard) -> bytes:
        path = self.folder / shard.file
        where = f"{self.name}/{shard.file}"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{where}: cannot read the shard ({e.strerror})") from None
        if shard.zip is not None:
            _check(data, shard.zip, where)
            data = _decompress(shard.compression, data, where)
        _check(data, shard.raw, where)
        return data


def decode_text(value: bytes, where: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 at byte {e.start}") from None


def decode_tokens(value: bytes, encoding: str, token_encoding_type: str, where: str) -> np.ndarray:
    """Token ids of a bytes column (read as `token_encoding_type`) or a 1-D integer ndarray."""
    if encoding == "bytes":
        dtype = np.dtype(token_encoding_type).newbyteorder("<")
        if len(value) % dtype.itemsize:
            raise DataError(
                f"{where}: {len(value)} bytes are not whole {token_encoding_type} token ids "
                "(--token-encoding-type, llm-foundry's token_encoding_type)"
            )
        tokens = np.frombuffer(value, dtype)
    else:
        tokens = _decode_ndarray(value, encoding, where)
    if tokens.size and int(tokens.min()) < 0:
        raise DataError(f"{where}: negative token id {int(tokens.min())}")
    return tokens


def _decode_ndarray(value: bytes, encoding: str, where: str) -> np.ndarray:
    parts = encoding.split(":")
    at = 0
    try:
        if len(parts) > 1 and parts[1]:
            dtype = parts[1]
        else:
            dtype = _NDARRAY_DTYPES[value[at]]
            at += 1
        if len(parts) > 2:
            shape = tuple(int(d) for d in parts[2].split(","))
        else:
            ndim, shape_dtype = value[at] >> 2, np.dtype(_SHAPE_DTYPES[value[at] & 3])
            at += 1
            shape = tuple(int(d) for d in np.frombuffer(value, shape_dtype, ndim, at))
            at += ndim * shape_dtype.itemsize
    except (IndexError, KeyError, ValueError) as e:
        raise DataError(f"{where}: not a valid {encoding} value ({e})") from None
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise DataError(f"{where}: {dtype} values are not token ids")
    if len(shape) != 1:
        raise DataError(f"{where}: an array of shape {shape}; token ids are 1-D")
    tokens = np.frombuffer(value, np.dtype(dtype).newbyteorder("<"), offset=at)
    if tokens.size != shape[0]:
        raise DataError(f"{where}: {tokens.size} values where the shape says {shape[0]}")
    return tokens


def _describe(columns) -> str:
    return ", ".join(f"{c.name} ({c.encoding})" for c in columns)


def _offsets(data: bytes, samples: int, where: str) -> np.ndarray:
    if len(data) < 4 * (samples + 2):
        raise DataError(f"{where}: {len(data)} bytes, too short for {samples} samples")
    count = int(np.frombuffer(data, "<u4", 1)[0])
    if count != samples:
        raise DataError(f"{where}: holds {count} samples, the index says {samples}")
    offsets = np.frombuffer(data, "<u4", samples + 1, 4).astype(np.int64)
    # between the offsets and the first sample the writer puts its columns' JSON
    if offsets[0] < 4 * (samples + 2) or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
        raise DataError(f"{where}: sample offsets do not fit the file ({len(data)} bytes)")
    return offsets


def _column_bytes(sample: bytes, sizes, dynamic: int, index: int, where: str, i: int) -> bytes:
    head = np.frombuffer(sample, "<u4", dynamic) if len(sample) >= 4 * dynamic else None
    if head is None:
        raise DataError(f"{where} sample {i}: shorter than its column sizes")
    at, d = 4 * dynamic, 0
    for c, size in enumerate(sizes):
        if size is None:
            size, d = int(head[d]), d + 1
        if c == index:
            if at + size > len(sample):
                raise DataError(f"{where} sample {i}: column sizes run past the sample's end")
            return sample[at : at + size]
        at += size
    raise AssertionError("column index out of range")


def _check(data: bytes, entry: dict[str, Any], where: str) -> None:
    """The size and hashes the index records; xxh* are checked where xxhash is installed."""
    size = entry.get("bytes")
    if size is not None and len(data) != size:
        raise DataError(f"{where}: {len(data)} bytes, the index says {size} (truncated?)")
    for algo, expected in (entry.get("hashes") or {}).items():
        if algo in hashlib.algorithms_available:
            got = hashlib.new(algo, data).hexdigest()
        elif algo.startswith("xxh"):
            try:
                import xxhash
            except ImportError:
                continue
            hasher = getattr(xxhash, f"{algo}_hexdigest", None)
            if hasher is None:
                continue
            got = hasher(data)
        else:
            continue
        if got != expected:
            raise DataError(f"{where}: {algo} {got} differs from the index's {expected}")


def _decompress(compression: str | None, data: bytes, where: str) -> bytes:
    algo = (compression or "").split(":")[0]
    try:
        if algo == "gz":
            return gzip.decompress(data)
        if algo == "bz2":
            return bz2.decompress(data)
        if algo == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        if algo == "br":
            import brotli

            return brotli.decompress(data)
        if algo == "snappy":
            import snappy

            return snappy.decompress(data)
    except ImportError:
        raise DataError(
            f"{where}: {algo} compression needs the {_COMPRESSION_PACKAGES[algo]} package: "
            "pip install 'mpt-jax[mds]'"
        ) from None
    except Exception as e:  # each library raises its own error type for corrupt input
        raise DataError(f"{where}: not valid {algo} data ({e})") from None
    raise DataError(f"{where}: compression {compression!r} is not one of gz, bz2, zstd, br, snappy")
