"""Streaming reading and writing of HuggingFace safetensors checkpoints, with numpy only."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"

_TYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16]
_TYPES += [np.int8, np.uint64, np.uint32, np.uint16, np.uint8, np.bool_]
_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16"]
_NAMES += ["I8", "U64", "U32", "U16", "U8", "BOOL"]
_CODES = {c: np.dtype(t).newbyteorder("<") for c, t in zip(_NAMES, _TYPES, strict=True)}
DTYPE_NAMES: dict[str, str] = {dt.name: code for code, dt in _CODES.items()}
_FLOAT_NAMES = {"float64", "float32", "float16", "bfloat16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, malformed, or inconsistent."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor name is not in the checkpoint."""

    def __str__(self) -> str:
        # KeyError would repr() the message; keep it plain like other CheckpointErrors.
        return str(self.args[0])


def _line(exc: BaseException) -> str:
    """First line of an exception message, so our errors stay one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def parse_size(size: int | str) -> int:
    """Parse a byte count such as 5GB, 500MB, 2GiB or a plain int."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(size), re.IGNORECASE)
    if not isinstance(size, str) or m is None:
        raise ValueError(f"invalid size {size!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _target_dtype(src: np.dtype, dtype: Any) -> np.dtype:
    """Little-endian dtype to store a tensor of dtype src as, converting floats only."""
    out = np.dtype(dtype) if dtype is not None and src.name in _FLOAT_NAMES else src
    if out.name not in DTYPE_NAMES:
        raise CheckpointError(f"dtype {out} cannot be stored in safetensors")
    return out.newbyteorder("<")


def _write_file(path: Path, items: list[tuple], fetch: Callable, meta: dict[str, str]) -> None:
    """Write one safetensors file from (name, shape, src dtype, out dtype, nbytes) items."""
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, shape, _, out, nbytes in items:
        code = DTYPE_NAMES[out.name]
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape, src, out, _ in items:
                arr = np.asarray(fetch(name))
                if arr.shape != shape or arr.dtype != src:
                    raise CheckpointError(
                        f"{path}: fetch({name!r}) returned {arr.dtype}{list(arr.shape)}, "
                        f"expected {src}{list(shape)}"
                    )
                arr = np.ascontiguousarray(arr.astype(out, copy=False))
                f.write(arr.reshape(-1).view(np.uint8))
                del arr
            if f.tell() != 8 + len(blob) + offset:
                raise CheckpointError(f"{path}: wrote {f.tell()} bytes, header says otherwise")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoint(
    out_dir: str | os.PathLike,
    entries: Sequence[tuple[str, tuple[int, ...], Any]],
    fetch: Callable[[str], np.ndarray],
    *,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Stream tensors into out_dir as one safetensors file or shards plus an index."""
    out = Path(out_dir)
    if not out.is_dir():
        raise CheckpointError(f"output folder {out} does not exist")
    meta = {**(metadata or {}), "format": "pt"}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{out}: metadata must map str to str")
    limit = parse_size(max_shard_size)
    shards: list[list[tuple]] = [[]]
    size = total = 0
    seen: set[str] = set()
    for name, shape, src in entries:
        if not isinstance(name, str) or name in seen or name == "__metadata__":
            raise CheckpointError(f"{out}: bad or repeated tensor name {name!r}")
        seen.add(name)
        shape, src = tuple(int(d) for d in shape), np.dtype(src)
        target = _target_dtype(src, dtype)
        nbytes = math.prod(shape) * target.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, src, target, nbytes))
        size += nbytes
        total += nbytes
    n = len(shards)
    files = (
        [SINGLE_FILE]
        if n == 1
        else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    for fname, items in zip(files, shards, strict=True):
        _write_file(out / fname, items, fetch, meta)
    if n > 1:
        weight_map = {
            it[0]: fname for fname, items in zip(files, shards, strict=True) for it in items
        }
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = out / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out / INDEX_FILE)
        files.append(INDEX_FILE)
    return files


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook rejecting repeated keys."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("repeated key in JSON object")
    return dict(pairs)


class _SafetensorsFile:
    """One safetensors file: header parsed eagerly, data memory-mapped on demand."""

    def __init__(self, path: Path):
        self.path = path
        self._mm: np.memmap | None = None
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for safetensors")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} exceeds file size {size}")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except ValueError as e:  # covers UnicodeDecodeError and JSONDecodeError
            raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({_line(e)})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start, data_size = 8 + n, size - 8 - n
        self.tensors: dict[str, tuple[tuple[int, ...], np.dtype, int, int]] = {}
        for name, info in header.items():
            self.tensors[name] = self._check(name, info, data_size)
        spans = sorted((b, e, name) for name, (_, _, b, e) in self.tensors.items())
        end, prev = 0, None
        for b, e, name in spans:
            if b < end:
                raise CheckpointError(f"{path}: tensor {name!r} overlaps tensor {prev!r}")
            end, prev = max(end, e), name

    def _check(self, name: str, info: Any, data_size: int) -> tuple:
        """Validate one header entry and return (shape, dtype, begin, end)."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: entry needs dtype, shape and data_offsets")
        code, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _CODES:
            raise CheckpointError(f"{where}: unsupported dtype {code!r}")
        ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)
        if not ints(shape) or not ints(offs) or len(offs) != 2 or offs[0] > offs[1]:
            raise CheckpointError(f"{where}: bad shape {shape!r} or data_offsets {offs!r}")
        dt = _CODES[code]
        if offs[1] - offs[0] != math.prod(shape) * dt.itemsize:
            raise CheckpointError(f"{where}: data_offsets {offs} do not match {code}{shape}")
        if offs[1] > data_size:
            raise CheckpointError(f"{where}: data ends at {offs[1]} past the end ({data_size})")
        return tuple(shape), dt, offs[0], offs[1]

    def read(self, name: str) -> np.ndarray:
        """Read-only memmap-backed view of one tensor."""
        shape, dt, b, e = self.tensors[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self._start + b : self._start + e]
        return raw.view(dt).reshape(shape).view(np.ndarray)

    def close(self) -> None:
        """Drop the mapping; views already handed out keep it alive until they die."""
        self._mm = None


class _TorchFile:
    """One torch.save'd state dict, loaded with weights_only=True (memory-mapped if possible)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{path}: reading .bin checkpoints needs torch (pip install torch)"
            ) from None
        self._torch = torch
        try:
            sd = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        except Exception as e:
            raise CheckpointError(f"{path}: torch.load failed ({_line(e)})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
        self.tensors: dict[str, tuple[tuple[int, ...], np.dtype, Any]] = {}
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
            dt = str(t.dtype).removeprefix("torch.")
            if dt not in DTYPE_NAMES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
            self.tensors[name] = (tuple(t.shape), np.dtype(dt), t)

    def read(self, name: str) -> np.ndarray:
        """Bit-exact numpy view of one tensor (bf16 reinterpreted, not converted)."""
        t = self.tensors[name][2].detach().contiguous()
        if t.dtype == self._torch.bfloat16:
            arr = t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            arr = t.numpy()
        arr = arr.view()
        arr.flags.writeable = False
        return arr

    def close(self) -> None:
        """Drop the loaded tensors."""
        self.tensors = {}


class CheckpointReader:
    """Lazy reader over an HF checkpoint folder. Use as a context manager or call close()."""

    def __init__(self, folder: str | os.PathLike, *, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(
                f"checkpoint folder {self.folder} does not exist or is not a folder"
            )
        self._where: dict[str, _SafetensorsFile | _TorchFile] = {}
        self._sources: list[_SafetensorsFile | _TorchFile] = []
        try:
            self._open(allow_pickle)
        except BaseException:
            self.close()
            raise
        self.files = [str(s.path) for s in self._sources]

    def _open(self, allow_pickle: bool) -> None:
        """Find and open the weight files of the folder."""
        d = self.folder
        # transformers' order: the single file wins over an index beside it
        if (d / SINGLE_FILE).is_file():
            return self._add(_SafetensorsFile(d / SINGLE_FILE))
        if (d / INDEX_FILE).is_file():
            return self._open_index(d / INDEX_FILE, _SafetensorsFile)
        others = sorted(p for p in d.glob("*.safetensors") if p.is_file())
        if others:
            for p in others:
                self._add(_SafetensorsFile(p))
            return None
        if (d / BIN_INDEX_FILE).is_file() or (d / BIN_FILE).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{d} has only a PyTorch pickle checkpoint ({BIN_FILE}); mpt_jax reads "
                    "safetensors by default: pass allow_pickle=True to load it with "
                    "torch.load(weights_only=True), or convert it once with "
                    "tools/convert_hf.py SRC DST --allow-pickle"
                )
            if (d / BIN_INDEX_FILE).is_file():
                return self._open_index(d / BIN_INDEX_FILE, _TorchFile)
            return self._add(_TorchFile(d / BIN_FILE))
        raise CheckpointError(
            f"no weights found in {d} (expected {SINGLE_FILE}, {INDEX_FILE}, *.safetensors, "
            f"{BIN_FILE} or {BIN_INDEX_FILE})"
        )

    def _add(self, src: _SafetensorsFile | _TorchFile) -> None:
        """Register every tensor of one file, rejecting names already seen."""
        self._sources.append(src)
        for name in src.tensors:
            if name in self._where:
                other = self._where[name].path
                raise CheckpointError(f"tensor {name!r} is in both {other} and {src.path}")
            self._where[name] = src

    def _open_index(self, index: Path, kind: type) -> None:
        """Open the shards listed by an index file, checking each name is in its shard."""
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({_line(e)})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v
            for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        shards: dict[str, Any] = {}
        for shard in dict.fromkeys(weight_map.values()):
            if not (self.folder / shard).is_file():
                raise CheckpointError(f"{index}: shard {shard} is missing from {self.folder}")
            shards[shard] = kind(self.folder / shard)
            self._sources.append(shards[shard])
        for name, shard in weight_map.items():
            if name not in shards[shard].tensors:
                raise CheckpointError(
                    f"{index}: tensor {name!r} is not in shard {shards[shard].path}"
                )
            self._where[name] = shards[shard]

    def _src(self, name: str) -> _SafetensorsFile | _TorchFile:
        """The file holding name, or MissingTensorError."""
        if name not in self._where:
            raise MissingTensorError(f"tensor {name!r} not found in checkpoint {self.folder}")
        return self._where[name]

    def names(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, from the header."""
        return self._src(name).tensors[name][0]

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of a tensor (bfloat16 as ml_dtypes.bfloat16)."""
        return self._src(name).tensors[name][1]

    def file_of(self, name: str) -> str:
        """Path of the file holding a tensor."""
        return str(self._src(name).path)

    def read(self, name: str) -> np.ndarray:
        """Read-only, memory-mapped view of one tensor."""
        return self._src(name).read(name)

    def close(self) -> None:
        """Release the files; arrays already read stay valid."""
        for src in self._sources:
            src.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
