"""KV-cache decoding and generate(): transformers parity, cache == full forward, sampling, CLI."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from helpers import forward, random_hf_tensors, write_hf_folder

from mpt_jax import MPTForCausalLM, from_pretrained
from mpt_jax.attention import alibi_slopes, attention
from mpt_jax.cli import main
from mpt_jax.config import ConfigError, ModelConfig
from mpt_jax.data.tokenizer import ByteTokenizer
from mpt_jax.generate import GenerationError, SamplingConfig, generate, generate_text, sample_next
from mpt_jax.loading import load_model_and_tokenizer

# untied heads: with a tied head random weights make every token predict itself
TRANSFORMERS_CONFIGS = {
    "4_heads": dict(d_model=64, n_heads=4, n_layers=2),
    "12_heads_clip_scan": dict(d_model=48, n_heads=12, n_layers=3, clip_qkv=0.5, scan_layers=True),
}
HF_SUBSET = dict(vocab_size=300, max_seq_len=48, alibi=True, learned_pos_emb=False, no_bias=True)
CACHE_CONFIGS = {
    "alibi_unrolled": dict(alibi=True, learned_pos_emb=False, no_bias=True),
    "learned_pos_biases": dict(learned_pos_emb=True, logit_scale=0.5),
    "gqa_qk_ln_clip_scan": dict(
        attn_type="grouped_query_attention",
        kv_n_heads=2,
        qk_ln=True,
        clip_qkv=0.5,
        alibi=True,
        learned_pos_emb=False,
        scan_layers=True,
    ),
    "mqa_learned_pos_scan": dict(attn_type="multiquery_attention", scan_layers=True),
}
SMALL = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=90, max_seq_len=40)


@nnx.jit
def _decode(model, ids, cache):
    return model.decode(ids, cache)


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _model(tmp_path, seed=0, **fields):
    cfg = ModelConfig(**{**SMALL, "tie_word_embeddings": False, **fields})
    folder = write_hf_folder(cfg, random_hf_tensors(cfg, seed=seed), tmp_path / f"m{seed}")
    return from_pretrained(folder, scan_layers=cfg.scan_layers), folder


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_CONFIGS))
def test_greedy_matches_transformers_generate_token_for_token(name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = TRANSFORMERS_CONFIGS[name]
    cfg = ModelConfig(**HF_SUBSET, **fields, tie_word_embeddings=False)
    folder = write_hf_folder(cfg, random_hf_tensors(cfg, seed=4), tmp_path / "src")
    # the export is what transformers loads; our model reads it back
    ours = from_pretrained(folder, scan_layers=cfg.scan_layers)
    exported = ours.save_pretrained(tmp_path / "export")
    hf = transformers.MptForCausalLM.from_pretrained(exported).eval()
    prompts = _prompts(300, [3, 9, 6])
    new = 20
    got = generate(ours, prompts, max_new_tokens=new)
    assert len({t for row in got for t in row}) > 20  # not a degenerate repeat
    # transformers on the same ragged batch, left-padded with an attention mask
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
        )
    assert ref[:, P:].tolist() == got


def test_attention_query_offset_and_kv_mask_equal_sliced_keys():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 10, 2, 8)), jnp.float32) for _ in range(2))
    slots = np.arange(10)
    # row 0: two padding slots; both rows: slots from 7 unwritten; queries at slots 4, 5, 6
    mask = jnp.asarray([(slots >= 2) & (slots < 7), slots < 7])
    kw = dict(alibi_slopes=alibi_slopes(4), impl="xla")
    out = attention(q, k, v, query_offset=4, kv_mask=mask, **kw)
    row0 = attention(q[:1], k[:1, 2:7], v[:1, 2:7], **kw)  # queries are the last 3 of 5 keys
    row1 = attention(q[1:], k[1:, :7], v[1:, :7], **kw)
    np.testing.assert_allclose(out, np.concatenate([row0, row1]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"impl 'cudnn': query_offset and kv_mask need impl 'xla'"):
        attention(q, k, v, kv_mask=mask, impl="cudnn")


@pytest.mark.parametrize("name", sorted(CACHE_CONFIGS))
def test_cached_decode_logits_equal_full_forward(name, tmp_path):
    model, _ = _model(tmp_path, **CACHE_CONFIGS[name])
    lengths = [7, 12, 4]
    rows = _prompts(90, [n + 8 for n in lengths], seed=1)
    P = max(lengths)
    pads = [P - n for n in lengths]
    cache = model.init_cache(3, 32, pad_lengths=pads)
    prompt_BP = np.zeros((3, P), np.int32)
    for b, n in enumerate(lengths):
        prompt_BP[b, pads[b] :] = rows[b][:n]
    logits_BP, cache = _decode(model, jnp.asarray(prompt_BP), cache)
    steps = [np.asarray(logits_BP)]
    fed_B8 = np.asarray([r[n:] for r, n in zip(rows, lengths, strict=True)], np.int32)
    # two tokens at once, then one at a time
    for lo, hi in [(0, 2)] + [(t, t + 1) for t in range(2, 8)]:
        logits, cache = _decode(model, jnp.asarray(fed_B8[:, lo:hi]), cache)
        steps.append(np.asarray(logits))
    assert int(cache.end) == P + 8
    cached = np.concatenate(steps, axis=1)
    # each row alone, unpadded on the left (right padding changes nothing before it)
    alone = np.zeros((3, P + 8), np.int32)
    for b, row in enumerate(rows):
        alone[b, : len(row)] = row
    full = forward(model, alone)
    for b, row in enumerate(rows):
        np.testing.assert_allclose(cached[b, pads[b] :], full[b, : len(row)], atol=1e-4, rtol=0)


def test_greedy_equals_argmax_of_full_forward_gqa_learned_positions(tmp_path):
    fields = dict(attn_type="grouped_query_attention", kv_n_heads=2, qk_ln=True)
    model, _ = _model(tmp_path, **fields)
    prompts = _prompts(90, [5, 2])
    got = generate(model, prompts, max_new_tokens=10)
    L = model.config.max_seq_len
    for prompt, row in zip(prompts, got, strict=True):
        seq = list(prompt)
        for _ in range(10):
            padded = np.zeros((1, L), np.int32)  # right padding: one compiled shape
            padded[0, : len(seq)] = seq
            seq.append(int(forward(model, padded)[0, len(seq) - 1].argmax()))
        assert seq[len(prompt) :] == row


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy(tmp_path):
    model, _ = _model(tmp_path)
    prompts = _prompts(90, [4, 6])
    kw = dict(max_new_tokens=12, temperature=1.0)
    a = generate(model, prompts, seed=1, **kw)
    assert a == generate(model, prompts, seed=1, **kw)
    assert a != generate(model, prompts, seed=2, **kw)
    greedy = generate(model, prompts, max_new_tokens=12)
    assert generate(model, prompts, max_new_tokens=12, temperature=0.7, top_k=1) == greedy


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(0)
    logits_V = jnp.asarray(rng.standard_normal(50), jnp.float32)
    n = 4000
    logits_BV = jnp.tile(logits_V[None], (n, 1))
    key = jax.random.key(0)
    top3 = set(np.argsort(-np.asarray(logits_V))[:3].tolist())
    drawn = sample_next(logits_BV, key, SamplingConfig(temperature=1.0, top_k=3))
    assert set(np.asarray(drawn).tolist()) == top3
    probs_V = jnp.log(jnp.asarray([0.05, 0.5, 0.15, 0.3]))
    probs_BV = jnp.tile(probs_V[None], (n, 1))
    for top_p, support in [(0.5, {1}), (0.75, {1, 3}), (0.85, {1, 2, 3})]:
        sampling = SamplingConfig(temperature=1.0, top_p=top_p)
        assert set(np.asarray(sample_next(probs_BV, key, sampling)).tolist()) == support
    # tokens tied at the cut stay only as far as the mass needs, as transformers' warper keeps
    # them (by position in the sorted order), and a boundary reached exactly keeps no more
    for probs, top_p, kept, surely in [
        ([0.5, 0.1, 0.1, 0.1, 0.1, 0.1], 0.55, 2, {0}),
        ([0.25] * 4, 0.5, 2, set()),
        ([0.5, 0.3, 0.15, 0.05], 0.8, 2, {0, 1}),
    ]:
        tied_BV = jnp.tile(jnp.log(jnp.asarray(probs))[None], (n, 1))
        drawn = set(
            np.asarray(
                sample_next(tied_BV, key, SamplingConfig(temperature=1.0, top_p=top_p))
            ).tolist()
        )
        assert len(drawn) == kept and surely <= drawn, (probs, top_p, drawn)
    torch = pytest.importorskip("torch")
    warper = pytest.importorskip("transformers").TopPLogitsWarper
    for top_p in (0.3, 0.6, 0.9):
        theirs = warper(top_p)(None, torch.tensor(np.asarray(logits_V))[None])[0]
        support = set(np.flatnonzero(np.isfinite(theirs.numpy())).tolist())
        sampling = SamplingConfig(temperature=1.0, top_p=top_p)
        assert set(np.asarray(sample_next(logits_BV, key, sampling)).tolist()) == support
    # both together: top-k first, then top-p renormalized over the k survivors
    both = SamplingConfig(temperature=1.0, top_k=2, top_p=0.6)
    assert set(np.asarray(sample_next(probs_BV, key, both)).tolist()) == {1}
    assert (
        np.asarray(sample_next(logits_BV[:2], key, SamplingConfig())).tolist()
        == [int(np.argmax(logits_V))] * 2
    )


def test_rows_stop_at_eos_independently(tmp_path):
    model, _ = _model(tmp_path)
    prompts = _prompts(90, [5, 8])
    free = generate(model, prompts, max_new_tokens=12)
    eos = free[0][3]
    cut = generate(model, prompts, max_new_tokens=12, eos_id=eos)
    for full, row in zip(free, cut, strict=True):
        expected = full[: full.index(eos)] if eos in full else full
        assert row == expected
    assert len(cut[0]) <= 3


def test_alibi_extrapolates_only_when_asked_learned_positions_never(tmp_path):
    alibi, _ = _model(tmp_path, alibi=True, learned_pos_emb=False)
    prompt = _prompts(90, [30])
    with pytest.raises(GenerationError, match=r"exceeds the context of 40 tokens"):
        generate(alibi, prompt, max_new_tokens=20)
    assert len(generate(alibi, prompt, max_new_tokens=20, max_seq_len=64)[0]) == 20
    learned, _ = _model(tmp_path, seed=1)
    with pytest.raises(GenerationError, match=r"max_seq_len: 64 exceeds .* learned position"):
        generate(learned, prompt, max_new_tokens=20, max_seq_len=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[[1, 2], []]), r"prompts\[1\]: is empty"),
        (dict(prompts=[[1] * 39]), r"prompt of 39 tokens \+ max_new_tokens 4 exceeds"),
        (dict(prompts=[[1, 90]]), r"prompts\[0\]: token ids must be in \[0, 90\)"),
        (dict(prompts=[]), r"prompts: expected a non-empty list"),
        (dict(max_new_tokens=0), r"max_new_tokens: must be >= 1"),
        (dict(temperature=-1.0), r"temperature: must be >= 0"),
        (dict(top_k=0), r"top_k: must be >= 1"),
        (dict(top_p=0.0), r"top_p: must be in \(0, 1\]"),
    ],
)
def test_bad_requests_give_one_clear_error(kwargs, message):
    # requests are checked before the model computes anything
    model = nnx.eval_shape(lambda: MPTForCausalLM(ModelConfig(**SMALL), rngs=nnx.Rngs(0)))
    args = {"prompts": [[1, 2]], "max_new_tokens": 4, **kwargs}
    prompts = args.pop("prompts")
    with pytest.raises(GenerationError, match=message) as info:
        generate(model, prompts, **args)
    assert "\n" not in str(info.value)


def _run_folder(tmp_path, model: MPTForCausalLM) -> str:
    """A run folder holding `model` as the step-3 checkpoint, trained on byte tokens."""
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    with ocp.StandardCheckpointer() as saver:
        saver.save((step_dir / "params").absolute(), nnx.state(model))
    raw = {
        "model": model.config.to_dict(),
        "data": {"tokenizer": "byte"},
        "train": {"precision": "fp32"},
    }
    (step_dir / "meta").mkdir()
    (step_dir / "meta" / "metadata").write_text(json.dumps({"config": raw}))
    return str(tmp_path / "run")


def test_command_line_on_run_and_hf_folders(tmp_path, capsys):
    model, folder = _model(tmp_path, vocab_size=258)
    run = _run_folder(tmp_path, model)
    loaded, tok = load_model_and_tokenizer(run)
    assert isinstance(tok, ByteTokenizer) and loaded.config == model.config
    expected = generate_text(model, ByteTokenizer(), ["ab", "xyz"], max_new_tokens=6)
    args = ["--prompt", "ab", "--prompt", "xyz", "--max-new-tokens", "6"]
    assert main(["generate", run, *args]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"=== completion {i} ===\n{t}\n" for i, t in enumerate(expected, 1))
    sampled = ["generate", str(folder), "--tokenizer", "byte", "--prompt", "ab"]
    sampled += ["--max-new-tokens", "9", "--temperature", "0.8", "--top-p", "0.9", "--seed", "4"]
    assert main(sampled) == 0
    kw = dict(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=4)
    assert capsys.readouterr().out == generate_text(model, ByteTokenizer(), ["ab"], **kw)[0] + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], r"prompt 1 \(''\): encodes to no tokens"),
        (["--prompt", "x", "--max-new-tokens", "40"], r"exceeds the context of 40 tokens"),
        (["--prompt", "x", "--top-p", "2"], r"top_p: must be in \(0, 1\]"),
        (["--prompt", "x", "--step", "9"], r"no checkpoint at step 9"),
        (["--prompt", "x", "--tokenizer", "nope.json"], r"nope\.json: tokenizer file not found"),
        # the run's byte tokenizer, or one named: as tools/prepare_data.py refuses it
        (["--prompt", "x", "--eos-token", "XYZ"], r"--eos-token: only with a --tokenizer file"),
        (["--prompt", "x", "--eos-token", "XYZ", "--tokenizer", "byte"], r"the byte tokenizer"),
    ],
)
def test_command_line_bad_input_is_one_line(tmp_path, capsys, args, message):
    cfg = ModelConfig(**{**SMALL, "vocab_size": 258})
    run = _run_folder(tmp_path, MPTForCausalLM(cfg, rngs=nnx.Rngs(0)))
    assert main(["generate", run, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_damaged_checkpoint_exits_1_as_for_train_and_eval(tmp_path, capsys):
    cfg = ModelConfig(**{**SMALL, "vocab_size": 258})
    run = _run_folder(tmp_path, MPTForCausalLM(cfg, rngs=nnx.Rngs(0)))
    data = max(Path(run).rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert main(["generate", run, "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot restore the parameters" in err


def test_an_unreadable_step_names_it_and_the_earlier_steps_for_generate_eval_and_export(
    tmp_path, capsys
):
    import importlib.util
    import shutil

    cfg = ModelConfig(**{**SMALL, "vocab_size": 258})
    run = Path(_run_folder(tmp_path, MPTForCausalLM(cfg, rngs=nnx.Rngs(0))))
    latest = shutil.copytree(run / "checkpoints" / "3", run / "checkpoints" / "5")
    data = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    hint = "step 5 is unreadable: try an earlier one, --step 3 (earlier steps: 3)"
    assert main(["generate", str(run), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.splitlines()
    # the cause, not Orbax's wrapper whose first line ends in "TensorStore({"
    assert len(err) == 1 and err[0].endswith(hint) and "TensorStore" not in err[0], err
    (tmp_path / "lm.jsonl").write_text(json.dumps({"context": "a", "continuation": "b"}) + "\n")
    task = {"label": "lm", "dataset_uri": "lm.jsonl", "num_fewshot": [0]}
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(json.dumps({"icl_tasks": [{**task, "icl_task_type": "language_modeling"}]}))
    assert main(["eval", str(run), "--tasks", str(tasks), "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith(hint), err
    spec = importlib.util.spec_from_file_location(
        "convert_hf", Path(__file__).parents[1] / "tools" / "convert_hf.py"
    )
    convert_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_hf)
    assert convert_hf.main([str(run), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith(hint), err
    earlier = ["generate", str(run), "--prompt", "x", "--max-new-tokens", "4", "--step", "3"]
    assert main(earlier) == 0


def test_hf_folder_without_tokenizer_is_named(tmp_path, capsys):
    _, folder = _model(tmp_path)
    assert main(["generate", str(folder), "--prompt", "x"]) == 2
    assert "no tokenizer.json and not part of a run folder" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope: no such model folder" in capsys.readouterr().err


def _im_end_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer.json whose only end-of-text token is <|im_end|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["a", "b", "c", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_a_run_generates_with_the_eos_its_data_was_prepared_with(tmp_path):
    from mpt_jax.data import DataError, prepare_dataset
    from mpt_jax.data.tokenizer import load_tokenizer
    from mpt_jax.loading import load_tokenizer_for

    path = _im_end_tokenizer(tmp_path / "tok")
    with pytest.raises(DataError, match="no end-of-text token found"):
        load_tokenizer(str(path))  # nothing says which token ends a text
    (tmp_path / "docs.txt").write_text(" ".join(["a b c"] * 40))
    data = prepare_dataset(
        [str(tmp_path / "docs.txt")],
        tmp_path / "ds",
        seq_len=8,
        val_fraction=0.0,
        tokenizer=str(path),
        eos_token="<|im_end|>",
        progress=False,
    )
    cfg = ModelConfig(**{**SMALL, "vocab_size": 8})
    run = _run_folder(tmp_path, MPTForCausalLM(cfg, rngs=nnx.Rngs(0)))
    meta_file = Path(run) / "checkpoints" / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["config"]["data"] = {"path": str(data), "tokenizer": str(path)}
    meta_file.write_text(json.dumps(meta))
    # the dataset's meta.json records the EOS the model was trained with
    assert load_tokenizer_for(run).eos_token == "<|im_end|>"
    # where the dataset is not at hand, --eos-token names it
    (data / "meta.json").unlink()
    assert load_tokenizer_for(run, eos_token="<|im_end|>").eos_id == 3
    # a transformers folder's declared EOS is read wherever the folder is used
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    assert load_tokenizer(str(tmp_path / "tok")).eos_token == "<|im_end|>"
    with pytest.raises(DataError, match=r"has no token '</s>', the end-of-text token named"):
        load_tokenizer(str(tmp_path / "tok"), "</s>")
    # a damaged declaration is named, not skipped for a guessed EOS
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(DataError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(str(tmp_path / "tok"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    # a step folder with another step asked for is refused, not silently used
    with pytest.raises(ConfigError, match=r"a step folder of step 3, not of step 5"):
        from_pretrained(Path(run) / "checkpoints" / "3", step=5)
