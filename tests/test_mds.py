"""MDS inputs to prepare_dataset, written by MosaicML streaming's own MDSWriter."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from mds_writer import mds_writer

from mpt_jax.data import ByteTokenizer, DataError, open_dataset, prepare_dataset

REPO = Path(__file__).resolve().parent.parent
SEQ = 64
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def make_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 60))) + f" {i} é" for i in range(n)]


def concat_tokens(docs: list[str], seq_len: int) -> list[np.ndarray]:
    """llm-foundry's ConcatTokensDataset with --eos_text: each document then EOS, cut into
    samples of seq_len, the incomplete tail dropped."""
    tok = ByteTokenizer()
    stream = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])
    n = stream.size // seq_len
    return list(stream[: n * seq_len].reshape(n, seq_len).astype(np.int32))


def write_mds(folder: Path, column: dict, values: list, **kw) -> Path:
    ((name, encoding),) = column.items()
    with mds_writer()(out=str(folder), columns={name: encoding, "id": "int"}, **kw) as out:
        for i, value in enumerate(values):
            out.write({name: value, "id": i})
    return folder


def rows(folder: Path, split: str) -> np.ndarray:
    meta = open_dataset(folder)
    out = []
    for shard in meta.splits[split]["shards"]:
        reader = ArrayRecordReader(str(folder / shard["file"]))
        out += [np.frombuffer(r, meta.dtype) for r in reader.read_all()]
        reader.close()
    return np.stack(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as JSON Lines and as llm-foundry's token and text MDS conversions."""
    root = tmp_path_factory.mktemp("mds")
    docs = {"train": make_docs(150, 0), "val": make_docs(40, 1)}
    for split, split_docs in docs.items():
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in split_docs)
        samples = concat_tokens(split_docs, SEQ)
        # the current converter's ndarray:int32 column, compressed, in several shards
        write_mds(
            root / "tokens" / split,
            {"tokens": "ndarray:int32"},
            samples,
            compression="zstd",
            hashes=["sha1", "xxh64"],
            size_limit=4096,
        )
        # older llm-foundry: the ids' int64 bytes
        write_mds(
            root / "bytes" / split,
            {"tokens": "bytes"},
            [s.astype(np.int64).tobytes() for s in samples],
        )
        write_mds(root / "text" / split, {"text": "str"}, split_docs, compression="gz")
    return root


def test_token_mds_rows_are_the_samples_and_equal_packing_the_text(corpus, tmp_path):
    from_text = prepare_dataset(
        [str(corpus / "train.jsonl")],
        tmp_path / "from-text",
        seq_len=SEQ,
        val_inputs=[str(corpus / "val.jsonl")],
        val_fraction=0.0,
        progress=False,
    )
    text_meta = open_dataset(from_text)
    shards = json.loads((corpus / "tokens" / "train" / "index.json").read_text())["shards"]
    assert len(shards) > 2 and all(s["zip_data"] for s in shards)
    for kind in ("tokens", "bytes"):
        out = prepare_dataset(
            [str(corpus / kind / "train")],
            tmp_path / kind,
            seq_len=SEQ,
            val_inputs=[str(corpus / kind / "val")],
            val_fraction=0.0,
            progress=False,
        )
        meta = json.loads((out / "meta.json").read_text())
        assert meta["mds_tokens"]["column"] == "tokens"
        assert meta["packing"].startswith("mds tokens")
        for split in ("train", "val"):
            expected = concat_tokens(make_docs(*{"train": (150, 0), "val": (40, 1)}[split]), SEQ)
            np.testing.assert_array_equal(rows(out, split), np.stack(expected))
            # llm-foundry's conversion packs as prepare_dataset does: the same rows either way
            assert meta["splits"][split]["rows_sha256"] == text_meta.splits[split]["rows_sha256"]
            assert meta["splits"][split]["documents"] == len(expected)


def test_token_mds_cut_to_a_shorter_seq_len_and_drawn_for_validation(corpus, tmp_path):
    kw = dict(seq_len=48, val_fraction=0.3, progress=False)
    out = prepare_dataset([str(corpus / "tokens" / "train")], tmp_path / "ds", **kw)
    meta = json.loads((out / "meta.json").read_text())
    samples = concat_tokens(make_docs(150, 0), SEQ)
    train, val = rows(out, "train"), rows(out, "val")
    assert len(train) + len(val) == len(samples) and 0 < len(val) < len(samples)
    got = {r.tobytes() for r in np.concatenate([train, val])}
    assert got == {s[:48].astype(np.uint16).tobytes() for s in samples}
    assert meta["splits"]["train"]["dropped_tail_tokens"] == 16 * len(train)
    assert meta["val"]["draw"].startswith("sha1 of the sample's token ids")
    again = prepare_dataset([str(corpus / "bytes" / "train")], tmp_path / "again", **kw)
    # the draw follows the token ids, not the column's encoding
    assert open_dataset(again).splits == open_dataset(out).splits


def test_text_mds_equals_the_same_text_as_json_lines(corpus, tmp_path):
    kw = dict(seq_len=SEQ, val_fraction=0.1, progress=False)
    a = prepare_dataset([str(corpus / "text" / "train")], tmp_path / "a", **kw)
    b = prepare_dataset([str(corpus / "train.jsonl")], tmp_path / "b", **kw)
    meta_a, meta_b = open_dataset(a), open_dataset(b)
    for split in ("train", "val"):
        assert meta_a.splits[split]["rows_sha256"] == meta_b.splits[split]["rows_sha256"]
        assert meta_a.splits[split]["documents"] == meta_b.splits[split]["documents"]
    source = json.loads((a / "meta.json").read_text())["sources"][0]
    folder = corpus / "text" / "train"
    files = [folder / "index.json", *sorted(folder.glob("shard.*"))]
    assert source["bytes"] == sum(p.stat().st_size for p in files)


@pytest.mark.parametrize("inputs", [("text/train", "train.jsonl"), ("tokens/train", "tokens/val")])
def test_the_progress_bar_ends_at_the_inputs_bytes(corpus, tmp_path, capsys, inputs):
    """What is read (text, ids) is fewer bytes than an input holds: the bar still ends whole."""
    paths = [str(corpus / name) for name in inputs]
    prepare_dataset(paths, tmp_path / "ds", seq_len=SEQ, val_fraction=0.1, progress=True)
    shown = [int(p) for p in re.findall(r"(\d+)%\|", capsys.readouterr().err)]
    assert shown[-1] == 100 and shown == sorted(shown)


@pytest.mark.parametrize("compression", [None, "bz2", "br:5", "snappy", "zstd:7"])
def test_every_compression_and_a_column_with_its_dtype_in_each_sample(tmp_path, compression):
    samples = concat_tokens(make_docs(40, 2), SEQ)
    # a bare ndarray column: each sample carries its dtype and shape; int16 and int64 mixed
    values = [s.astype(np.int16 if i % 2 else np.int64) for i, s in enumerate(samples)]
    folder = write_mds(
        tmp_path / "in", {"tokens": "ndarray"}, values, compression=compression, size_limit=2048
    )
    out = prepare_dataset(
        [str(folder)], tmp_path / "ds", seq_len=SEQ, val_fraction=0.0, progress=False
    )
    np.testing.assert_array_equal(rows(out, "train"), np.stack(samples))


def test_text_is_read_before_tokens_as_llm_foundry_does(tmp_path):
    docs = make_docs(60, 3)
    with mds_writer()(out=str(tmp_path / "in"), columns={"text": "str", "tokens": "bytes"}) as w:
        for d in docs:  # token ids that would not even fit the vocabulary
            w.write({"text": d, "tokens": np.full(SEQ, 9999, np.int64).tobytes()})
    a = prepare_dataset(
        [str(tmp_path / "in")], tmp_path / "a", seq_len=SEQ, val_fraction=0.0, progress=False
    )
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    b = prepare_dataset(
        [str(tmp_path / "docs.jsonl")],
        tmp_path / "b",
        seq_len=SEQ,
        val_fraction=0.0,
        progress=False,
    )
    assert (
        open_dataset(a).splits["train"]["rows_sha256"]
        == open_dataset(b).splits["train"]["rows_sha256"]
    )


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "case",
    [
        "corrupt",
        "truncated",
        "index",
        "short",
        "vocab",
        "mixed",
        "nested",
        "column",
        "int-column",
        "dtype",
        "dtype-unused",
        "columns-differ",
        "shard-file",
        "out-in-merged",
        "nested-val",
    ],
)
def test_bad_mds_inputs_name_the_fault_and_leave_nothing(corpus, tmp_path, case):
    tokens = corpus / "tokens" / "train"
    inputs, kw = [str(tokens)], dict(seq_len=SEQ, val_fraction=0.2, progress=False)
    out = None
    if case == "corrupt":
        folder = _copy(tokens, tmp_path / "in")
        shard = folder / "shard.00001.mds.zstd"
        data = bytearray(shard.read_bytes())
        data[40] ^= 0xFF
        shard.write_bytes(bytes(data))
        inputs, match = (
            [str(folder)],
            r"in/shard\.00001\.mds\.zstd: sha1 \w+ differs from the index",
        )
    elif case == "truncated":
        folder = _copy(corpus / "bytes" / "train", tmp_path / "in")
        shard = folder / "shard.00000.mds"
        shard.write_bytes(shard.read_bytes()[:-7])
        inputs, match = [str(folder)], r"in/shard\.00000\.mds: \d+ bytes, the index says \d+"
    elif case == "index":
        folder = _copy(tokens, tmp_path / "in")
        index = json.loads((folder / "index.json").read_text())
        del index["shards"][1]["raw_data"]
        (folder / "index.json").write_text(json.dumps(index))
        inputs = [str(folder)]
        match = r"in/index\.json shard 1: malformed \(KeyError: 'raw_data'\)"
    elif case == "short":
        kw["seq_len"] = SEQ + 1
        match = r"train sample 0: 64 tokens, fewer than seq_len 65"
    elif case == "vocab":
        folder = write_mds(
            tmp_path / "in", {"tokens": "ndarray:int32"}, [np.arange(SEQ, dtype=np.int32) * 9]
        )
        inputs = [str(folder)]
        match = r"in sample 0: token id 567 is beyond the vocabulary \(258\) of --tokenizer byte"
    elif case == "mixed":
        inputs.append(str(corpus / "train.jsonl"))
        match = r"holds token ids \(column tokens\) and .*train\.jsonl holds text"
    elif case == "nested":
        inputs, match = (
            [str(corpus / "tokens")],
            r"tokens: holds the MDS dataset .*tokens/\w+; give",
        )
    elif case == "column":
        kw["column"] = "content"
        match = r"train: no column 'content' \(columns: id \(int\), tokens \(ndarray:int32\)\)"
    elif case == "int-column":
        kw["column"] = "id"
        match = r"train: column 'id' is int; text is a str column"
    elif case == "dtype":
        inputs = [str(corpus / "bytes" / "train")]
        kw["token_encoding_type"] = "float32"
        match = r"token_encoding_type: 'float32' is not one of int8"
    elif case == "dtype-unused":
        kw["token_encoding_type"] = "int32"  # the input's column is ndarray:int32, not bytes
        match = r"token_encoding_type: int32 is for an MDS bytes column"
    elif case == "columns-differ":
        folder = _copy(tokens, tmp_path / "in")
        index = json.loads((folder / "index.json").read_text())
        index["shards"][1]["column_encodings"] = ["int", "bytes"]
        (folder / "index.json").write_text(json.dumps(index))
        inputs = [str(folder)]
        match = r"^\S+in/index\.json shard 1: columns id \(int\), tokens \(bytes\) differ"
    elif case == "shard-file":
        inputs = [str(corpus / "bytes" / "train" / "shard.00000.mds")]
        match = r"shard\.00000\.mds: holds the MDS dataset \S+/bytes/train; give MDS folders"
    elif case == "out-in-merged":
        # a merged index (streaming's merge_index) lists shards in its subfolders
        merged = tmp_path / "merged"
        _copy(tokens, merged / "part")
        index = json.loads((merged / "part" / "index.json").read_text())
        for shard in index["shards"]:
            for entry in (shard["raw_data"], shard["zip_data"]):
                entry["basename"] = "part/" + entry["basename"]
        (merged / "index.json").write_text(json.dumps(index))
        (merged / "part" / "index.json").unlink()
        inputs, out = [str(merged)], merged / "part"
        kw["overwrite"] = True
        match = r"--out: \S+/merged/part holds the input \S+/merged/part/shard\.00000\.mds\.zstd"
    else:
        _copy(tokens, tmp_path / "whole")
        _copy(tokens, tmp_path / "whole" / "val")
        inputs, kw["val_fraction"] = [str(tmp_path / "whole")], 0.0
        kw["val_inputs"] = [str(tmp_path / "whole" / "val")]
        match = r"the MDS folder \S+whole/val is inside the MDS folder \S+whole, whose index"
    out = out if case == "out-in-merged" else tmp_path / "out"
    with pytest.raises(DataError, match=match) as err:
        prepare_dataset(inputs, out, **kw)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    if case == "out-in-merged":  # the input is whole
        assert len(list((tmp_path / "merged" / "part").glob("shard.*"))) == len(index["shards"])
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_prepare_command_line_reads_mds(corpus, tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--no-progress"]
    ok = subprocess.run(
        [
            *tool,
            str(corpus / "bytes" / "train" / "index.json"),
            "--out",
            str(tmp_path / "ds"),
            "--seq-len",
            str(SEQ),
            "--val-input",
            str(corpus / "bytes" / "val"),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    samples = len(concat_tokens(make_docs(150, 0), SEQ))
    assert f"train: {samples} rows, {samples * SEQ:,} tokens, {samples} documents" in ok.stdout
    bad = subprocess.run(
        [
            *tool,
            str(corpus / "bytes" / "train"),
            "--out",
            str(tmp_path / "bad"),
            "--seq-len",
            str(SEQ + 1),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "train sample 0: 64 tokens, fewer than seq_len 65" in bad.stderr
