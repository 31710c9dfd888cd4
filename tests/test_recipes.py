"""experiments/recipes: every file loads, matches llm-foundry's table and its own arithmetic."""

import re
from pathlib import Path

import pytest

from mpt_jax.config import count_params, load_run_config

RECIPES = Path(__file__).resolve().parent.parent / "experiments" / "recipes"

# llm-foundry's pretraining yamls: lr, global batch, max_duration (batches), activation ckpt
LLM_FOUNDRY = {
    "125m": ("6.0e-4", 256, 4800, False),
    "350m": ("3.0e-4", 256, 13400, False),
    "760m": ("2.5e-4", 256, 29000, False),
    "1b": ("2.0e-4", 512, 24800, False),
    "3b": ("1.6e-4", 512, 51500, True),
    "7b": ("1.2e-4", 1024, 63900, True),
    "13b": ("1.0e-4", 1024, 124000, True),
    "30b": ("1.0e-4", 2048, 143100, True),
    "70b": ("8.0e-5", 2048, 333800, True),
}


@pytest.mark.parametrize("size", sorted(LLM_FOUNDRY))
def test_pretraining_recipes_match_llm_foundry(size):
    path = RECIPES / f"mpt-{size}.yaml"
    cfg = load_run_config(path)
    lr, batch, steps, ckpt = LLM_FOUNDRY[size]
    assert cfg.optim.name == "decoupled_adamw" and cfg.optim.lr == float(lr)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.0
    assert cfg.optim.clipping_threshold == 1.0 and cfg.train.precision == "amp_bf16"
    assert cfg.train.mixed_precision == "PURE"  # fsdp_config.mixed_precision
    assert cfg.schedule.name == "cosine_with_warmup" and cfg.schedule.t_warmup == "100ba"
    assert cfg.schedule.alpha_f == 0.1 and cfg.train.seed == 17
    assert (cfg.train.global_batch, cfg.total_steps) == (batch, steps)
    assert (cfg.train.remat == "full") == ckpt
    assert cfg.seq_len == 2048 and cfg.model.vocab_size == 50368 and cfg.model.learned_pos_emb
    # the arithmetic in the comments is right
    text = path.read_text()
    per_step, total = (int(x.replace(",", "")) for x in re.findall(r"= ([\d,]+) tokens", text))
    assert per_step == batch * 2048 and total == per_step * steps


def test_released_and_long_context_recipes():
    released = load_run_config(RECIPES / "mpt-7b-released.yaml")
    m = released.model
    assert m.alibi and m.no_bias and not m.learned_pos_emb and m.vocab_size == 50432
    assert released.optim.name == "decoupled_lionw" and released.seq_len == 2048
    assert count_params(m) == 6_649_286_656
    assert released.train.global_batch * 2048 == 3_604_480
    assert released.total_steps == 277_433  # 1T tokens, rounded up to whole steps
    long = load_run_config(RECIPES / "mpt-7b-long-context-8k.yaml")
    assert long.seq_len == 8192 and long.model.alibi and long.init_from
    assert long.train.global_batch * 8192 * long.total_steps == 52_428_800_000
    assert released.train.mixed_precision == long.train.mixed_precision == "PURE"
