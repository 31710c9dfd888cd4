"""Data: prepare -> ArrayRecord -> batches round trip, determinism, resume, sharding, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mpt_jax.data import (
    BatchLoader,
    ByteTokenizer,
    DataError,
    check_compatible,
    open_dataset,
    prepare_dataset,
    resolve_dataset,
    sequence_ids,
    tokenizer_from_spec,
    verify_dataset,
)

REPO = Path(__file__).resolve().parent.parent
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def make_docs(n: int, seed: int = 0, prefix: str = "") -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        prefix + " ".join(rng.choice(WORDS, size=rng.integers(3, 40))) + f" ({i}) é"
        for i in range(n)
    ]


def write_inputs(folder: Path, docs: list[str]) -> list[str]:
    """The documents spread over a text file, a JSON Lines file and a Parquet file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(docs[0])
    with open(folder / "b.jsonl", "w") as f:
        for d in docs[1:20]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"content": docs[20:]}), folder / "c.parquet")
    return [str(folder / "a.txt"), str(folder / "b.jsonl"), str(folder / "c.parquet")]


def loader(meta, **kw):
    kw = {"global_batch": 4, "process_index": 0, "process_count": 1, "seed": 3, **kw}
    return BatchLoader([(meta, 1.0)], **kw)


def take(batches, n):
    return [next(batches)["input_ids"] for _ in range(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = make_docs(400)
    inputs = write_inputs(root / "in", docs)
    out = prepare_dataset(
        inputs, root / "ds", seq_len=32, val_fraction=0.1, column="content", progress=False
    )
    return open_dataset(out), docs, inputs


def test_round_trip_text_to_batches(tmp_path):
    docs = make_docs(60)
    inputs = write_inputs(tmp_path / "in", docs)
    meta = open_dataset(
        prepare_dataset(
            inputs, tmp_path / "ds", seq_len=48, val_fraction=0.0, column="content", progress=False
        )
    )
    assert meta.dtype == np.dtype("<u2") and meta.eos_id == 256 and meta.vocab_size == 258
    rows = [b["input_ids"][0] for b in loader(meta, global_batch=1, shuffle=False, repeat=False)]
    stream = np.concatenate(rows)
    expected = np.concatenate([np.append(ByteTokenizer().encode(d), 256) for d in docs])
    assert len(rows) == len(expected) // 48 == meta.splits["train"]["rows"]
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    decoded = ByteTokenizer().decode(stream).split("\ufffd")[0]  # stop at any cut character
    pieces = [p for p in bytes(int(t) if t < 256 else 0 for t in stream).split(b"\0")]
    assert [p.decode() for p in pieces[:-1]] == docs[: len(pieces) - 1]
    assert decoded.startswith(docs[0])
    info = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert [s["name"] for s in info["sources"]] == inputs
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in info["sources"])
    assert info["splits"]["train"]["documents"] == 60


def test_prepare_is_deterministic_byte_for_byte(tmp_path):
    inputs = write_inputs(tmp_path / "in", make_docs(120))
    outs = [
        prepare_dataset(
            inputs,
            tmp_path / name,
            seq_len=32,
            val_fraction=0.2,
            column="content",
            progress=False,
            shard_bytes=512,
        )
        for name in ("one", "two")
    ]
    files = sorted(p.name for p in outs[0].iterdir())
    assert len([f for f in files if f.startswith("train-")]) > 1  # several shards
    assert files == sorted(p.name for p in outs[1].iterdir())
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_val_split_follows_the_text_not_where_the_files_are(tmp_path):
    docs = make_docs(240, seed=7)
    docs[40:80] = docs[:40]  # copies, before the unique documents that end the stream
    whole = tmp_path / "one" / "corpus.jsonl"
    whole.parent.mkdir()
    whole.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cut = tmp_path / "moved" / "elsewhere"  # the same stream, in three files under other names
    cut.mkdir(parents=True)
    for i, part in enumerate((docs[:70], docs[70:150], docs[150:])):
        (cut / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    kw = dict(seq_len=16, val_fraction=0.25, progress=False)
    outs = [
        prepare_dataset([str(whole)], tmp_path / "ds_one", **kw),
        prepare_dataset([str(cut)], tmp_path / "ds_cut", **kw),
    ]
    metas = [open_dataset(o) for o in outs]
    assert metas[0].splits == metas[1].splits
    assert metas[0].content_id == metas[1].content_id  # the same rows, however they came
    for split in ("train", "val"):
        paths = [m.shard_paths(split) for m in metas]
        assert [p.read_bytes() for p in paths[0]] == [p.read_bytes() for p in paths[1]], split
    val_stream = np.concatenate(
        [
            b["input_ids"][0]
            for b in loader(metas[0], global_batch=1, split="val", shuffle=False, repeat=False)
        ]
    )
    # the split's stream starts with a whole document; the part after the last EOS is cut
    val_docs = bytes(int(t) if t < 256 else 0 for t in val_stream).decode().split("\0")[:-1]
    assert set(val_docs) <= set(docs) and 0 < len(val_docs) < len(docs) // 2
    for d in docs[:40]:  # a document and its copy are both drawn or both not
        assert val_docs.count(d) in (0, 2), d
    assert json.loads((outs[0] / "meta.json").read_text())["val"]["draw"].startswith("sha1")


def test_trained_bpe_round_trips_and_is_deterministic(tmp_path):
    docs = make_docs(200, seed=5)
    inputs = write_inputs(tmp_path / "in", docs)
    kw = dict(
        seq_len=32,
        val_fraction=0.0,
        column="content",
        train_bpe_vocab=320,
        progress=False,
        workers=2,
    )
    a = prepare_dataset(inputs, tmp_path / "a", **kw)
    b = prepare_dataset(inputs, tmp_path / "b", **kw)
    for name in ("tokenizer.json", "train-00000.arrayrecord", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta = open_dataset(a)
    tok = tokenizer_from_spec(meta.tokenizer, meta.folder)
    assert meta.vocab_size == 320 and meta.tokenizer["eos_token"] == "<|endoftext|>"
    # data.tokenizer must be the tokenizer.json the dataset was prepared with, not just any
    check_compatible(meta, seq_len=32, vocab_size=320, tokenizer=str(a / "tokenizer.json"))
    other = tmp_path / "other.json"  # another file: here the same vocabulary, re-serialized
    other.write_text(json.dumps(json.loads((a / "tokenizer.json").read_text()), indent=2))
    with pytest.raises(DataError, match=r"prepared with a tokenizer\.json of sha256 \w{12}, "):
        check_compatible(meta, seq_len=32, vocab_size=320, tokenizer=str(other))
    rows = [r["input_ids"][0] for r in loader(meta, global_batch=1, shuffle=False, repeat=False)]
    text = tok.decode(np.concatenate(rows))
    assert text.startswith(docs[0] + "<|endoftext|>" + docs[1] + "<|endoftext|>")


def test_tokenizer_json_input_and_transformers_folder(tmp_path):
    docs = make_docs(80, seed=2)
    inputs = write_inputs(tmp_path / "in", docs)
    first = prepare_dataset(
        inputs,
        tmp_path / "bpe",
        seq_len=16,
        val_fraction=0.0,
        column="content",
        train_bpe_vocab=300,
        progress=False,
    )
    folder = tmp_path / "tok_folder"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((first / "tokenizer.json").read_bytes())
    # a file saved with truncation and padding on (a hub tokenizer's max_length) cuts nothing
    from tokenizers import Tokenizer

    cutting = Tokenizer.from_file(str(first / "tokenizer.json"))
    cutting.enable_truncation(8)
    cutting.enable_padding(length=64)
    cutting.save(str(tmp_path / "cutting.json"))
    for source in (str(first / "tokenizer.json"), str(folder), str(tmp_path / "cutting.json")):
        out = prepare_dataset(
            inputs,
            tmp_path / f"x{len(source)}",
            seq_len=16,
            val_fraction=0.0,
            column="content",
            tokenizer=source,
            progress=False,
            workers=2,
        )
        assert (out / "train-00000.arrayrecord").read_bytes() == (
            first / "train-00000.arrayrecord"
        ).read_bytes()


def test_loader_determinism_and_epoch_reshuffle(dataset):
    meta = dataset[0]
    a, b = take(loader(meta), 10), take(loader(meta), 10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = take(loader(meta, seed=4), 10)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    n = meta.splits["train"]["rows"]
    rows = np.concatenate(take(loader(meta, global_batch=1), 2 * n))
    first, second = rows[:n], rows[n:]
    as_set = lambda r: sorted(map(bytes, r.astype(np.uint16)))
    assert as_set(first) == as_set(second)  # each epoch is a permutation of all rows
    assert not np.array_equal(first, second)  # ... in a new order


@pytest.mark.parametrize("stop", [0, 1, 7, 23])
def test_exact_resume_from_saved_state(dataset, stop):
    meta = dataset[0]
    straight = take(loader(meta, segment_ids=True), stop + 6)
    first = loader(meta, segment_ids=True)
    take(first, stop)
    state = json.loads(json.dumps(first.state()))  # it is plain data
    first.close()
    resumed = loader(meta, segment_ids=True)
    resumed.restore(state)
    for expected in straight[stop:]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], expected)
    with pytest.raises(DataError, match="global_batch 4 differs"):
        loader(meta, global_batch=8).restore(state)


def test_resume_follows_a_moved_dataset_and_refuses_other_rows(dataset, tmp_path):
    import shutil

    meta, _, inputs = dataset
    first = loader(meta)
    expected = take(first, 5)[3:]
    state = json.loads(json.dumps({**first.state(), "batches": 3}))
    moved = open_dataset(shutil.copytree(meta.folder, tmp_path / "elsewhere" / "copy"))
    assert moved.content_id == meta.content_id and len(meta.content_id) == 16
    resumed = loader(moved)
    resumed.restore(state)
    np.testing.assert_array_equal(take(resumed, 2), expected)
    # the same inputs prepared with another val fraction: other rows, refused by name
    other = open_dataset(
        prepare_dataset(
            inputs,
            tmp_path / "other",
            seq_len=32,
            val_fraction=0.2,
            column="content",
            progress=False,
        )
    )
    assert other.content_id != meta.content_id
    with pytest.raises(DataError, match=r"other is not the dataset the run trained on \(.*ds\)"):
        loader(other).restore(state)
    # a state saved before content ids: the folder must be the same one, however named
    old = {k: v for k, v in state.items() if k != "contents"}
    loader(meta).restore(old)
    loader(open_dataset(os.path.relpath(meta.folder))).restore(old)
    with pytest.raises(DataError, match=r"copy is not where the run's dataset was"):
        loader(moved).restore(old)
    # a mixture listed in another order
    both = BatchLoader(
        [(meta, 1.0), (other, 1.0)], global_batch=4, process_index=0, process_count=1
    )
    swapped = BatchLoader(
        [(other, 1.0), (meta, 1.0)], global_batch=4, process_index=0, process_count=1
    )
    with pytest.raises(DataError, match=r"the datasets are in another order than the run's"):
        swapped.restore(both.state())


def test_content_id_tells_apart_fields_of_one_file_with_equal_counts(tmp_path):
    docs = make_docs(120, seed=9)
    source = tmp_path / "docs.jsonl"  # two fields of equal byte lengths: the same counts
    source.write_text("".join(json.dumps({"text": d, "flipped": d[::-1]}) + "\n" for d in docs))
    metas = [
        open_dataset(
            prepare_dataset(
                [str(source)],
                tmp_path / field,
                seq_len=16,
                val_fraction=0.0,
                text_field=field,
                progress=False,
            )
        )
        for field in ("text", "flipped")
    ]
    assert metas[0].splits["train"]["shards"] == metas[1].splits["train"]["shards"]
    assert metas[0].content_id != metas[1].content_id

    # tools/verify_data.py reads the rows: a shard swapped for one of the same size is caught
    import shutil

    sys.path.insert(0, str(REPO / "tools"))
    from verify_data import main as verify_main

    assert verify_main([str(metas[0].folder), "--no-progress"]) == 0
    shard = metas[0].shard_paths("train")[0]
    shutil.copyfile(metas[1].shard_paths("train")[0], shard)
    assert open_dataset(metas[0].folder).content_id == metas[0].content_id  # meta.json unchanged
    with pytest.raises(DataError, match=r"text: the train rows differ from those meta\.json"):
        verify_dataset(metas[0].folder)
    assert verify_main([str(metas[1].folder), str(metas[0].folder), "--no-progress"]) == 2
    # a dataset prepared before row digests were recorded
    info = json.loads((metas[1].folder / "meta.json").read_text())
    del info["splits"]["val"]["rows_sha256"]
    (metas[1].folder / "meta.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"split 'val' records no rows_sha256 \(prepared before"):
        verify_dataset(metas[1].folder)


def test_verify_checks_the_tokenizer_file_meta_names(tmp_path, capsys):
    inputs = write_inputs(tmp_path / "in", make_docs(60, seed=4))
    folder = prepare_dataset(
        inputs,
        tmp_path / "ds",
        seq_len=16,
        val_fraction=0.0,
        column="content",
        train_bpe_vocab=300,
        workers=1,  # a process pool costs seconds
        progress=False,
    )
    sys.path.insert(0, str(REPO / "tools"))
    from verify_data import main as verify_main

    verify_dataset(folder)
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    with pytest.raises(
        DataError, match=r"tokenizer\.json: sha256 \w{12}, meta\.json records \w{12} \(truncated"
    ):
        verify_dataset(folder)
    tokenizer.unlink()
    capsys.readouterr()
    assert verify_main([str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer.json: missing, meta.json names it" in err[0], err


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shares_tile_each_global_batch(dataset, processes):
    meta = dataset[0]
    single = take(loader(meta, global_batch=8), 5)
    shares = [
        take(loader(meta, global_batch=8, process_index=p, process_count=processes), 5)
        for p in range(processes)
    ]
    for step in range(5):
        joined = np.concatenate([shares[p][step] for p in range(processes)])
        np.testing.assert_array_equal(joined, single[step])
    # resume on a different process count: same global order
    one = loader(meta, global_batch=8)
    take(one, 3)
    state = one.state()
    parts = []
    for p in range(processes):
        other = loader(meta, global_batch=8, process_index=p, process_count=processes)
        other.restore(state)
        parts.append(next(other)["input_ids"])
    np.testing.assert_array_equal(np.concatenate(parts), single[3])


def test_global_jax_array_on_a_mesh(dataset):
    meta = dataset[0]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    batch = next(loader(meta, global_batch=8, sharding=sharding, segment_ids=True))
    expected = take(loader(meta, global_batch=8), 1)[0]
    assert isinstance(batch["input_ids"], jax.Array) and batch["input_ids"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), expected)
    assert batch["segment_ids"].shape == (8, 32)


def test_segment_ids_follow_eos():
    row = np.array([5, 256, 7, 8, 256, 256, 9, 1])
    np.testing.assert_array_equal(sequence_ids(row, 256), [0, 0, 1, 1, 1, 2, 3, 3])


def test_mixture_weights_and_determinism(tmp_path):
    metas = []
    for name, letter in (("a", "a"), ("b", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "d.jsonl").write_text(
            "".join(json.dumps({"text": letter * (20 + i)}) + "\n" for i in range(300))
        )
        metas.append(
            open_dataset(
                prepare_dataset(
                    [str(tmp_path / name / "d.jsonl")],
                    tmp_path / f"ds_{name}",
                    seq_len=16,
                    val_fraction=0.0,
                    progress=False,
                )
            )
        )

    def fraction_a(seed):
        mix = BatchLoader(
            [(metas[0], 0.7), (metas[1], 0.3)],
            global_batch=10,
            seed=seed,
            process_index=0,
            process_count=1,
        )
        rows = np.concatenate(take(mix, 100))
        from_a = np.isin(rows, [ord("a")]).any(axis=1)
        return from_a, rows

    from_a, rows1 = fraction_a(0)
    _, rows2 = fraction_a(0)
    # grain's integer proportions (docs/data.md): 0.7/0.3 is 233:100, exact in every 333 rows
    assert from_a[:999].sum() == 3 * 233, from_a[:999].sum()
    np.testing.assert_array_equal(rows1, rows2)


def test_builtin_corpus_prepared_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MPT_JAX_CACHE", str(tmp_path / "cache"))
    meta = resolve_dataset("builtin:python-stdlib", seq_len=512, progress=False)
    assert meta.splits["train"]["rows"] > 10_000 and meta.splits["val"]["rows"] > 50
    stamp = (meta.folder / "meta.json").stat().st_mtime_ns
    again = resolve_dataset("builtin:python-stdlib", seq_len=512, progress=False)
    assert again.folder == meta.folder and (meta.folder / "meta.json").stat().st_mtime_ns == stamp
    row = next(loader(meta, global_batch=2))["input_ids"][0]
    assert b"def " in bytes(int(t) for t in row if t < 256) or b"import" in bytes(
        int(t) for t in np.concatenate(take(loader(meta, global_batch=2), 20)).ravel() if t < 256
    )


def test_check_compatible(dataset):
    meta = dataset[0]
    check_compatible(meta, seq_len=32, vocab_size=300, tokenizer="byte")
    with pytest.raises(
        DataError, match=r"meta\.json: seq_len 32 differs from the training seq_len 64"
    ):
        check_compatible(meta, seq_len=64, vocab_size=300)
    with pytest.raises(DataError, match=r"vocabulary 258 exceeds model\.vocab_size 200"):
        check_compatible(meta, seq_len=32, vocab_size=200)
    with pytest.raises(DataError, match=r"prepared with tokenizer 'byte'"):
        check_compatible(meta, seq_len=32, vocab_size=300, tokenizer="gpt-neox/tokenizer.json")


def _bad_input(tmp_path: Path, case: str) -> tuple[list[str], dict, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    good = tmp_path / "good.txt"
    good.write_text("x" * 200)
    if case == "missing":
        return [str(tmp_path / "nope.txt")], {}, r"nope\.txt: no such file or folder"
    if case == "empty":
        (tmp_path / "e.jsonl").write_text("")
        return [str(tmp_path / "e.jsonl")], {}, r"input: no documents found in .*e\.jsonl"
    if case == "utf8_text":
        (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe no")
        return [str(good), str(tmp_path / "bad.txt")], {}, r"bad\.txt: invalid UTF-8 at byte 3"
    if case == "utf8_jsonl":
        (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
        return [str(tmp_path / "bad.jsonl")], {}, r"bad\.jsonl line 2: invalid UTF-8"
    if case == "no_field":
        (tmp_path / "f.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
        return [str(tmp_path / "f.jsonl")], {}, r"f\.jsonl line 2: no 'text' field"
    if case == "bad_json":
        (tmp_path / "j.jsonl").write_text('{"text": "a"}\n{"text": \n')
        return [str(tmp_path / "j.jsonl")], {}, r"j\.jsonl line 2: invalid JSON"
    if case == "surrogate":  # valid JSON, but no UTF-8 can encode the text
        (tmp_path / "s.jsonl").write_text('{"text": "a\\u00e9b"}\n{"text": "a\\ud800b"}\n')
        return [str(tmp_path / "s.jsonl")], {}, r"s\.jsonl line 2: field 'text' holds a lone"
    if case == "no_column":
        pq.write_table(pa.table({"body": ["a" * 100]}), tmp_path / "p.parquet")
        return [str(tmp_path / "p.parquet")], {}, r"p\.parquet: no column 'text' \(columns: body\)"
    if case == "parquet_null":
        pq.write_table(pa.table({"text": ["a" * 100, None]}), tmp_path / "n.parquet")
        return [str(tmp_path / "n.parquet")], {}, r"n\.parquet row 1: column 'text' is null"
    if case == "utf8_parquet":  # a string column whose bytes are no UTF-8
        offsets = pa.py_buffer(np.array([0, 100, 101], np.int32).tobytes())
        utf8 = pa.Array.from_buffers(
            pa.string(), 2, [None, offsets, pa.py_buffer(b"a" * 100 + b"\xff")]
        )
        pq.write_table(pa.table({"text": utf8}), tmp_path / "u.parquet")
        return (
            [str(tmp_path / "u.parquet")],
            {},
            r"u\.parquet rows 0\.\.1: column 'text' has invalid",
        )
    if case == "glob":
        return [str(tmp_path / "*.none")], {}, r"the pattern matches no file"
    if case == "too_short":
        return [str(good)], {"seq_len": 4096}, r"fewer than seq_len \(4096\) tokens"
    if case == "only_val":  # the same file, spelled relative and absolute
        rel = os.path.relpath(good)
        return [rel], {"val_inputs": [str(good)]}, r"every training input is also a validation"
    if case == "all_drawn_for_val":  # one text file is one document, drawn whole
        return [str(good)], {"val_fraction": 0.999999}, r"all 1 documents of .*good\.txt were drawn"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "utf8_text",
        "utf8_jsonl",
        "no_field",
        "bad_json",
        "surrogate",
        "no_column",
        "parquet_null",
        "utf8_parquet",
        "glob",
        "too_short",
        "only_val",
        "all_drawn_for_val",
    ],
)
def test_bad_inputs_name_the_file_and_leave_nothing(tmp_path, case):
    inputs, kw, message = _bad_input(tmp_path / "in", case)
    with pytest.raises(DataError, match=message) as info:
        prepare_dataset(
            inputs,
            tmp_path / "out",
            **{"seq_len": 16, "val_fraction": 0.0, "progress": False, **kw},
        )
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no temp folder


def test_token_ids_beyond_stored_dtype_are_refused(tmp_path):
    from mpt_jax.data.prepare import _SplitWriter

    writer = _SplitWriter(tmp_path, "train", 8, np.dtype("<u2"), 1 << 20)
    with pytest.raises(DataError, match="token id 70000 does not fit the stored uint16"):
        writer.add(np.array([1, 70000], np.uint32), 0)


def test_truncated_and_corrupted_shards(tmp_path):
    docs = make_docs(100)
    out = prepare_dataset(
        write_inputs(tmp_path / "in", docs),
        tmp_path / "ds",
        seq_len=32,
        val_fraction=0.0,
        column="content",
        progress=False,
    )
    shard = out / "train-00000.arrayrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    with pytest.raises(DataError, match=r"train-00000\.arrayrecord: \d+ bytes, meta\.json records"):
        open_dataset(out)
    corrupted = bytearray(data)
    corrupted[100:200] = bytes(b ^ 0xFF for b in corrupted[100:200])
    shard.write_bytes(bytes(corrupted))
    batches = loader(open_dataset(out), global_batch=1, shuffle=False, repeat=False)
    with pytest.raises(DataError, match=r"train-00000\.arrayrecord record \d+: unreadable"):
        list(batches)
    # the reader has stopped: asking again raises the same error instead of waiting forever
    with pytest.raises(DataError, match=r"train-00000\.arrayrecord record \d+: unreadable"):
        next(batches)
    batches.close()
    good = json.loads((out / "meta.json").read_text())
    shard_0 = "splits.train.shards[0]"
    for change, message in (
        (lambda m: m["splits"]["train"]["shards"][0].pop("bytes"), f"{shard_0}.bytes is None"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("rows"), f"{shard_0}.rows is None"),
        (lambda m: m["splits"]["train"].update(rows="many"), "splits.train.rows is 'many'"),
        (lambda m: m["splits"]["train"]["shards"][0].update(rows=-1), f"{shard_0}.rows is -1"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("file"), f"{shard_0} names no file"),
        (lambda m: m["splits"]["train"].pop("shards"), "splits.train has no list of shards"),
        (lambda m: m.update(splits=[]), "splits is a list, not a mapping"),
        (
            lambda m: m["splits"]["train"].update(rows=m["splits"]["train"]["rows"] + 1),
            "the rows of splits.train's shards do not add up to its",
        ),
        (lambda m: m.pop("vocab_size"), "KeyError: 'vocab_size'"),
    ):
        meta = json.loads(json.dumps(good))
        change(meta)
        (out / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match=rf"meta\.json: malformed \({re.escape(message)}"):
            open_dataset(out)
    (out / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        open_dataset(out)


def test_existing_output_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    (tmp_path / "a.txt").write_text("y" * 100)
    with pytest.raises(DataError, match=r"out: already exists and is not empty"):
        prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "out", seq_len=8, val_fraction=0.0)
    with pytest.raises(DataError, match=r"^workers: must be >= 1, got 0$"):
        prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "new", seq_len=8, workers=0)
    with pytest.raises(DataError, match=r"^--out: .*a\.txt is a file, not a folder$"):
        prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "a.txt" / "ds", seq_len=8)
    assert (tmp_path / "out" / "x").read_text() == "keep"
    # with overwrite, a folder that holds the inputs is not replaced: they would go with it
    for out in (tmp_path, tmp_path / "in"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / "b.txt").write_text("z" * 100)
        with pytest.raises(DataError, match=r"--out: .* holds the input .*b\.txt; choose another"):
            prepare_dataset(
                [str(tmp_path / "in")], out, seq_len=8, val_fraction=0.0, overwrite=True
            )
    assert (tmp_path / "in" / "b.txt").read_text() == "z" * 100
    # nor a folder that is no dataset (a training run, say), nor a file
    with pytest.raises(DataError, match=r"--out: \S+out holds no prepared dataset \(no meta"):
        prepare_dataset(
            [str(tmp_path / "a.txt")], tmp_path / "out", seq_len=8, val_fraction=0.0, overwrite=True
        )
    assert (tmp_path / "out" / "x").read_text() == "keep"
    with pytest.raises(DataError, match=r"--out: \S+a\.txt is a file; the dataset is written"):
        prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "a.txt", seq_len=8, val_fraction=0.0)
    # a dataset is replaced
    kw = dict(val_fraction=0.0, progress=False)
    prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "ds", seq_len=8, **kw)
    prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "ds", seq_len=4, overwrite=True, **kw)
    assert open_dataset(tmp_path / "ds").seq_len == 4


def test_prepare_command_line(tmp_path):
    inputs = write_inputs(tmp_path / "in", make_docs(50))
    (tmp_path / ".ds.tmp-0badc0de").mkdir()  # what a killed prepare leaves
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "prepare_data.py"),
            *inputs,
            "--out",
            str(tmp_path / "ds"),
            "--seq-len",
            "32",
            "--column",
            "content",
            "--val-fraction",
            "0.2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and "val:" in result.stdout
    stale = tmp_path / ".ds.tmp-0badc0de"
    assert f"note: {stale} was left by a write of {tmp_path / 'ds'} that was cut" in result.stderr
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "prepare_data.py"),
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "missing.txt: no such file or folder" in bad.stderr
    # options that would be ignored are refused, one line each, before any work
    tool = [sys.executable, str(REPO / "tools" / "prepare_data.py"), str(tmp_path / "a.txt")]
    for extra, message in (
        (["--val-fraction", "0.5", "--val-input", "b.txt"], "--val-fraction and --val-input"),
        (["--train-bpe", "300", "--tokenizer", "t.json"], "--tokenizer and --train-bpe"),
        (["--eos-token", "</s>"], "--eos-token: only with a --tokenizer file or folder"),
    ):
        clash = subprocess.run(
            [*tool, "--out", str(tmp_path / "y"), *extra], capture_output=True, text=True
        )
        assert clash.returncode == 2 and clash.stderr.startswith(f"error: {message}")
        assert clash.stderr.count("\n") == 1 and not (tmp_path / "y").exists()


def test_close_after_partial_read_of_a_finite_split_does_not_hang(dataset):
    import threading
    import time

    meta = dataset[0]
    rows = meta.splits["val"]["rows"]
    assert rows >= 3
    # the queue holds every remaining row, so the end-of-split marker finds it full
    val = BatchLoader(
        [(meta, 1.0)],
        global_batch=1,
        split="val",
        shuffle=False,
        repeat=False,
        prefetch=rows - 1,
        process_index=0,
        process_count=1,
    )
    next(val)
    time.sleep(0.5)
    closer = threading.Thread(target=val.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive()
    full = list(
        BatchLoader(
            [(meta, 1.0)],
            global_batch=1,
            split="val",
            shuffle=False,
            repeat=False,
            process_index=0,
            process_count=1,
        )
    )
    assert len(full) == rows


def test_val_inputs_inside_a_training_folder_feed_validation_only(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for d in make_docs(60):
            f.write(json.dumps({"text": d}) + "\n")
    with open(folder / "val.jsonl", "w") as f:
        for d in make_docs(15, seed=1, prefix="VALDOC "):
            f.write(json.dumps({"text": d}) + "\n")
    # the folder given absolute, the validation file relative: two spellings of one file
    val = os.path.relpath(folder / "val.jsonl")
    out = prepare_dataset(
        [str(folder.resolve())], tmp_path / "ds", seq_len=16, val_inputs=[val], progress=False
    )
    meta = open_dataset(out)
    assert meta.splits["train"]["documents"] == 60 and meta.splits["val"]["documents"] == 15
    text = {
        split: bytes(
            int(t)
            for batch in loader(meta, split=split, global_batch=1, shuffle=False, repeat=False)
            for t in batch["input_ids"].ravel()
            if t < 256
        )
        for split in ("train", "val")
    }
    assert b"VALDOC" not in text["train"] and text["val"].count(b"VALDOC") == 15
    # the folder gets the umask's permissions (mkdtemp's 0700 would lock other users out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_any_seed_shuffles(dataset):
    meta = dataset[0]
    orders = {}
    for seed in (3, 4295, 2**40, -7):
        first = np.concatenate(take(loader(meta, seed=seed), 3))
        np.testing.assert_array_equal(first, np.concatenate(take(loader(meta, seed=seed), 3)))
        orders[seed] = first.tobytes()
    assert len(set(orders.values())) == 4


def test_builtin_cache_is_per_tokenizer_content(tmp_path, monkeypatch):
    from mpt_jax.data import catalog
    from mpt_jax.data.tokenizer import train_bpe

    monkeypatch.setenv("MPT_JAX_CACHE", str(tmp_path / "cache"))
    # stands in for the 30 MB corpus, to keep BPE quick; 1000 documents, so the 2% drawn for
    # validation (by a hash of the file's path, which differs per run) always fill a row
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(1000)))
    real_prepare = catalog.prepare_dataset
    monkeypatch.setattr(
        catalog, "prepare_dataset", lambda inputs, *a, **kw: real_prepare([str(small)], *a, **kw)
    )
    tokenizers = []
    for name, docs in (("a", make_docs(50)), ("b", make_docs(50, seed=9, prefix="zq "))):
        (tmp_path / name).mkdir()
        tokenizers.append(train_bpe(iter(docs), 300 + 40 * len(name), tmp_path / name / "t.json"))
    metas = [
        resolve_dataset("builtin:python-stdlib", seq_len=16, tokenizer=str(t), progress=False)
        for t in tokenizers
    ]
    assert metas[0].folder != metas[1].folder  # both files are named t.json
    for meta, tok in zip(metas, tokenizers, strict=True):
        assert meta.tokenizer["sha256"] == tokenizer_from_spec({"path": str(tok)}).sha256
    # named by content and EOS, not path: a transformers-style folder holding the same file
    # (as train's data.tokenizer) and the file with its EOS (as eval passes it) share a corpus
    import shutil

    (tmp_path / "folder").mkdir()
    shutil.copyfile(tokenizers[0], tmp_path / "folder" / "tokenizer.json")
    same = [
        resolve_dataset("builtin:python-stdlib", seq_len=16, tokenizer=t, progress=False)
        for t in (str(tmp_path / "folder"), str(tmp_path / "folder" / "tokenizer.json"))
    ]
    assert {m.folder for m in same} == {metas[0].folder}
    # another end-of-text token (here one the folder declares) packs other rows: another corpus
    (tmp_path / "folder" / "tokenizer_config.json").write_text('{"eos_token": "a"}')
    other = resolve_dataset(
        "builtin:python-stdlib", seq_len=16, tokenizer=str(tmp_path / "folder"), progress=False
    )
    assert other.folder != metas[0].folder and other.tokenizer["eos_token"] == "a"
