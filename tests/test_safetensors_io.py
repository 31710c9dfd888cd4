"""Tests for mpt_jax.safetensors_io: round trips, interop with safetensors, sharding, errors."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from mpt_jax.safetensors_io import (
    DTYPE_NAMES,
    CheckpointError,
    CheckpointReader,
    parse_size,
    write_checkpoint,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors() -> dict[str, np.ndarray]:
    """A mix of dtypes and shapes, including scalar and zero-size, with awkward bit patterns."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    f32.flat[0] = np.nan
    f32.flat[1] = -0.0
    return {
        "a.f32": f32,
        "b.f16": rng.standard_normal((5, 7)).astype(np.float16),
        "c.bf16": rng.integers(0, 2**16, (3, 8), dtype=np.uint16).view(BF16),
        "d.i64": rng.integers(-(2**62), 2**62, (6,), dtype=np.int64),
        "e.bool": rng.integers(0, 2, (4, 1), dtype=np.uint8).astype(bool),
        "f.scalar": np.array(3.5, np.float32),
        "g.empty": np.zeros((0, 4), np.float32),
        "h.i32": np.arange(12, dtype=np.int32).reshape(2, 2, 3),
    }


def _write(folder, tensors, **kw) -> list[str]:
    entries = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    return write_checkpoint(folder, entries, lambda n: tensors[n], **kw)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _assert_same(reader: CheckpointReader, tensors: dict[str, np.ndarray]) -> None:
    assert reader.names() == list(tensors)
    for name, ref in tensors.items():
        got = reader.read(name)
        assert got.dtype == ref.dtype, name
        assert got.shape == ref.shape == reader.shape(name), name
        assert reader.dtype(name) == ref.dtype
        assert _bits(got) == _bits(ref), name


def test_round_trip_bit_exact(tmp_path):
    tensors = _tensors()
    assert _write(tmp_path, tensors) == ["model.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    assert json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}
    with CheckpointReader(tmp_path) as r:
        _assert_same(r, tensors)
        assert r.files == [str(tmp_path / "model.safetensors")]
        assert r.file_of("a.f32") == str(tmp_path / "model.safetensors")
        arr = r.read("a.f32")
        assert not arr.flags.writeable
        with pytest.raises(CheckpointError, match="nope") as ei:
            r.read("nope")
        assert isinstance(ei.value, KeyError)
    assert _bits(arr) == _bits(tensors["a.f32"])  # views outlive close()


def test_metadata_is_written(tmp_path):
    _write(tmp_path, {"x": np.ones(2, np.float32)}, metadata={"note": "hi", "format": "np"})
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8 : 8 + n])["__metadata__"] == {"note": "hi", "format": "pt"}


def test_official_reader_reads_our_files(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {k: v for k, v in _tensors().items() if v.dtype != BF16}
    _write(tmp_path, tensors)
    loaded = safetensors_numpy.load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert _bits(loaded[k]) == _bits(v), k


def test_official_reader_reads_our_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors = pytest.importorskip("safetensors")
    tensors = _tensors()
    _write(tmp_path, tensors)
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        got = f.get_tensor("c.bf16")
        assert got.dtype == torch.bfloat16
        assert np.array_equal(got.view(torch.int16).numpy(), tensors["c.bf16"].view(np.int16))
        assert np.array_equal(f.get_tensor("d.i64").numpy(), tensors["d.i64"])


def test_we_read_official_files(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {k: v for k, v in _tensors().items() if v.dtype != BF16}
    (tmp_path / "np").mkdir()
    safetensors_numpy.save_file(tensors, tmp_path / "np" / "model.safetensors")
    with CheckpointReader(tmp_path / "np") as r:
        assert set(r.names()) == set(tensors)
        _assert_same(r, {k: tensors[k] for k in r.names()})

    bf = torch.randn(4, 6).to(torch.bfloat16)
    pt = {"w": bf, "b": torch.arange(5, dtype=torch.int64), "s": torch.tensor(1.25)}
    (tmp_path / "pt").mkdir()
    safetensors_torch.save_file(pt, tmp_path / "pt" / "weights.safetensors")  # non-HF name
    with CheckpointReader(tmp_path / "pt") as r:
        assert r.dtype("w") == BF16 and r.shape("s") == ()
        assert np.array_equal(r.read("w").view(np.int16), bf.view(torch.int16).numpy())
        assert np.array_equal(r.read("b"), pt["b"].numpy())
        assert r.read("s").item() == 1.25


def test_sharding(tmp_path):
    tensors = {f"t{i}": np.full((10 + i,), i, np.float32) for i in range(5)}  # 40..56 bytes
    files = _write(tmp_path, tensors, max_shard_size=100)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert files == [*shards, "model.safetensors.index.json"]
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    expected = dict(zip(tensors, [shards[0]] * 2 + [shards[1]] * 2 + [shards[2]], strict=True))
    assert index["weight_map"] == expected
    with CheckpointReader(tmp_path) as r:
        _assert_same(r, tensors)
        assert r.files == [str(tmp_path / s) for s in shards]
        assert r.file_of("t4") == str(tmp_path / shards[2])


def test_a_single_file_beside_an_index_wins_as_in_transformers(tmp_path):
    shards = {f"t{i}": np.full((10 + i,), i, np.float32) for i in range(5)}
    _write(tmp_path, shards, max_shard_size=100)
    single = {name: -t for name, t in shards.items()}
    (tmp_path / "single").mkdir()
    _write(tmp_path / "single", single)
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as r:  # transformers loads model.safetensors first
        _assert_same(r, single)
        assert r.files == [str(tmp_path / "model.safetensors")]


def test_oversized_tensor_gets_own_shard(tmp_path):
    tensors = {"a": np.ones(2, np.int8), "big": np.ones(50, np.int8), "c": np.ones(3, np.int8)}
    files = _write(tmp_path, tensors, max_shard_size="10B")
    index = json.loads((tmp_path / files[-1]).read_text())
    assert list(index["weight_map"].values()) == files[:3]
    with CheckpointReader(tmp_path) as r:
        _assert_same(r, tensors)


@pytest.mark.parametrize("target", ["bfloat16", np.float16])
def test_dtype_conversion_floats_only(tmp_path, target):
    tensors = _tensors()
    _write(tmp_path, tensors, dtype=target)
    with CheckpointReader(tmp_path) as r:
        for name, ref in tensors.items():
            if ref.dtype in (np.float32, np.float16, BF16):
                assert r.dtype(name) == np.dtype(target), name
                want = ref.astype(np.dtype(target))
                assert _bits(r.read(name)) == _bits(want), name
            else:
                assert r.dtype(name) == ref.dtype, name
                assert _bits(r.read(name)) == _bits(ref), name


def test_fetch_called_once_in_order(tmp_path):
    tensors = _tensors()
    calls: list[str] = []

    def fetch(name: str) -> np.ndarray:
        calls.append(name)
        return tensors[name]

    entries = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_checkpoint(tmp_path, entries, fetch, max_shard_size=64)
    assert calls == list(tensors)


def test_wrong_shape_fetch(tmp_path):
    entries = [("ok", (2,), np.float32), ("bad.weight", (3, 4), np.float32)]
    with pytest.raises(CheckpointError, match=r"bad\.weight") as ei:
        write_checkpoint(tmp_path, entries, lambda n: np.zeros(2 if n == "ok" else (4, 3), "f4"))
    assert "model.safetensors" in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # the .tmp file is cleaned up


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as ei:
        CheckpointReader(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(ei.value)
    with pytest.raises(CheckpointError, match="no weights found") as ei:
        CheckpointReader(tmp_path)
    assert str(tmp_path) in str(ei.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        write_checkpoint(tmp_path / "absent", [], lambda n: None)


def test_truncated_file(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(tmp_path)
    msg = str(ei.value)
    assert str(path) in msg and "h.i32" in msg and "\n" not in msg  # last tensor is cut
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b"\xff\xfe{}",
        b"[1, 2]",
        b'{"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
        b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}',
        b'{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
    ],
)
def test_garbage_header(tmp_path, header):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(tmp_path)
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    if b'"x"' in header:
        assert "'x'" in str(ei.value)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds file size") as ei:
        CheckpointReader(tmp_path)
    assert str(path) in str(ei.value)


def test_index_missing_shard(tmp_path):
    tensors = {f"t{i}": np.ones(8, np.float32) for i in range(3)}
    _write(tmp_path, tensors, max_shard_size=40)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors") as ei:
        CheckpointReader(tmp_path)
    assert "model.safetensors.index.json" in str(ei.value)


def test_index_names_tensor_shard_lacks(tmp_path):
    tensors = {f"t{i}": np.ones(8, np.float32) for i in range(3)}
    _write(tmp_path, tensors, max_shard_size=40)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"ghost\.weight") as ei:
        CheckpointReader(tmp_path)
    assert "model-00001-of-00003.safetensors" in str(ei.value)
    index_path.write_text('{"weight_map": [1]}')
    with pytest.raises(CheckpointError, match="weight_map"):
        CheckpointReader(tmp_path)


def test_duplicate_names_across_files(tmp_path):
    for stem in ("a", "b"):
        (tmp_path / stem).mkdir()
        _write(tmp_path / stem, {"w": np.ones(2, np.float32)})
        (tmp_path / stem / "model.safetensors").rename(tmp_path / f"{stem}.safetensors")
    with pytest.raises(CheckpointError, match="'w'") as ei:
        CheckpointReader(tmp_path)
    assert "a.safetensors" in str(ei.value) and "b.safetensors" in str(ei.value)


def _random_bf16(torch, shape):
    """bf16 tensor from random bits, NaN payloads included, so any float round trip shows."""
    bits = torch.randint(-(2**15), 2**15, shape, dtype=torch.int16)
    special = torch.tensor([0x7FC1, 0x7F81, -1, -32768], dtype=torch.int32)  # NaNs, -NaN, -0
    bits.view(-1)[:4] = special.to(torch.int16)
    return bits.view(torch.bfloat16)


def test_bin_refused_without_allow_pickle(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle") as ei:
        CheckpointReader(tmp_path)
    assert str(tmp_path) in str(ei.value) and "\n" not in str(ei.value)


def test_bin_loaded_with_allow_pickle(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {
        "w32": torch.randn(3, 5),
        "w16": _random_bf16(torch, (64, 8)),
        "i": torch.arange(6).reshape(2, 3),
    }
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with CheckpointReader(tmp_path, allow_pickle=True) as r:
        assert r.names() == list(sd)
        assert r.dtype("w16") == BF16 and r.dtype("w32") == np.float32
        assert np.array_equal(r.read("w16").view(np.int16), sd["w16"].view(torch.int16).numpy())
        assert _bits(r.read("w32")) == _bits(sd["w32"].numpy())
        assert np.array_equal(r.read("i"), sd["i"].numpy())


def test_sharded_bin_with_allow_pickle(tmp_path):
    torch = pytest.importorskip("torch")
    a, b = _random_bf16(torch, (5,)), torch.randn(2, 2)
    torch.save({"a": a}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": b}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="allow_pickle"):
        CheckpointReader(tmp_path)
    with CheckpointReader(tmp_path, allow_pickle=True) as r:
        assert r.file_of("b").endswith("00002-of-00002.bin")
        assert np.array_equal(r.read("a").view(np.int16), a.view(torch.int16).numpy())
        assert _bits(r.read("b")) == _bits(b.numpy())


def test_dtype_names():
    assert DTYPE_NAMES["float32"] == "F32"
    assert DTYPE_NAMES["bfloat16"] == "BF16"
    assert DTYPE_NAMES["bool"] == "BOOL"


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (123, 123),
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("10KiB", 10 * 1024),
        ("1.5gb", 1_500_000_000),
        ("64", 64),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "", "-3MB", "0"])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="size"):
        parse_size(size)
