"""lm-eval model "mpt_jax" on small local tasks: results agree with our own forward pass."""

import glob
import json
import math
import os
import runpy
import sys
import tempfile
from pathlib import Path

# local task data only; `datasets` reads these when first imported (by lm-eval, lazily)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault(
    "HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "mpt_jax_test_hf_datasets")
)

import numpy as np
import pytest
from helpers import forward, random_hf_tensors, write_hf_folder

from mpt_jax import from_pretrained
from mpt_jax.config import ModelConfig
from mpt_jax.data.tokenizer import ByteTokenizer
from mpt_jax.generate import generate_text

lm_eval = pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH = 32  # below max_seq_len, so the long document spans several windows
EOS = ByteTokenizer.eos_id
CHOICES = [
    {"question": f"Q{i}: {i} plus one is", "choices": ["a", "two", str(i + 1)], "answer": i % 3}
    for i in range(6)
]
DOCS = [{"text": "short doc."}, {"text": "a longer document, " * 6}]
PROMPTS = [{"prompt": "abc", "target": "x"}, {"prompt": "hello world", "target": "y"}]


def _task(folder: Path, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
    head += f"    test: {data}\ntest_split: test\n"
    (folder / f"{name}.yaml").write_text(head + body)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    cfg = ModelConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        vocab_size=258,
        max_seq_len=48,
        alibi=True,
        learned_pos_emb=False,
        no_bias=True,
        tie_word_embeddings=False,
    )
    model_dir = write_hf_folder(cfg, random_hf_tensors(cfg, seed=3), root / "model")
    tasks = root / "tasks"
    tasks.mkdir()
    _task(
        tasks,
        "mptjax_choice",
        CHOICES,
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
    )
    _task(
        tasks,
        "mptjax_rolling",
        DOCS,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
        "    higher_is_better: false\n",
    )
    _task(
        tasks,
        "mptjax_gen",
        PROMPTS,
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n",
    )
    return from_pretrained(model_dir), model_dir, tasks


def _logprobs(model, rows: list[list[int]]) -> list[np.ndarray]:
    """Log-probabilities of each row's next tokens, from one forward pass right-padded to 48."""
    ids = np.zeros((len(rows), model.config.max_seq_len), np.int32)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
    logits = forward(model, ids).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return [logp[b, np.arange(len(r) - 1), r[1:]] for b, r in enumerate(rows)]


def _choice_loglikelihoods(model) -> list[list[float]]:
    tok = ByteTokenizer()
    rows, spans = [], []
    for doc in CHOICES:
        for choice in doc["choices"]:
            # lm-eval joins context and choice with its default target_delimiter " "
            context, continuation = tok.encode(doc["question"]), tok.encode(" " + choice)
            rows.append([*context.tolist(), *continuation.tolist()])
            spans.append(len(continuation))
    flat = [float(lp[-n:].sum()) for lp, n in zip(_logprobs(model, rows), spans, strict=True)]
    return [flat[3 * i : 3 * i + 3] for i in range(len(CHOICES))]


def _accuracy(loglikelihoods: list[list[float]]) -> float:
    hits = [np.argmax(lls) == d["answer"] for lls, d in zip(loglikelihoods, CHOICES, strict=True)]
    return float(np.mean(hits))


def _rolling_loglikelihood(model, text: str) -> float:
    """lm-eval's rule: tokens in chunks of MAX_LENGTH, each seen with MAX_LENGTH inputs."""
    tokens = ByteTokenizer().encode(text).tolist()
    seq = [EOS, *tokens]  # seq[j] is the input that predicts tokens[j]
    rows, counts = [], []
    for start in range(0, len(tokens), MAX_LENGTH):
        end = min(start + MAX_LENGTH, len(tokens))
        rows.append(seq[max(0, end - MAX_LENGTH) : end + 1])
        counts.append(end - start)
    return sum(float(lp[-n:].sum()) for lp, n in zip(_logprobs(model, rows), counts, strict=True))


def test_simple_evaluate_agrees_with_direct_computation(setup):
    from lm_eval.tasks import TaskManager

    import mpt_jax.lm_eval  # noqa: F401  registers "mpt_jax"

    model, model_dir, tasks = setup
    results = lm_eval.simple_evaluate(
        model="mpt_jax",
        model_args=f"path={model_dir},tokenizer=byte,max_length={MAX_LENGTH}",
        tasks=["mptjax_choice", "mptjax_rolling", "mptjax_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=4,
        log_samples=True,
    )
    samples = {
        name: sorted(rows, key=lambda s: s["doc_id"]) for name, rows in results["samples"].items()
    }

    expected = _choice_loglikelihoods(model)
    for sample, lls in zip(samples["mptjax_choice"], expected, strict=True):
        got = [ll for ll, _ in sample["filtered_resps"]]
        np.testing.assert_allclose(got, lls, atol=1e-4, rtol=0)
    assert results["results"]["mptjax_choice"]["acc,none"] == pytest.approx(_accuracy(expected))

    expected_ll = [_rolling_loglikelihood(model, d["text"]) for d in DOCS]
    assert len(DOCS[1]["text"]) > 3 * MAX_LENGTH  # several windows
    got_ll = [s["filtered_resps"][0] for s in samples["mptjax_rolling"]]
    np.testing.assert_allclose(got_ll, expected_ll, atol=1e-3, rtol=0)
    n_bytes = sum(len(d["text"].encode()) for d in DOCS)
    bits = -sum(expected_ll) / n_bytes / math.log(2)
    assert results["results"]["mptjax_rolling"]["bits_per_byte,none"] == pytest.approx(bits)

    prompts = [d["prompt"] for d in PROMPTS]
    direct = generate_text(model, ByteTokenizer(), prompts, max_new_tokens=8)
    got = [s["filtered_resps"][0] for s in samples["mptjax_gen"]]
    assert got == [text.split("\n")[0] for text in direct]


def test_lm_eval_command_line_runs_the_model(setup, tmp_path, monkeypatch, capsys):
    model, model_dir, tasks = setup
    out = tmp_path / "out"
    argv = ["python -m mpt_jax.lm_eval", "--model", "mpt_jax"]
    argv += ["--model_args", f"path={model_dir},tokenizer=byte", "--tasks", "mptjax_choice"]
    argv += ["--include_path", str(tasks), "--batch_size", "8", "--output_path", str(out)]
    # `python -m mpt_jax.lm_eval` in this process: the same entry point, without paying for a
    # second start of lm-eval, torch and jax
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_module("mpt_jax.lm_eval", run_name="__main__", alter_sys=False)
    assert done.value.code == 0
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    acc = json.loads(Path(path).read_text())["results"]["mptjax_choice"]["acc,none"]
    expected = _choice_loglikelihoods(model)
    assert acc == pytest.approx(_accuracy(expected))
    # bad input: one line (after lm-eval's log lines) and exit 2, no traceback
    capsys.readouterr()
    bad = list(argv)
    bad[bad.index("--model_args") + 1] = f"path={tmp_path / 'nope'}"
    monkeypatch.setattr(sys, "argv", bad)
    with pytest.raises(SystemExit) as done:
        runpy.run_module("mpt_jax.lm_eval", run_name="__main__", alter_sys=False)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert done.value.code == 2 and last == f"error: {tmp_path / 'nope'}: no such model folder"
    assert "Traceback" not in err


def test_entry_point_declared_for_lm_eval_plugin_discovery():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "mpt_jax"]
    from mpt_jax.lm_eval import MPTJaxLM

    assert ep.load() is MPTJaxLM


def test_sampling_without_a_temperature_samples_at_one(setup):
    from lm_eval.api.instance import Instance

    from mpt_jax.generate import generate
    from mpt_jax.lm_eval import MPTJaxLM

    model, model_dir, _ = setup
    lm = MPTJaxLM(path=str(model_dir), tokenizer="byte", batch_size=2, max_length=32, seed=5)
    prompts = [d["prompt"] for d in PROMPTS]
    kwargs = {"until": ["never"], "do_sample": True, "max_gen_toks": 8}
    requests = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
    got = lm.generate_until(requests)
    tok = ByteTokenizer()
    ids = [tok.encode(p).tolist() for p in prompts]
    # lm-eval's HF and vLLM models sample at temperature 1.0 when the task names none
    seed = MPTJaxLM(path=str(model_dir), tokenizer="byte", seed=5)._next_batch_seed()
    sampled = generate(model, ids, max_new_tokens=8, temperature=1.0, seed=seed, eos_id=EOS)
    greedy = generate(model, ids, max_new_tokens=8, temperature=0.0, eos_id=EOS)
    assert got == [tok.decode(r) for r in sampled] != [tok.decode(r) for r in greedy]
    # each batch draws afresh: repeats of one request (lm-eval's `repeats`) are distinct
    # samples, and the same seed gives them again
    repeats = [Instance("generate_until", {}, (prompts[0], dict(kwargs)), i) for i in range(8)]
    drawn = lm.generate_until(repeats)
    assert len(set(drawn)) > 2  # one seed for every batch gave at most batch_size (2)
    again = MPTJaxLM(path=str(model_dir), tokenizer="byte", batch_size=2, max_length=32, seed=5)
    again.generate_until(requests)
    assert again.generate_until(repeats) == drawn


def test_default_max_gen_toks_leaves_a_small_model_room_for_prompts(setup):
    from lm_eval.api.instance import Instance

    from mpt_jax.lm_eval import MPTJaxLM

    _, model_dir, _ = setup
    lm = MPTJaxLM(path=str(model_dir), tokenizer="byte", batch_size=2, max_length=32)
    assert lm.max_gen_toks == 16  # lm-eval's 256 would leave no prompt in 32 tokens
    # a task that names no max_gen_toks generates with the default, its prompt cut to 16 tokens
    request = Instance("generate_until", {}, (PROMPTS[0]["prompt"], {"until": ["\n"]}), 0)
    assert isinstance(lm.generate_until([request])[0], str)
    with pytest.raises(ValueError, match=r"max_gen_toks must be in \[1, 31\]"):
        MPTJaxLM(path=str(model_dir), tokenizer="byte", max_length=32, max_gen_toks=32)
