"""`mpt-jax eval`: llm-foundry prompt assembly, metrics against a NumPy oracle, bucketing,
gauntlet arithmetic, perplexity and bits per byte, bad input and the command line."""

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import TINY_MODEL, config, random_hf_tensors, write_hf_folder
from mpt_numpy_reference import mpt_forward

from mpt_jax import from_pretrained
from mpt_jax.cli import main
from mpt_jax.config import ConfigError, MeshConfig, ModelConfig
from mpt_jax.data import load_tokenizer, open_dataset
from mpt_jax.data.loader import RowSource
from mpt_jax.data.tokenizer import JsonTokenizer, train_bpe
from mpt_jax.evaluation import EvalError, load_task_list
from mpt_jax.evaluation.gauntlet import compute_gauntlet, parse_gauntlet
from mpt_jax.evaluation.icl import run_tasks
from mpt_jax.evaluation.metrics import exact_match, normalize_answer
from mpt_jax.evaluation.perplexity import evaluate_perplexity
from mpt_jax.evaluation.prompts import PromptBuilder, fewshot_indices, tokenize
from mpt_jax.evaluation.scoring import Scorer, bucket_lengths
from mpt_jax.evaluation.tasks import Example, TaskConfig, read_examples
from mpt_jax.evaluation.tokens import IclTokenizer
from mpt_jax.sharding import make_mesh

BYTES = IclTokenizer(load_tokenizer("byte"))


def task(kind, **kw):
    return TaskConfig(label="t", dataset_uri="t.jsonl", num_fewshot=(0,), icl_task_type=kind, **kw)


def examples(*rows):
    return [Example(i + 1, r) for i, r in enumerate(rows)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arith_and_lm_tasks(folder, arith_rows, lm_rows):
    """Task entries for arith.jsonl (multiple choice, 0 and 1 shots) and lm.jsonl in `folder`."""
    write_jsonl(folder / "arith.jsonl", arith_rows)
    write_jsonl(folder / "lm.jsonl", lm_rows)
    return [
        {
            "label": "arith",
            "dataset_uri": "arith.jsonl",
            "num_fewshot": [0, 1],
            "icl_task_type": "multiple_choice",
        },
        {
            "label": "lm",
            "dataset_uri": "lm.jsonl",
            "num_fewshot": [0],
            "icl_task_type": "language_modeling",
        },
    ]


def write_tasks(path, entries, gauntlet=None):
    data = {"icl_tasks": entries, **({"eval_gauntlet": gauntlet} if gauntlet else {})}
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


@pytest.fixture
def small_builtin_corpus(monkeypatch, tmp_path):
    """builtin:python-stdlib cut to its first 150 files (4 MB, 2 of them drawn for validation;
    the whole, 31 MB, takes 15 s to prepare at seq 32), in this test's own cache."""
    from mpt_jax.data import sources

    whole = sources.builtin_files
    monkeypatch.setattr(sources, "builtin_files", lambda corpus: whole(corpus)[:150])
    monkeypatch.setenv("MPT_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random ALiBi model (max_seq_len 64) on the 8-device mesh, with its float64 oracle."""
    cfg = ModelConfig.from_dict({**TINY_MODEL, "max_seq_len": 64})
    tensors = random_hf_tensors(cfg, seed=3)
    path = write_hf_folder(cfg, tensors, tmp_path_factory.mktemp("hf") / "model")
    model = from_pretrained(path)
    scorer = Scorer(model, make_mesh(MeshConfig()), batch_size=8)

    def logits(ids):
        return mpt_forward(cfg.to_dict(), tensors, np.asarray([ids]))[0]

    return SimpleNamespace(cfg=cfg, path=path, model=model, scorer=scorer, logits=logits)


# ---------------------------------------------------------------------------------------------
# Prompt assembly (hand-checked strings; with 3 examples and 2 shots the few-shot set of an
# example is the other two, iterated in ascending order)


def test_language_modeling_prompts_fewshot_delimiters_and_prefix_space():
    t = task("language_modeling", prompt_string="Solve:", continuation_delimiter="\nAnswer: ")
    rows = examples(
        {"context": " 1+1 ", "continuation": " 2 "},
        {"context": "2+2", "continuation": "4"},
        {"context": "3+3", "continuation": "6"},
    )
    p = PromptBuilder(t, rows, prefix_space=True).build(2)
    assert p[0].preamble == "Solve:\n2+2\nAnswer: 4\n3+3\nAnswer: 6"
    assert p[0].contexts == ("\n1+1\nAnswer:",)  # the delimiter's trailing space is dropped...
    assert p[0].continuations == (" 2",)  # ...and the continuation gets one (stripped first)
    assert p[1].preamble == "Solve:\n1+1\nAnswer: 2\n3+3\nAnswer: 6"
    no_space = PromptBuilder(t, rows, prefix_space=False).build(2)
    assert no_space[1].continuations == ("4",)  # a byte tokenizer gets no prefix space
    zero = PromptBuilder(task("language_modeling"), rows, prefix_space=True).build(0)
    assert (zero[0].preamble, zero[0].contexts, zero[0].continuations) == ("", ("1+1",), (" 2",))
    pre = task("language_modeling", question_prelimiter="Q: ")
    assert PromptBuilder(pre, rows, prefix_space=True).build(2)[2].preamble == "Q: 1+1 2\nQ: 2+2 4"


def test_multiple_choice_and_schema_prompts():
    mc = task("multiple_choice", continuation_delimiter="\nAnswer: ", example_delimiter="\n\n")
    rows = examples(
        *({"query": f"q{i}", "choices": ["yes", "no"], "gold": (i + 1) % 2} for i in range(3))
    )
    p = PromptBuilder(mc, rows, prefix_space=True).build(2)[0]
    assert p.preamble == "q1\nAnswer: yes\n\nq2\nAnswer: no"  # gold choice, no prefix space
    assert p.contexts == ("\n\nq0\nAnswer:",)
    assert (p.continuations, p.gold) == ((" yes", " no"), 1)

    rows = examples(
        *(
            {
                "context_options": [f"A{i} said", f"B{i} said"],
                "continuation": f" hi{i}. ",
                "gold": i % 2,
            }
            for i in range(3)
        )
    )
    zero = PromptBuilder(task("schema"), rows, prefix_space=True).build(0)[0]
    # zero-shot without a prompt: llm-foundry appends no continuation delimiter to the options
    assert (zero.preamble, zero.contexts, zero.continuations) == (
        "",
        ("A0 said", "B0 said"),
        (" hi0.",),
    )
    few = PromptBuilder(task("schema", question_prelimiter="Q: "), rows, prefix_space=False)
    p = few.build(2)[0]
    # few-shot: gold option + delimiter + continuation; the prelimiter precedes the delimiter
    assert p.preamble == "Q: B1 said hi1.Q: \nA2 said hi2."
    assert p.contexts == ("Q: \nA0 said", "Q: \nB0 said")  # delimiter ' ' right-stripped away
    assert p.continuations == ("hi0.",)


def test_generation_prompts_with_chain_of_thought():
    t = task("generation_task_with_answers", continuation_delimiter="\nA:", cot_delimiter=" So: ")
    rows = examples(
        {"context": "2*3?", "chain_of_thought": "2*3 is 6.", "answer": " 6 ", "aliases": ["six"]},
        {"context": "1+4?", "chain_of_thought": "1+4 is 5.", "answer": "5"},
    )
    builder = PromptBuilder(t, rows, prefix_space=True)
    p = builder.build(1)
    assert p[0].preamble == "1+4?\nA:1+4 is 5. So: 5"
    assert p[0].contexts == ("\n2*3?\nA:",)
    assert p[0].answers == (" 6 ", "six")  # llm-foundry gathers aliases before stripping
    # longest answer with its chain of thought, in tokens with special tokens, +10 for CoT
    assert builder.max_answer_tokens(BYTES) == len("2*3 is 6. So:  6 ") + 10


def test_fewshot_sampling_follows_llm_foundry():
    first = sorted(random.Random(1234).sample(range(5), 2))
    other = min(set(range(5)) - set(first))  # an example the first draw leaves out
    # seeded draw, no replacement needed; small ints iterate in ascending order
    assert fewshot_indices(5, 2, other, random.Random(1234)) == first
    again = fewshot_indices(5, 2, first[0], random.Random(1234))  # drawn itself: replaced
    assert first[0] not in again and first[1] in again and len(again) == 2
    for n, k in [(10, 3), (4, 9), (2, 1), (1, 3)]:
        rng = random.Random(7)
        for i in range(n):
            idx = fewshot_indices(n, k, i, rng)
            assert i not in idx and len(set(idx)) == len(idx) == min(n - 1, k)
    t = task("language_modeling", fewshot_random_seed=5)
    rows = examples(*({"context": f"c{i}", "continuation": f"x{i}"} for i in range(8)))
    a = PromptBuilder(t, rows, prefix_space=False).build(3)
    b = PromptBuilder(t, rows, prefix_space=False).build(3)
    assert [x.preamble for x in a] == [x.preamble for x in b]  # seeded: reproducible


def test_separate_tokenization_left_truncation_and_prefix_space_detection(tmp_path):
    t = task("language_modeling", prompt_string="P")
    rows = examples(
        {"context": "x" * 20, "continuation": "abc"}, {"context": "y", "continuation": "z"}
    )
    prompt = PromptBuilder(t, rows, prefix_space=False).build(1)[0]
    (seq,) = tokenize(prompt, BYTES, 64, "t.jsonl")
    text = (prompt.preamble + prompt.contexts[0]).encode()
    assert seq.tokens.tolist() == list(text) + list(b"abc") and seq.start == len(text)
    (cut,) = tokenize(prompt, BYTES, 10, "t.jsonl")
    assert cut.truncated and cut.tokens.tolist() == list((text + b"abc")[-10:]) and cut.start == 7
    assert not BYTES.needs_prefix_space
    corpus = [" ".join(f"a {w}" for w in ["cat", "dog", "bird", "fish"] * 50)] * 20
    bpe = IclTokenizer(JsonTokenizer(train_bpe(corpus, 300, tmp_path / "tokenizer.json")))
    assert bpe.needs_prefix_space  # ' a' is one token in byte-level BPE
    bpe_prompt = PromptBuilder(t, rows, prefix_space=True).build(1)[0]
    (bseq,) = tokenize(bpe_prompt, bpe, 64, "t.jsonl")
    pieces = bpe.encode(bpe_prompt.preamble) + bpe.encode(bpe_prompt.contexts[0])
    assert bseq.tokens.tolist() == pieces + bpe.encode(" abc")


# ---------------------------------------------------------------------------------------------
# Metrics on a model: batched, bucketed and sharded == one example at a time in float64 NumPy


def oracle_scores(tiny, context: bytes, continuation: bytes):
    context = context[-(tiny.cfg.max_seq_len - len(continuation)) :]  # cut from the left
    ids = list(context) + list(continuation)
    logits = tiny.logits(ids)
    pos = np.arange(len(context) - 1, len(ids) - 1)
    logz = np.log(np.exp(logits[pos] - logits[pos].max(-1, keepdims=True)).sum(-1))
    ce = logz + logits[pos].max(-1) - logits[pos, list(continuation)]
    return bool((logits[pos].argmax(-1) == list(continuation)).all()), float(ce.mean())


@pytest.mark.parametrize("loss_chunk", [None, 5])  # 5: chunks that do not divide the buckets
def test_icl_metrics_equal_a_direct_float64_computation(tiny, tmp_path, loss_chunk):
    # continuations that are the model's greedy next byte score as correct
    lm_rows = []
    for i in range(12):
        context = f"Item {i} of the list is"
        nxt = int(tiny.logits(list(context.encode()))[-1].argmax())
        lm_rows.append({"context": context, "continuation": chr(nxt) if 33 <= nxt < 127 else "zz"})
    assert any(len(r["continuation"]) == 1 for r in lm_rows)
    mc_rows = [
        {
            "query": f"Question {i}: the best is",
            "choices": ["red", "a blue one", "green!"],
            "gold": i % 3,
        }
        for i in range(7)
    ]
    schema_rows = [
        {
            "context_options": [f"Ann met Bo{i}, she", f"Bo{i} met Ann, he"],
            "continuation": "smiled.",
            "gold": i % 2,
        }
        for i in range(5)
    ]
    entries = [
        {
            "label": "lm",
            "dataset_uri": str(write_jsonl(tmp_path / "lm.jsonl", lm_rows)),
            "num_fewshot": [0, 2],
            "icl_task_type": "language_modeling",
        },
        {
            "label": "mc",
            "dataset_uri": str(write_jsonl(tmp_path / "mc.jsonl", mc_rows)),
            "num_fewshot": [0, 1],
            "icl_task_type": "multiple_choice",
            "continuation_delimiter": "\nAnswer: ",
        },
        {
            "label": "ws",
            "dataset_uri": str(write_jsonl(tmp_path / "ws.jsonl", schema_rows)),
            "num_fewshot": [0, 2],
            "icl_task_type": "schema",
        },
    ]
    tasks, _ = load_task_list(write_tasks(tmp_path / "tasks.yaml", entries))
    scorer = tiny.scorer
    if loss_chunk is not None:
        scorer = Scorer(tiny.model, make_mesh(MeshConfig()), batch_size=8, loss_chunk=loss_chunk)
    results = run_tasks(scorer, BYTES, tasks, details=True)
    assert [r["key"] for r in results] == [
        "lm/0-shot",
        "lm/2-shot",
        "mc/0-shot",
        "mc/1-shot",
        "ws/0-shot",
        "ws/2-shot",
    ]
    rows_of = {"lm": lm_rows, "mc": mc_rows, "ws": schema_rows}
    for t, r in zip(
        [tasks[0], tasks[0], tasks[1], tasks[1], tasks[2], tasks[2]], results, strict=True
    ):
        prompts = PromptBuilder(t, examples(*rows_of[t.label]), prefix_space=False).build(
            r["num_fewshot"]
        )
        got = r["details"][""]
        expected = []
        for prompt, row in zip(prompts, got, strict=True):
            pairs = [
                ((prompt.preamble + ctx).encode(), cont.encode())
                for ctx in prompt.contexts
                for cont in prompt.continuations
            ]
            scores = [oracle_scores(tiny, c, k) for c, k in pairs]
            if t.label == "lm":
                assert row["correct"] == scores[0][0]
                np.testing.assert_allclose(row["ce_sum"] / row["tokens"], scores[0][1], rtol=2e-5)
                expected.append(scores[0][0])
            else:
                mean_ce = [s[1] for s in scores]
                np.testing.assert_allclose(row["mean_ce"], mean_ce, rtol=2e-5)
                assert row["pick"] == int(np.argmin(mean_ce))
                expected.append(int(np.argmin(mean_ce)) == prompt.gold)
        assert r["accuracy"] == pytest.approx(np.mean(expected)) and r["samples"] == len(prompts)
    assert results[0]["accuracy"] > 0  # some greedy continuations were right
    assert results[1]["truncated"] > 0  # 2-shot prompts exceed 64 tokens: cut from the left


def test_generation_exact_match_equals_a_greedy_float64_loop(tiny, tmp_path):
    contexts = [f"Q{i}: name a thing" for i in range(8)]
    # the reference: greedy decoding of 3 tokens with the NumPy oracle, stopping at EOS
    refs = []
    for c in contexts:
        ids, out = list((c + "\nA:").encode()), []
        for _ in range(3):
            nxt = int(tiny.logits(ids)[-1].argmax())
            if nxt == 256:
                break
            ids.append(nxt)
            out.append(nxt)
        refs.append(out)
    texts = [BYTES.decode(o) for o in refs]
    rows = [
        {"context": c, "answer": t[:1] if t[:1].isalnum() and t.isascii() else "zzz"}
        for c, t in zip(contexts, texts, strict=True)
    ]
    rows[0]["answer"] = "zzz"  # fixes max_new_tokens at 3
    entry = {
        "label": "gen",
        "dataset_uri": str(write_jsonl(tmp_path / "gen.jsonl", rows)),
        "num_fewshot": [0],
        "icl_task_type": "generation_task_with_answers",
        "continuation_delimiter": "\nA:",
    }
    tasks, _ = load_task_list(write_tasks(tmp_path / "tasks.yaml", [entry]))
    from mpt_jax.evaluation.runner import kv_cache_generate

    for generate in (None, kv_cache_generate(tiny.model, 8)):
        (r,) = run_tasks(tiny.scorer, BYTES, tasks, details=True, generate=generate)
        got = r["details"][""]
        assert [g["output"] for g in got] == texts
        expected = [exact_match(t, [row["answer"]]) for t, row in zip(texts, rows, strict=True)]
        assert [g["correct"] for g in got] == expected
    assert r["accuracy"] == pytest.approx(np.mean(expected))


def test_normalized_exact_match_rules():
    assert normalize_answer("The  Eiffel_Tower!") == "eiffel tower"
    assert normalize_answer("‘An’ apple, a DAY") == "apple day"
    assert exact_match(" The answer: Paris, France", ["paris"]) is False  # prefix match only
    assert exact_match("Paris, France", ["paris"]) is True
    assert exact_match("x\n\nParis", ["paris"], stopping_criteria=["\n\n"]) is False
    assert exact_match(
        "work... The answer is 42\n\nQ",
        ["42"],
        stopping_criteria=["\n\n"],
        cot_delimiter="The answer is ",
    )
    assert exact_match("  Paris ", ["Paris"], do_normalization=False)
    assert not exact_match("paris", ["Paris"], do_normalization=False)


def test_bucketing_compiles_few_shapes(tiny, tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 40)
    rows = [{"context": "w" * int(n), "continuation": "ok"} for n in lengths]
    entry = {
        "label": "b",
        "dataset_uri": str(write_jsonl(tmp_path / "b.jsonl", rows)),
        "num_fewshot": [0],
        "icl_task_type": "language_modeling",
    }
    tasks, _ = load_task_list(write_tasks(tmp_path / "tasks.yaml", [entry]))
    scorer = Scorer(tiny.model, tiny.scorer.mesh, batch_size=8)
    (r,) = run_tasks(scorer, BYTES, tasks)
    assert r["samples"] == 40
    buckets = bucket_lengths(64)
    assert buckets == [16, 24, 32, 48, 64] and bucket_lengths(100) == [16, 24, 32, 48, 64, 96, 100]
    assert {s[1] for s in scorer.shapes} <= set(buckets) and {s[0] for s in scorer.shapes} == {8}
    assert len(scorer.shapes) <= len(buckets) < len(set(lengths.tolist()))
    (fn,) = scorer._fns.values()
    assert fn._cache_size() == len(scorer.shapes)  # one compilation per bucket


# ---------------------------------------------------------------------------------------------
# Gauntlet


def gauntlet_cfg(**kw):
    raw = {
        "weighting": "EQUAL",
        "subtract_random_baseline": True,
        "rescale_accuracy": True,
        "averages": {"core_average": ["wk", "rc"], "other": ["lu"]},
        "categories": [
            {
                "name": "wk",
                "benchmarks": [
                    {"name": "arc", "num_fewshot": 3, "random_baseline": 0.25},
                    {"name": "jeo", "num_fewshot": 3, "random_baseline": 0},
                ],
            },
            {
                "name": "rc",
                "benchmarks": [{"name": "boolq", "num_fewshot": 0, "random_baseline": 0.5}],
            },
            {
                "name": "lu",
                "benchmarks": [{"name": "hella", "num_fewshot": 0, "random_baseline": 0.25}],
            },
        ],
        **kw,
    }
    return parse_gauntlet(raw, where="g")


def test_gauntlet_arithmetic():
    acc = {"arc/3-shot": 0.625, "jeo/3-shot": 0.3, "boolq/0-shot": 0.75}
    sizes = {"arc/3-shot": 30, "jeo/3-shot/history": 6, "jeo/3-shot/science": 4, "boolq/0-shot": 9}
    g = compute_gauntlet(gauntlet_cfg(), acc, sizes)
    # arc: (0.625 - 0.25) / 0.75 = 0.5; jeo: 0.3; boolq: (0.75 - 0.5) / 0.5 = 0.5
    assert g["categories"] == pytest.approx({"wk": 0.4, "rc": 0.5})
    assert g["missing"] == {"lu": ["hella/0-shot"]}  # a category missing a benchmark is dropped
    assert g["averages"] == pytest.approx({"core_average": 0.45, "other": 0.0})
    sample = compute_gauntlet(gauntlet_cfg(weighting="SAMPLE_SZ"), acc, sizes)
    assert sample["categories"]["wk"] == pytest.approx((0.5 * 30 + 0.3 * 10) / 40)  # jeo: 6 + 4
    log = compute_gauntlet(gauntlet_cfg(weighting="LOG_SAMPLE_SZ"), acc, sizes)
    w1, w2 = math.log2(30), math.log2(10)
    assert log["categories"]["wk"] == pytest.approx((0.5 * w1 + 0.3 * w2) / (w1 + w2))
    raw = compute_gauntlet(
        gauntlet_cfg(subtract_random_baseline=False, rescale_accuracy=False), acc, sizes
    )
    assert raw["categories"]["wk"] == pytest.approx((0.625 + 0.3) / 2)
    sub = compute_gauntlet(gauntlet_cfg(rescale_accuracy=False), acc, sizes)
    assert sub["categories"]["wk"] == pytest.approx((0.375 + 0.3) / 2)
    default = compute_gauntlet(gauntlet_cfg(averages=None), {**acc, "hella/0-shot": 0.25}, sizes)
    assert default["averages"] == pytest.approx({"default_average": (0.4 + 0.5 + 0.0) / 3})
    with pytest.raises(EvalError, match="rescale_accuracy: only allowed together"):
        gauntlet_cfg(subtract_random_baseline=False)
    with pytest.raises(EvalError, match=r"g\.averages\.wk: an average may not share"):
        gauntlet_cfg(averages={"wk": ["rc"]})
    with pytest.raises(EvalError, match=r"g\.weighting: must be one of"):
        gauntlet_cfg(weighting="EQUALS")
    with pytest.raises(EvalError, match=r"g\.averages\.x: unknown category 'nope'"):
        gauntlet_cfg(averages={"x": ["nope"]})
    with pytest.raises(EvalError, match=r"g\.categories: empty; a gauntlet needs at least one"):
        gauntlet_cfg(categories=[], averages=None)


# ---------------------------------------------------------------------------------------------
# Perplexity and bits per byte


def test_perplexity_and_bits_per_byte_equal_a_direct_computation(small_dataset, tmp_path):
    cfg = ModelConfig.from_dict(TINY_MODEL)  # max_seq_len 32, as the dataset
    tensors = random_hf_tensors(cfg, seed=5)
    model = from_pretrained(write_hf_folder(cfg, tensors, tmp_path / "hf"))
    scorer = Scorer(model, make_mesh(MeshConfig()), batch_size=8)
    ds = small_dataset / "ds"
    results = evaluate_perplexity(
        scorer, ds, seq_lens=[32, 64], max_tokens=32 * 20, position_buckets=4
    )
    source = RowSource(open_dataset(ds), "val")
    stream = np.concatenate([source[i] for i in range(20)]).astype(np.int64)
    for r, length in zip(results, [32, 64], strict=True):
        windows = stream[: 640 // length * length].reshape(-1, length)
        logits = mpt_forward({**cfg.to_dict(), "max_seq_len": length}, tensors, windows)[:, :-1]
        targets = windows[:, 1:]
        m = logits.max(-1)
        ce = (
            np.log(np.exp(logits - m[..., None]).sum(-1))
            + m
            - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        )
        n_bytes = int((targets < 256).sum())  # byte tokens are one byte, EOS none
        assert (
            r["windows"] == len(windows) and r["tokens"] == targets.size and r["bytes"] == n_bytes
        )
        assert r["extrapolated"] == (length > 32)
        np.testing.assert_allclose(r["loss"], ce.mean(), rtol=1e-5)
        np.testing.assert_allclose(r["perplexity"], np.exp(ce.mean()), rtol=1e-5)
        np.testing.assert_allclose(r["bits_per_byte"], ce.sum() / math.log(2) / n_bytes, rtol=1e-5)
        # 4 buckets by predicted position: 1-7, 8-15, 16-23, 24-31 (and 1-15 ... 48-63)
        q = length // 4
        spans = [(1, q), (q, 2 * q), (2 * q, 3 * q), (3 * q, length)]
        assert [(b["start"], b["end"]) for b in r["position_buckets"]] == spans
        for b, (lo, hi) in zip(r["position_buckets"], spans, strict=True):
            np.testing.assert_allclose(b["loss"], ce[:, lo - 1 : hi - 1].mean(), rtol=1e-5)


def test_perplexity_on_a_builtin_corpus_reads_the_folder_training_prepares(
    tiny, tmp_path, small_builtin_corpus
):
    from mpt_jax.data import ByteTokenizer, resolve_dataset
    from mpt_jax.evaluation import evaluate

    kw = dict(max_tokens=64 * 8, batch_size=8)
    got = evaluate(tiny.model, ByteTokenizer(), data="builtin:python-stdlib", **kw)
    # what `mpt-jax train` prepares for this model: data.path builtin, seq_len = max_seq_len 64
    trained_on = resolve_dataset("builtin:python-stdlib", seq_len=64, tokenizer="byte").folder
    assert [f for f in (tmp_path / "cache" / "datasets").iterdir()] == [trained_on]
    want = evaluate(tiny.model, ByteTokenizer(), data=trained_on, **kw)
    assert got["perplexity"] == want["perplexity"]
    assert got["perplexity"][0]["dataset"] == str(trained_on)


def test_perplexity_refuses_data_prepared_with_another_tokenizer(tiny, small_dataset, tmp_path):
    from mpt_jax.data import ByteTokenizer, DataError
    from mpt_jax.evaluation import evaluate

    corpus = [" ".join(["cat", "dog", "bird"] * 50)] * 20
    bpe = JsonTokenizer(train_bpe(corpus, 300, tmp_path / "tokenizer.json"))
    ds = small_dataset / "ds"  # prepared with bytes
    kw = dict(data=ds, max_tokens=64, batch_size=8)
    with pytest.raises(
        DataError,
        match=r"ds/meta\.json: prepared with tokenizer 'byte', the model's tokenizer "
        r".*tokenizer\.json is 'tokenizer_json'; prepare it with the model's tokenizer",
    ):
        evaluate(tiny.model, bpe, **kw)
    assert evaluate(tiny.model, ByteTokenizer(), **kw)["perplexity"][0]["windows"] == 1


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each, naming the file (and line)


def test_bad_task_files_and_lists(tiny, tmp_path):
    def run_one(rows_or_text, **entry):
        path = tmp_path / "bad.jsonl"
        if isinstance(rows_or_text, str):
            path.write_text(rows_or_text)
        else:
            write_jsonl(path, rows_or_text)
        e = {
            "label": "x",
            "dataset_uri": str(path),
            "num_fewshot": [0],
            "icl_task_type": "language_modeling",
            **entry,
        }
        tasks, _ = load_task_list(write_tasks(tmp_path / "tasks.yaml", [e]))
        return run_tasks(tiny.scorer, BYTES, tasks)

    ok = json.dumps({"context": "a", "continuation": "b"})
    with pytest.raises(EvalError, match=r"bad\.jsonl line 3: invalid JSON"):
        run_one(f"{ok}\n{ok}\n{{oops\n")
    with pytest.raises(
        EvalError, match=r"bad\.jsonl line 2: missing field 'gold' \(multiple_choice task\)"
    ):
        run_one(
            [{"query": "q", "choices": ["a"], "gold": 0}, {"query": "q", "choices": ["a"]}],
            icl_task_type="multiple_choice",
        )
    with pytest.raises(
        EvalError, match=r"bad\.jsonl line 1: field 'gold' must be an index into choices"
    ):
        run_one([{"query": "q", "choices": ["a", "b"], "gold": 2}], icl_task_type="multiple_choice")
    with pytest.raises(EvalError, match=r"bad\.jsonl: the task has no examples"):
        run_one("\n\n")
    with pytest.raises(
        EvalError,
        match=r"icl_tasks\[0\]\.early_stopping_criteria: not a valid regular expression",
    ):
        run_one(
            [{"context": "a", "answer": "b"}],
            icl_task_type="generation_task_with_answers",
            early_stopping_criteria=["Answer (final"],
        )
    with pytest.raises(
        EvalError, match=r"tasks\.yaml icl_tasks\[0\]\.icl_task_type: unknown task type 'qa_magic'"
    ):
        run_one([], icl_task_type="qa_magic")
    with pytest.raises(
        EvalError,
        match=r"bad\.jsonl line 2: a continuation of 40 tokens leaves no room for the context",
    ):
        run_one(
            [{"context": "a", "continuation": "b"}, {"context": "a", "continuation": "c" * 40}],
            max_seq_len=16,
        )
    with pytest.raises(
        EvalError,
        match=r"bad\.jsonl: answers need up to 30 new tokens, which leaves no room for the prompt",
    ):
        run_one(
            [{"context": "a", "answer": "y" * 30}],
            icl_task_type="generation_task_with_answers",
            max_seq_len=16,
        )
    with pytest.raises(
        EvalError,
        match=r"icl_tasks label 'x' \(.*bad\.jsonl\): max_seq_len 1000 exceeds the model's 64",
    ):
        run_one([{"context": "a", "continuation": "b"}], max_seq_len=1000)
    # all tasks are checked before the first forward pass
    good = {
        "label": "g",
        "dataset_uri": str(
            write_jsonl(tmp_path / "g.jsonl", [{"context": "a", "continuation": "b"}])
        ),
        "num_fewshot": [0],
        "icl_task_type": "language_modeling",
    }
    bad = {
        **good,
        "label": "b",
        "dataset_uri": str(
            write_jsonl(tmp_path / "b.jsonl", [{"context": "a", "continuation": "c" * 70}])
        ),
    }
    tasks, _ = load_task_list(write_tasks(tmp_path / "two.yaml", [good, bad]))
    fresh = Scorer(tiny.model, tiny.scorer.mesh, batch_size=8)
    with pytest.raises(EvalError, match=r"b\.jsonl line 1: a continuation of 70 tokens"):
        run_tasks(fresh, BYTES, tasks)
    assert not fresh.shapes and not fresh._fns  # nothing ran
    with pytest.raises(EvalError, match=r"icl_tasks\[0\]\.promptstring: unknown key"):
        run_one([], promptstring="x")
    with pytest.raises(EvalError, match=r"icl_tasks\[0\]\.pass_at_k: not supported"):
        run_one([], pass_at_k=1)
    with pytest.raises(
        EvalError, match=r"icl_tasks\[0\]\.dataset_uri: .*missing\.jsonl: file not found"
    ):
        load_task_list(
            write_tasks(
                tmp_path / "t.yaml",
                [
                    {
                        "label": "x",
                        "dataset_uri": "missing.jsonl",
                        "num_fewshot": [0],
                        "icl_task_type": "schema",
                    }
                ],
            )
        )


# ---------------------------------------------------------------------------------------------
# Command line


def test_command_line_on_a_run_folder(small_dataset, tmp_path, capsys, small_builtin_corpus):
    from mpt_jax.train import run

    run(config(small_dataset, run_dir=str(tmp_path / "run"), train={"steps": 2}))
    rows = [
        {"query": f"{i}+{i}=", "choices": [str(2 * i), str(2 * i + 1)], "gold": 0} for i in range(6)
    ]
    lm_rows = [{"context": f"def f{i}", "continuation": "x"} for i in range(4)]
    entries = arith_and_lm_tasks(tmp_path, rows, lm_rows)
    gauntlet = {
        "categories": [
            {
                "name": "math",
                "benchmarks": [{"name": "arith", "num_fewshot": 1, "random_baseline": 0.5}],
            }
        ]
    }
    tasks = write_tasks(tmp_path / "tasks.yaml", entries, gauntlet)  # dataset_uri beside the YAML
    out = tmp_path / "out" / "results.json"
    argv = [
        "eval",
        str(tmp_path / "run"),
        "--tasks",
        str(tasks),
        "--data",
        str(small_dataset / "ds"),
    ]
    argv += [
        "--seq-lens",
        "32,64",
        "--max-tokens",
        "640",
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "arith" in printed and "default_average" in printed and "bits/byte" in printed
    res = json.loads(out.read_text())
    assert res["model"]["step"] == 2 and res["model"]["tokenizer"]["kind"] == "byte"
    assert [r["key"] for r in res["icl"]] == ["arith/0-shot", "arith/1-shot", "lm/0-shot"]
    arith = res["icl"][1]["accuracy"]
    assert res["gauntlet"]["categories"]["math"] == pytest.approx((arith - 0.5) / 0.5)
    assert [p["seq_len"] for p in res["perplexity"]] == [32, 64]
    assert list(out.parent.iterdir()) == [out]  # written atomically, no temporary left

    assert main(["eval", str(tmp_path / "run"), "--tasks", str(tasks), "--step", "7"]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err
    bad = write_tasks(tmp_path / "bad.yaml", [{**entries[0], "icl_task_type": "code_evaluation"}])
    assert main(["eval", str(tmp_path / "run"), "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task type 'code_evaluation'" in err[0]
    # refused before any evaluation runs: results would be lost at the end
    run_tasks_args = ["eval", str(tmp_path / "run"), "--tasks", str(tasks)]
    for extra, message in [
        (["--out", str(out.parent)], f"--out: {out.parent} is a folder; name a file"),
        (["--out", str(tasks / "r.json")], f"--out: {tasks} is a file, not a folder"),
        (["--data", str(small_dataset / "ds"), "--max-tokens", "-5"], "--max-tokens: must be >= 1"),
        # nor is any of its inputs replaced: the task list, a task's data, the run's files
        (["--out", str(tasks)], f"--out: {tasks} is an input of this evaluation"),
        (["--out", str(tmp_path / entries[0]["dataset_uri"])], "is an input of this evaluation"),
        (["--out", str(tmp_path / "run" / "config.yaml")], "config.yaml is a file of"),
    ]:
        before = {p: p.read_bytes() for p in (tasks, tmp_path / "run" / "config.yaml")}
        assert main(run_tasks_args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert before == {p: p.read_bytes() for p in before}
    # an earlier result in the run folder is replaced (as a sweep's eval.json)
    (tmp_path / "run" / "eval.json").write_text(out.read_text())
    assert main([*run_tasks_args, "--out", str(tmp_path / "run" / "eval.json")]) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["icl"]
    capsys.readouterr()

    # a run on the built-in corpus is evaluated on the rows it held out: the corpus prepared
    # now when it holds the run's rows, else the folder the run trained on, else refused
    import shutil

    from mpt_jax.data import resolve_dataset

    seq_len = TINY_MODEL["max_seq_len"]
    built = resolve_dataset("builtin:python-stdlib", seq_len=seq_len, progress=False)
    capsys.readouterr()  # its "preparing ... (once)"
    meta_path = tmp_path / "run" / "checkpoints" / "2" / "meta" / "metadata"
    saved = json.loads(meta_path.read_text())

    def evaluated_on(contents, folders):
        meta = {**saved, "config": {**saved["config"], "data": {"path": "builtin:python-stdlib"}}}
        meta["data"] = {**saved["data"], "datasets": folders, "contents": contents}
        if contents is None:  # a checkpoint from before content ids
            del meta["data"]["contents"]
        meta_path.write_text(json.dumps(meta))
        argv = ["eval", str(tmp_path / "run"), "--data", "builtin:python-stdlib"]
        argv += ["--max-tokens", "256", "--no-progress", "--out", str(out)]
        code, printed = main(argv), capsys.readouterr()
        return (
            printed.err.strip().splitlines()
            if code
            else json.loads(out.read_text())["perplexity"][0]["dataset"]
        )

    assert evaluated_on([built.content_id], [str(built.folder)]) == str(built.folder)
    old = shutil.copytree(built.folder, tmp_path / "drawn-by-path")
    assert evaluated_on(None, [str(old)]) == str(old)
    other_rows = evaluated_on(["0" * 16], [str(old)])  # neither holds the rows the run recorded
    assert "may be the run's training documents" in other_rows[0]
    shutil.rmtree(old)
    err = evaluated_on(None, [str(old)])
    assert len(err) == 1 and "may be the run's training documents" in err[0], err


def test_task_lines_split_at_newlines_only(tmp_path):
    # JSON strings may hold U+0085, U+2028 and U+2029 raw; str.splitlines would cut there
    rows = [
        {"context": "a\u2028b\u0085", "continuation": "c"},
        {"context": "d\u2029", "continuation": "e"},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows) + "{oops\n")
    with pytest.raises(EvalError, match=r"t\.jsonl line 3: invalid JSON"):
        read_examples(path, "language_modeling")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    examples = read_examples(path, "language_modeling")
    assert [e.fields for e in examples] == rows and [e.line for e in examples] == [1, 2]


# ---------------------------------------------------------------------------------------------
# During training: train.icl_tasks


def test_icl_tasks_during_training_equal_the_standalone_evaluation(small_dataset, tmp_path):
    from mpt_jax.config import ConfigError
    from mpt_jax.train import run

    rng = random.Random(5)
    rows = []
    for i in range(12):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"query": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "gold": i % 2})
    lm_rows = [{"context": f"def f{i}(", "continuation": "x)"} for i in range(6)]
    entries = arith_and_lm_tasks(tmp_path, rows, lm_rows)
    gauntlet = {
        "categories": [
            {
                "name": "math",
                "benchmarks": [{"name": "arith", "num_fewshot": 1, "random_baseline": 0.5}],
            },
            {
                "name": "text",
                "benchmarks": [{"name": "lm", "num_fewshot": 0, "random_baseline": 0.0}],
            },
        ]
    }
    tasks = write_tasks(tmp_path / "tasks.yaml", entries, gauntlet)
    run_dir = tmp_path / "run"
    train = {"steps": 4, "eval_every": 2, "eval_batches": 1, "icl_tasks": str(tasks)}
    final = run(config(small_dataset, run_dir=str(run_dir), train=train))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {x["step"]: x for x in lines if "val_loss" in x}
    keys = {
        "icl/arith/0-shot",
        "icl/arith/1-shot",
        "icl/lm/0-shot",
        "gauntlet/math",
        "gauntlet/text",
        "gauntlet/default_average",
    }
    assert sorted(evaluated) == [2, 4] and all(keys <= x.keys() for x in evaluated.values())
    last = evaluated[4]
    assert last["gauntlet/math"] == pytest.approx((last["icl/arith/1-shot"] - 0.5) / 0.5)
    assert all(final[k] == last[k] for k in keys)  # complete.json has them too

    # the same checkpoint through `mpt-jax eval`, in the same batches: the same accuracies
    out = tmp_path / "standalone.json"
    argv = ["eval", str(run_dir), "--tasks", str(tasks), "--batch-size", "8"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    standalone = json.loads(out.read_text())
    for r in standalone["icl"]:
        assert last[f"icl/{r['key']}"] == r["accuracy"], r["key"]
    for name, score in standalone["gauntlet"]["categories"].items():
        assert last[f"gauntlet/{name}"] == pytest.approx(score)

    # a bad task list stops the run before its folder is made
    bad = write_tasks(tmp_path / "bad.yaml", [{**entries[0], "icl_task_type": "code_evaluation"}])
    fresh = config(
        small_dataset, run_dir=str(tmp_path / "bad_run"), train={**train, "icl_tasks": str(bad)}
    )
    with pytest.raises(ConfigError, match=r"train\.icl_tasks: .*unknown task type"):
        run(fresh)
    # a gauntlet over a task that does not run would score zeros: refused, naming it
    gauntlet["categories"][0]["benchmarks"][0]["num_fewshot"] = 5
    (tmp_path / "gauntlet.yaml").write_text(json.dumps({"eval_gauntlet": gauntlet}))
    fresh = config(
        small_dataset,
        run_dir=str(tmp_path / "bad_run"),
        train={**train, "eval_gauntlet": str(tmp_path / "gauntlet.yaml")},
    )
    with pytest.raises(ConfigError, match=r"train\.eval_gauntlet: .*math benchmark arith/5-shot"):
        run(fresh)
    assert not (tmp_path / "bad_run").exists()


def test_icl_subset_keeps_the_first_batches_with_the_whole_files_few_shot_draws(tmp_path):
    from mpt_jax.evaluation.icl import prepare_tasks

    mc_rows = [{"query": f"q{i}", "choices": ["a", "b", "c"], "gold": 0} for i in range(20)]
    lm_rows = [{"context": f"c{i}", "continuation": "x"} for i in range(20)]
    tasks = [
        TaskConfig(
            label="mc",
            dataset_uri=str(write_jsonl(tmp_path / "mc.jsonl", mc_rows)),
            num_fewshot=(2,),
            icl_task_type="multiple_choice",
        ),
        TaskConfig(
            label="lm",
            dataset_uri=str(write_jsonl(tmp_path / "lm.jsonl", lm_rows)),
            num_fewshot=(0,),
            icl_task_type="language_modeling",
        ),
    ]
    tokenizer = IclTokenizer(load_tokenizer("byte"))
    whole = prepare_tasks(tasks, tokenizer, 64)
    # 2 batches of 5 rows, rounded up to 6 for 2 data-parallel devices: 6 // 3 choices = 2
    # questions a batch (llm-foundry's batch_size // num_choices), 6 language-modeling prompts
    subset = prepare_tasks(tasks, tokenizer, 64, subset_num_batches=2, batch_size=5, row_multiple=2)
    assert [len(j.prompts) for j in whole] == [20, 20]
    assert [len(j.prompts) for j in subset] == [4, 12]
    # the gauntlet weighs each benchmark by its dataset's size, as llm-foundry's num_samples,
    # not by the subset scored (SAMPLE_SZ would weigh mc 4 against lm 12)
    from mpt_jax.evaluation.icl import _summarize, benchmark_sizes

    results = [_summarize([(j, [{"correct": True}] * len(j.prompts), 0.0)], False) for j in subset]
    assert [r["samples"] for r in results] == [4, 12]
    assert benchmark_sizes(results) == {"mc/2-shot": 20, "lm/0-shot": 20}
    with pytest.raises(ConfigError, match=r"num_fewshot: 0 is given twice in \[0, 1, 0\]"):
        TaskConfig(
            label="lm", dataset_uri="x", num_fewshot=(0, 1, 0), icl_task_type="language_modeling"
        )
    for part, full in zip(subset, whole, strict=True):
        assert part.prompts == full.prompts[: len(part.prompts)]  # the same few-shot draws
        seqs = full.sequences[: len(part.sequences)]
        assert all(
            np.array_equal(a, b) and i == j
            for (a, i), (b, j) in zip(part.sequences, seqs, strict=True)
        )


def test_greedy_projects_the_last_positions_to_the_models_own_logits_in_bf16():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mpt_jax.evaluation.scoring import last_logits
    from mpt_jax.model import MPTForCausalLM

    cfg = ModelConfig.from_dict({**TINY_MODEL, "max_seq_len": 64, "logit_scale": 0.37})
    model = MPTForCausalLM(cfg, rngs=nnx.Rngs(1), dtype=jnp.bfloat16)  # amp: fp32 parameters
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 258, (8, 48)).astype(np.int32)
    last = rng.integers(1, 48, (8, 1)).astype(np.int32)
    got = jax.jit(lambda st, i, k: last_logits(nnx.merge(graphdef, st), i, k))(state, ids, last)
    # the head rounds its product to bf16, then scales: bit for bit, as torch does
    logits = jax.jit(lambda st, i: nnx.merge(graphdef, st)(i))(state, ids)
    want = np.take_along_axis(np.asarray(logits, np.float32), last[..., None], 1)[:, 0]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_processes_with_task_files_that_differ_in_settings_get_other_digests(tmp_path):
    from mpt_jax.evaluation.during_training import IclDuringTraining

    rows = [{"context": f"Q{i}:", "answer": "yes"} for i in range(4)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    task = {
        "label": "qa",
        "dataset_uri": "qa.jsonl",
        "num_fewshot": [0],
        "icl_task_type": "generation_task_with_answers",
    }
    digests = []
    for extra in ({}, {}, {"early_stopping_criteria": ["\n"]}, {"batch_size": 2}):
        path = write_tasks(tmp_path / f"t{len(digests)}.yaml", [{**task, **extra}])
        icl = IclDuringTraining(
            str(path), None, load_tokenizer("byte"), max_seq_len=32, batch_size=8
        )
        digests.append(icl.digest())
    # the same file twice: equal; a stop sequence or a batch size: other programs, refused
    assert digests[0] == digests[1] and len(set(digests)) == 3
