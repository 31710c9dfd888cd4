"""Schedules and optimizers against plain-Python and float64 NumPy forms of composer's math."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mpt_jax.config import ConfigError, OptimConfig, ScheduleConfig, run_config_from_dict
from mpt_jax.optim import (
    AdamState,
    LionState,
    global_norm,
    lr_multiplier,
    make_optimizer,
    time_to_steps,
    update_count,
)

TOTAL, TOK_PER_STEP, BATCH = 120, 1024, 4
KW = {"total_steps": TOTAL, "tokens_per_step": TOK_PER_STEP, "global_batch": BATCH}

# ---------------------------------------------------------------------------------------------
# Time strings


@pytest.mark.parametrize(
    ("value", "steps"),
    [
        ("100ba", 100.0),
        ("0ba", 0.0),
        ("2048tok", 2.0),
        ("5000tok", 5000 / 1024),
        ("6sp", 1.5),
        ("0.05dur", 6.0),
        ("1dur", 120.0),
        ("1e3ba", 1000.0),
    ],
)
def test_time_to_steps(value, steps):
    assert time_to_steps(value, **KW) == pytest.approx(steps, rel=1e-15)


@pytest.mark.parametrize("value", ["100", "3ep", "-1ba", "xba"])
def test_time_to_steps_rejects_bad_strings(value):
    with pytest.raises(ConfigError):
        time_to_steps(value, **KW)


@pytest.mark.parametrize("value", ["2.5ba", "100.5tok", "1e-3ba", "1.5sp"])
def test_fractional_counts_are_refused_as_composer_does(value):
    # composer's Time: batches, samples and tokens are integers; only dur is a fraction
    with pytest.raises(ConfigError, match=rf"'{value}' is not a whole number of"):
        time_to_steps(value, **KW)


# ---------------------------------------------------------------------------------------------
# Schedules: closed forms in plain Python, t and all times in (fractional) steps


def ref_cosine(t, tw, tm, alpha_f):
    if t < tw:
        return t / tw
    x = min(1.0, max(0.0, (t - tw) / (tm - tw)))
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * x))


def ref_linear(t, tw, tm, alpha_i, alpha_f):
    if t < tw:
        return alpha_i * t / tw
    return alpha_i + (alpha_f - alpha_i) * min(1.0, (t - tw) / (tm - tw))


def ref_constant(t, tw, alpha):
    # composer: LinearWithWarmupScheduler(alpha_i=alpha, alpha_f=alpha): alpha, also after t_max
    return alpha * t / tw if t < tw else alpha


def ref_inv_sqrt(t, tw, tm, ts, tc, af_decay, af_cool):
    if t < tw:
        return t / tw
    start = max(tw, tm - tc)

    def decay(s):
        return af_decay + (1 - af_decay) / math.sqrt((s - tw + ts) / ts)

    if t < start:
        return decay(t)
    if tc == 0:
        return decay(start)
    return decay(start) + min(1.0, (t - start) / tc) * (af_cool - decay(start))


SCHEDULE_CASES = {
    "cosine": (
        ScheduleConfig(t_warmup="10ba", alpha_f=0.1),
        lambda t: ref_cosine(t, 10, TOTAL, 0.1),
    ),
    "cosine_frac_warmup": (
        ScheduleConfig(t_warmup="0.05dur"),
        lambda t: ref_cosine(t, 6.0, TOTAL, 0.0),
    ),
    "cosine_frac_warmup_odd": (
        ScheduleConfig(t_warmup="0.0625dur", t_max="0.9dur", alpha_f=0.2),
        lambda t: ref_cosine(t, 7, 108, 0.2),  # 0.0625 * 120 = 7.5 batches, rounded down
    ),
    "cosine_token_warmup": (
        ScheduleConfig(t_warmup="5000tok", t_max="100000tok", alpha_f=0.1),
        lambda t: ref_cosine(t, 5000 / 1024, 100000 / 1024, 0.1),
    ),
    "cosine_sample_warmup": (
        ScheduleConfig(t_warmup="30sp", alpha_f=0.1),
        lambda t: ref_cosine(t, 7.5, TOTAL, 0.1),
    ),
    "cosine_no_warmup": (
        ScheduleConfig(t_warmup="0ba", alpha_f=0.1),
        lambda t: ref_cosine(t, 0, TOTAL, 0.1),
    ),
    "linear": (
        ScheduleConfig(name="linear_decay_with_warmup", t_warmup="10ba", alpha_i=0.8, alpha_f=0.05),
        lambda t: ref_linear(t, 10, TOTAL, 0.8, 0.05),
    ),
    "linear_tmax_frac": (
        ScheduleConfig(
            name="linear_decay_with_warmup", t_warmup="0.05dur", t_max="0.75dur", alpha_f=0.1
        ),
        lambda t: ref_linear(t, 6.0, 90, 1.0, 0.1),
    ),
    "constant": (
        ScheduleConfig(name="constant_with_warmup", t_warmup="10ba", alpha=0.5, t_max="60ba"),
        lambda t: ref_constant(t, 10, 0.5),
    ),
    "constant_default": (
        ScheduleConfig(name="constant_with_warmup", t_warmup="2500tok"),
        lambda t: ref_constant(t, 2500 / 1024, 1.0),
    ),
    "inv_sqrt": (
        ScheduleConfig(
            name="inv_sqrt_with_warmup",
            t_warmup="10ba",
            t_scale="20ba",
            t_cooldown="30ba",
            alpha_f_decay=0.2,
            alpha_f_cooldown=0.05,
        ),
        lambda t: ref_inv_sqrt(t, 10, TOTAL, 20, 30, 0.2, 0.05),
    ),
    "inv_sqrt_no_cooldown": (
        ScheduleConfig(name="inv_sqrt_with_warmup", t_warmup="10ba", t_scale="5ba", t_max="80ba"),
        lambda t: ref_inv_sqrt(t, 10, 80, 5, 0, 0.0, 0.0),
    ),
    "inv_sqrt_tokens": (
        ScheduleConfig(
            name="inv_sqrt_with_warmup",
            t_warmup="9000tok",
            t_scale="4096tok",
            t_cooldown="20000tok",
            alpha_f_decay=0.1,
        ),
        lambda t: ref_inv_sqrt(t, 9000 / 1024, TOTAL, 4.0, 20000 / 1024, 0.1, 0.0),
    ),
    "inv_sqrt_long_cooldown": (
        ScheduleConfig(
            name="inv_sqrt_with_warmup", t_warmup="10ba", t_scale="10ba", t_cooldown="500ba"
        ),
        lambda t: ref_inv_sqrt(t, 10, TOTAL, 10, 500, 0.0, 0.0),
    ),
}


@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_schedule_matches_closed_form(case):
    cfg, ref = SCHEDULE_CASES[case]
    alpha = lr_multiplier(cfg, **KW)
    steps = np.arange(0, TOTAL + 30)  # past the end too
    got = np.asarray(alpha(jnp.asarray(steps, jnp.int32)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [ref(float(t)) for t in steps], rtol=2e-6, atol=2e-7)
    # scalar Python ints and jit-traced steps give the same values
    for t in (0, 1, 6, 7, 10, 11, 59, 60, 90, TOTAL - 1, TOTAL, TOTAL + 29):
        assert float(alpha(t)) == pytest.approx(ref(float(t)), rel=2e-6, abs=2e-7)
    # jit may fuse differently from op-by-op eager execution: equal up to float32 rounding
    np.testing.assert_allclose(jax.jit(alpha)(jnp.asarray(steps)), got, rtol=3e-7, atol=1e-7)


def test_a_token_budget_takes_dur_in_tokens_as_composer():
    # max_duration 1000tok at 256 tokens per step: composer's 0.5dur is 500tok and 1dur 1000tok,
    # and the schedule reads the tokens seen before each update (4 updates, the last partial)
    cfg = ScheduleConfig(t_warmup="0.5dur", alpha_f=0.1)
    budget = dict(total_steps=4, tokens_per_step=256, global_batch=8, total_tokens=1000)
    alpha = lr_multiplier(cfg, **budget)

    def composer(tokens_seen):
        if tokens_seen < 500:
            return tokens_seen / 500
        x = min(1.0, (tokens_seen - 500) / (1000 - 500))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x))

    for step in range(4):
        assert float(alpha(step)) == pytest.approx(composer(256 * step), rel=1e-6)
    # in batches, the run's length in steps: 0.5dur of 4 steps is 2
    by_steps = lr_multiplier(cfg, **{**budget, "total_tokens": None})
    assert [float(by_steps(t)) for t in (1, 2)] == [0.5, 1.0]


def test_warmup_starts_at_zero_and_ends_at_peak():
    alpha = lr_multiplier(ScheduleConfig(t_warmup="10ba", alpha_f=0.1), **KW)
    assert float(alpha(0)) == 0.0
    assert float(alpha(5)) == pytest.approx(0.5)
    assert float(alpha(10)) == 1.0  # the boundary step already uses the decay branch
    assert float(alpha(TOTAL)) == pytest.approx(0.1)


def test_constant_schedule_keeps_alpha_after_t_max():
    cfg = ScheduleConfig(name="constant_with_warmup", t_warmup="0ba", alpha=0.3, t_max="50ba")
    alpha = lr_multiplier(cfg, **KW)
    for t in (0, 49, 50, TOTAL + 5):
        assert float(alpha(t)) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "name, after", [("cosine_with_warmup", 1.0), ("linear_decay_with_warmup", 0.7)]
)
def test_t_max_not_after_warmup_stays_at_the_start(name, after):
    # composer: frac_of_total = 0.0 unless t_max > t_warmup, so the decay never starts
    cfg = ScheduleConfig(name=name, t_warmup="10ba", t_max="10ba", alpha_i=0.7, alpha_f=0.25)
    values = np.asarray(lr_multiplier(cfg, **KW)(jnp.arange(20)))
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values[10:], after)


@pytest.mark.parametrize(
    "train, t_max, refused",
    [
        ({"steps": 100}, "1dur", False),
        ({"steps": 100}, "100ba", False),
        ({"steps": 100}, "150ba", False),
        ({"steps": 100}, "99ba", True),
        ({"steps": 100}, "0.995dur", True),  # composer rounds 99.5 batches down
        ({"steps": 100}, "1000tok", False),  # units composer cannot compare: passed
        ({"tokens": 4096}, "4000tok", True),
        ({"tokens": 4096}, "4096tok", False),
    ],
)
def test_t_max_before_the_end_of_the_run_is_refused(tmp_path, train, t_max, refused):
    from helpers import raw_config

    raw = raw_config(tmp_path, schedule={"t_max": t_max})
    raw["train"] = {**{k: v for k, v in raw["train"].items() if k != "steps"}, **train}
    if not refused:
        assert run_config_from_dict(raw).schedule.t_max == t_max
        return
    with pytest.raises(ConfigError, match=rf"schedule\.t_max: '{t_max}' ends before the run"):
        run_config_from_dict(raw)


# ---------------------------------------------------------------------------------------------
# Optimizers: 5 steps against float64 NumPy transcriptions

LR, WD, THRESHOLD = 0.01, 0.1, 1.0
WARMUP = ScheduleConfig(t_warmup="2ba", alpha_f=0.1)
N_STEPS = 5


def ref_alpha(t):
    return ref_cosine(t, 2, N_STEPS, 0.1)


def make_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((4, 3)), dtype),
        "b": jnp.asarray(rng.standard_normal(5), dtype),
    }


def make_grads(dtype=jnp.float32):
    """Step 1 and 3 gradients are large enough that the global-norm clip triggers."""
    rng = np.random.default_rng(1)
    scales = [0.05, 5.0, 0.05, 3.0, 0.1]
    return [
        {
            "w": jnp.asarray(s * rng.standard_normal((4, 3)), dtype),
            "b": jnp.asarray(s * rng.standard_normal(5), dtype),
        }
        for s in scales
    ]


def clip(grads, threshold):
    if threshold is None:
        return grads, False
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads.values()))
    coef = threshold / (norm + 1e-6)
    if coef < 1:
        return {k: g * coef for k, g in grads.items()}, True
    return grads, False


def reference(name, params, grads_seq, b1, b2, eps=1e-8, threshold=THRESHOLD):
    """Parameters after each step (float64) and whether each step clipped."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out, clipped = [], []
    for t, raw in enumerate(grads_seq):
        g, did_clip = clip({k: np.asarray(x, np.float64) for k, x in raw.items()}, threshold)
        clipped.append(did_clip)
        a = ref_alpha(t)
        lr_t = LR * a
        for k in p:
            if name == "decoupled_lionw":
                p[k] = p[k] * (1 - a * WD)
                p[k] = p[k] - lr_t * np.sign(b1 * m[k] + (1 - b1) * g[k])
                m[k] = b2 * m[k] + (1 - b2) * g[k]
                continue
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            direction = (m[k] / (1 - b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - b2 ** (t + 1))) + eps)
            if name == "decoupled_adamw":
                p[k] = p[k] * (1 - a * WD) - lr_t * direction
            else:  # optax-style adamw: the decay is scaled by lr_t
                p[k] = p[k] - lr_t * (direction + WD * p[k])
        out.append({k: x.copy() for k, x in p.items()})
    return out, clipped


def optim_config(name, betas=(0.9, 0.95)):
    return OptimConfig(name=name, lr=LR, betas=betas, weight_decay=WD, clipping_threshold=THRESHOLD)


def build(name, betas=(0.9, 0.95)):
    return make_optimizer(
        optim_config(name, betas), WARMUP, total_steps=N_STEPS, tokens_per_step=64, global_batch=2
    )


def run(tx, params, grads_seq, update=None):
    update = update or tx.update
    state = tx.init(params)
    history = []
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


OPTIM_CASES = [
    ("decoupled_adamw", (0.9, 0.95)),
    ("decoupled_lionw", (0.9, 0.99)),
    ("adamw", (0.9, 0.95)),
]


@pytest.mark.parametrize(("name", "betas"), OPTIM_CASES)
def test_optimizer_matches_reference(name, betas):
    params, grads_seq = make_params(), make_grads()
    history, state = run(build(name, betas), params, grads_seq)
    expected, clipped = reference(name, params, grads_seq, *betas)
    assert clipped == [False, True, False, True, False]
    for got, want in zip(history, expected, strict=True):
        for k in want:
            np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, atol=1e-7)
    assert int(update_count(state)) == N_STEPS


@pytest.mark.parametrize(("name", "betas"), OPTIM_CASES)
def test_lr_zero_at_step_zero_leaves_params_unchanged(name, betas):
    params, grads_seq = make_params(), make_grads()
    history, state = run(build(name, betas), params, grads_seq[:1])
    for k in params:
        np.testing.assert_array_equal(np.asarray(history[0][k]), np.asarray(params[k]))
    # the moments still moved, as composer's optimizer steps with lr 0
    core = state[-1]
    assert float(jnp.abs(core.mu["w"]).sum()) > 0


@pytest.mark.parametrize(("name", "betas"), OPTIM_CASES)
def test_jit_matches_eager(name, betas):
    tx = build(name, betas)
    params, grads_seq = make_params(), make_grads()
    eager, eager_state = run(tx, params, grads_seq)
    jitted, jit_state = run(tx, params, grads_seq, update=jax.jit(tx.update))
    for got, want in zip(jitted, eager, strict=True):
        for k in want:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)
    assert int(update_count(jit_state)) == int(update_count(eager_state))


@pytest.mark.parametrize(("name", "betas"), OPTIM_CASES)
def test_bf16_params(name, betas):
    params, grads_seq = make_params(jnp.bfloat16), make_grads(jnp.bfloat16)
    tx = build(name, betas)
    history, state = run(tx, params, grads_seq, update=jax.jit(tx.update))
    core = state[-1]
    assert isinstance(core, AdamState | LionState)
    for leaf in jax.tree.leaves((history[-1], core.mu)):
        assert leaf.dtype == jnp.bfloat16
    expected, _ = reference(name, params, grads_seq, *betas)
    for k in params:
        final = np.asarray(history[-1][k], np.float32)
        assert not np.array_equal(final, np.asarray(params[k], np.float32))
        np.testing.assert_allclose(final, expected[-1][k], rtol=2e-2, atol=2e-2)


def test_no_clipping_and_sharded_params():
    mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)}
    # varying scales: clipping would change Adam's result, unlike a constant rescaling
    grads_seq = [
        {"w": jnp.asarray(s * rng.standard_normal((16, 4)), jnp.float32)} for s in (30, 1, 3)
    ]
    cfg = OptimConfig(lr=LR, weight_decay=WD, clipping_threshold=None)
    tx = make_optimizer(cfg, WARMUP, total_steps=N_STEPS, tokens_per_step=64, global_batch=2)
    sharded = jax.device_put(params, shard)
    step = jax.jit(tx.update)
    state = tx.init(sharded)
    for grads in grads_seq:
        updates, state = step(jax.device_put(grads, shard), state, sharded)
        sharded = optax.apply_updates(sharded, updates)
    assert sharded["w"].sharding.is_equivalent_to(shard, 2)
    assert update_count(state).shape == ()
    unclipped, _ = reference("decoupled_adamw", params, grads_seq, 0.9, 0.95, threshold=None)
    clipped, _ = reference("decoupled_adamw", params, grads_seq, 0.9, 0.95)
    got = np.asarray(sharded["w"])
    np.testing.assert_allclose(got, unclipped[-1]["w"], rtol=1e-6, atol=1e-7)
    assert np.abs(got - clipped[-1]["w"]).max() > 1e-4


def test_update_needs_params():
    tx = build("decoupled_adamw")
    params = make_params()
    with pytest.raises(ValueError, match="params"):
        tx.update(make_grads()[0], tx.init(params))


def test_global_norm():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.ones(4, jnp.bfloat16)]}
    want = math.sqrt(sum(x * x for x in range(6)) + 4)
    got = global_norm(tree)
    assert got.dtype == jnp.float32
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(global_norm({})) == 0.0
