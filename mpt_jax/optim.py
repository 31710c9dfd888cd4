"""composer / llm-foundry optimizers and LR schedules as jit-friendly optax transformations."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mpt_jax.config import ConfigError, OptimConfig, ScheduleConfig, split_time

OPTIMIZERS = ("decoupled_adamw", "decoupled_lionw", "adamw")
SCHEDULES = (
    "cosine_with_warmup",
    "linear_decay_with_warmup",
    "constant_with_warmup",
    "inv_sqrt_with_warmup",
)
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6)

Step = jax.Array | int
Multiplier = Callable[[Step], jax.Array]


# ---------------------------------------------------------------------------------------------
# Time strings and LR multiplier schedules


def time_to_steps(
    value: str,
    *,
    total_steps: int,
    tokens_per_step: int,
    global_batch: int,
    total_tokens: int | None = None,
) -> float:
    """A composer time string (`100ba`, `2e9tok`, `512sp`, `0.05dur`) in optimizer steps.

    `total_tokens`: the run's length when given in tokens (`train.tokens`), else None.
    """
    number, unit = split_time(value, "time")
    if unit == "dur":
        # composer takes a duration fraction in the unit of the run's length, rounding down:
        # whole batches, or whole tokens of a token budget (which may fall between steps)
        if total_tokens is not None:
            return int(number * total_tokens) / tokens_per_step
        return float(int(number * total_steps))
    per_step = {"ba": 1, "tok": tokens_per_step, "sp": global_batch}[unit]
    if per_step <= 0:
        raise ConfigError(f"time {value!r}: needs a positive number of {unit} per step")
    return number / per_step


def _fraction(t: jax.Array, start: float, span: float) -> jax.Array:
    """(t - start) / span clipped to [0, 1]; a span <= 0 stays at 0, as composer's does."""
    if span <= 0:
        return jnp.zeros_like(t)
    return jnp.clip((t - start) / span, 0.0, 1.0)


def _with_warmup(t: jax.Array, tw: float, peak: float, after: jax.Array) -> jax.Array:
    """Linear 0 -> peak over tw steps, then `after` (composer's LinearScheduler warmup)."""
    if tw <= 0:
        return after
    return jnp.where(t < tw, peak * t / tw, after)


def _cosine(cfg: ScheduleConfig, tw: float, tm: float) -> Callable[[jax.Array], jax.Array]:
    def after(t: jax.Array) -> jax.Array:
        x = _fraction(t, tw, tm - tw)
        return cfg.alpha_f + (1.0 - cfg.alpha_f) * 0.5 * (1.0 + jnp.cos(jnp.pi * x))

    return after


def _linear(cfg: ScheduleConfig, tw: float, tm: float) -> Callable[[jax.Array], jax.Array]:
    return lambda t: cfg.alpha_i + (cfg.alpha_f - cfg.alpha_i) * _fraction(t, tw, tm - tw)


def _constant(cfg: ScheduleConfig) -> Callable[[jax.Array], jax.Array]:
    # composer builds ConstantWithWarmupScheduler as a linear schedule from alpha to alpha, so it
    # stays at alpha after t_max (its docstring's "1.0 otherwise" is ConstantScheduler's)
    return lambda t: jnp.full_like(t, cfg.alpha)


def _inv_sqrt(
    cfg: ScheduleConfig, tw: float, tm: float, ts: float, tc: float
) -> Callable[[jax.Array], jax.Array]:
    if ts <= 0:
        raise ConfigError("schedule.t_scale: must be > 0 for inv_sqrt_with_warmup")
    start = max(tw, tm - tc)  # where the linear cooldown begins
    af = cfg.alpha_f_decay
    at_start = af + (1.0 - af) / math.sqrt((start - tw + ts) / ts)

    def after(t: jax.Array) -> jax.Array:
        # clamped so the (masked) warmup steps never take a sqrt of a negative number
        decay = af + (1.0 - af) * jax.lax.rsqrt((jnp.maximum(t, tw) - tw + ts) / ts)
        if tc <= 0:
            return jnp.where(t < start, decay, at_start)
        cool = at_start + (cfg.alpha_f_cooldown - at_start) * _fraction(t, start, tc)
        return jnp.where(t < start, decay, cool)

    return after


def lr_multiplier(
    cfg: ScheduleConfig,
    *,
    total_steps: int,
    tokens_per_step: int,
    global_batch: int,
    total_tokens: int | None = None,
) -> Multiplier:
    """alpha(t) for the update at 0-based step t (scalar or array), in float32, jit-friendly."""
    steps = functools.partial(
        time_to_steps,
        total_steps=total_steps,
        tokens_per_step=tokens_per_step,
        global_batch=global_batch,
        total_tokens=total_tokens,
    )
    tw, tm = steps(cfg.t_warmup), steps(cfg.t_max)
    if cfg.name == "cosine_with_warmup":
        peak, after = 1.0, _cosine(cfg, tw, tm)
    elif cfg.name == "linear_decay_with_warmup":
        peak, after = cfg.alpha_i, _linear(cfg, tw, tm)
    elif cfg.name == "constant_with_warmup":
        peak, after = cfg.alpha, _constant(cfg)
    elif cfg.name == "inv_sqrt_with_warmup":
        peak, after = 1.0, _inv_sqrt(cfg, tw, tm, steps(cfg.t_scale), steps(cfg.t_cooldown))
    else:
        raise ConfigError(f"schedule.name: must be one of {', '.join(SCHEDULES)}, got {cfg.name!r}")

    def multiplier(step: Step) -> jax.Array:
        t = jnp.asarray(step).astype(jnp.float32)
        return _with_warmup(t, tw, peak, after(t)).astype(jnp.float32)

    return multiplier


# ---------------------------------------------------------------------------------------------
# Gradient clipping


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf of a pytree, accumulated in float32."""
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(tree):
        total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return jnp.sqrt(total)


def clip_by_global_norm(threshold: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by threshold / (norm + 1e-6) when that is < 1."""

    def update(grads: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        del params
        coef = jnp.minimum(threshold / (global_norm(grads) + CLIP_EPS), 1.0)
        scaled = jax.tree.map(lambda g: (g.astype(jnp.float32) * coef).astype(g.dtype), grads)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ---------------------------------------------------------------------------------------------
# Optimizers: updates u with p_new = p + u, weight decay on every parameter


class AdamState(NamedTuple):
    """Updates applied so far (the next update's step index) and Adam's moments."""

    count: jax.Array
    mu: Any
    nu: Any


class LionState(NamedTuple):
    """Updates applied so far (the next update's step index) and Lion's momentum."""

    count: jax.Array
    mu: Any


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _ema(old: jax.Array, new: jax.Array, beta: float) -> jax.Array:
    """beta * old + (1 - beta) * new in float32."""
    return beta * _f32(old) + (1.0 - beta) * _f32(new)


def _need_params(params: Any) -> Any:
    if params is None:
        raise ValueError("this optimizer applies weight decay: pass params to update()")
    return params


def _zeros_like(params: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, params)


def _adam(
    lr_fn: Multiplier, decay_fn: Multiplier, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """Bias-corrected Adam; p <- p - decay_fn(t) * p - lr_fn(t) * m_hat / (sqrt(v_hat) + eps)."""

    def init(params: Any) -> AdamState:
        return AdamState(jnp.zeros((), jnp.int32), _zeros_like(params), _zeros_like(params))

    def update(grads: Any, state: AdamState, params: Any = None) -> tuple[Any, AdamState]:
        params = _need_params(params)
        k = _f32(state.count + 1)
        bc1, bc2 = 1.0 - jnp.float32(b1) ** k, 1.0 - jnp.float32(b2) ** k
        lr, decay = lr_fn(state.count), decay_fn(state.count)
        mu = jax.tree.map(lambda m, g: _ema(m, g, b1), state.mu, grads)
        nu = jax.tree.map(lambda v, g: _ema(v, jnp.square(_f32(g)), b2), state.nu, grads)

        def step(p: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
            direction = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
            return (-decay * _f32(p) - lr * direction).astype(p.dtype)

        updates = jax.tree.map(step, params, mu, nu)
        new_state = AdamState(state.count + 1, _cast_like(mu, state.mu), _cast_like(nu, state.nu))
        return updates, new_state

    return optax.GradientTransformation(init, update)


def _lion(
    lr_fn: Multiplier, decay_fn: Multiplier, b1: float, b2: float
) -> optax.GradientTransformation:
    """DecoupledLionW: p <- p - decay_fn(t) * p - lr_fn(t) * sign(b1 m + (1 - b1) g)."""

    def init(params: Any) -> LionState:
        return LionState(jnp.zeros((), jnp.int32), _zeros_like(params))

    def update(grads: Any, state: LionState, params: Any = None) -> tuple[Any, LionState]:
        params = _need_params(params)
        lr, decay = lr_fn(state.count), decay_fn(state.count)

        def step(p: jax.Array, m: jax.Array, g: jax.Array) -> jax.Array:
            direction = jnp.sign(_ema(m, g, b1))
            return (-decay * _f32(p) - lr * direction).astype(p.dtype)

        updates = jax.tree.map(step, params, state.mu, grads)
        mu = jax.tree.map(lambda m, g: _ema(m, g, b2).astype(m.dtype), state.mu, grads)
        return updates, LionState(state.count + 1, mu)

    return optax.GradientTransformation(init, update)


def _cast_like(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda x, ref: x.astype(ref.dtype), tree, like)


def make_optimizer(
    optim: OptimConfig,
    schedule: ScheduleConfig,
    *,
    total_steps: int,
    tokens_per_step: int,
    global_batch: int,
    total_tokens: int | None = None,
) -> optax.GradientTransformation:
    """Global-norm clipping (if set), then the optimizer at lr_t; the state holds the step count."""
    alpha = lr_multiplier(
        schedule,
        total_steps=total_steps,
        tokens_per_step=tokens_per_step,
        global_batch=global_batch,
        total_tokens=total_tokens,
    )
    lr_fn = lambda t: optim.lr * alpha(t)
    wd = optim.weight_decay
    b1, b2 = optim.betas
    if optim.name == "decoupled_adamw":
        # composer scales the decay by lr_t / lr_0 = alpha(t), not by lr_t
        core = _adam(lr_fn, lambda t: wd * alpha(t), b1, b2, optim.eps)
    elif optim.name == "decoupled_lionw":
        core = _lion(lr_fn, lambda t: wd * alpha(t), b1, b2)
    elif optim.name == "adamw":
        core = _adam(lr_fn, lambda t: wd * lr_fn(t), b1, b2, optim.eps)
    else:
        raise ConfigError(f"optim.name: must be one of {', '.join(OPTIMIZERS)}, got {optim.name!r}")
    if optim.clipping_threshold is None:
        return optax.chain(core)
    return optax.chain(clip_by_global_norm(optim.clipping_threshold), core)


def update_count(opt_state: Any) -> jax.Array:
    """Updates applied so far (the step index of the next update), from make_optimizer's state."""
    is_state = lambda x: isinstance(x, AdamState | LionState)
    for node in jax.tree.leaves(opt_state, is_leaf=is_state):
        if is_state(node):
            return node.count
    raise ValueError("not a make_optimizer state: no AdamState or LionState inside")
