"""Sharded MPT training: state init under a mesh, the pure jitted step, and the host loop."""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import yaml
from flax import nnx

from mpt_jax import metrics as metrics_lib
from mpt_jax import sharding
from mpt_jax.config import ConfigError, RunConfig, run_config_from_dict, to_dict
from mpt_jax.data import BatchLoader, DataError, check_compatible, resolve_dataset
from mpt_jax.loss import cross_entropy_sum, shift_targets
from mpt_jax.model import MPTForCausalLM
from mpt_jax.optim import global_norm, lr_multiplier, make_optimizer

PRECISIONS = {  # precision -> (param dtype, compute dtype)
    "fp32": (jnp.float32, jnp.float32),
    "amp_bf16": (jnp.float32, jnp.bfloat16),
    "pure_bf16": (jnp.bfloat16, jnp.bfloat16),
}


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm of a step was NaN or infinite."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything the step updates: parameters, optimizer state, step counter."""

    params: nnx.State
    opt_state: Any
    step: jax.Array


# ---------------------------------------------------------------------------------------------
# Model, state and step


def build_model(cfg: RunConfig) -> MPTForCausalLM:
    """An (unsharded, eager) model with the run's seed, precision and remat settings."""
    param_dtype, dtype = PRECISIONS[cfg.train.precision]
    return MPTForCausalLM(
        cfg.model,
        rngs=nnx.Rngs(cfg.train.seed),
        dtype=dtype,
        param_dtype=param_dtype,
        remat=cfg.train.remat,
    )


def _durations(cfg: RunConfig) -> dict[str, int]:
    """What composer time strings are resolved against."""
    return dict(
        total_steps=cfg.total_steps,
        tokens_per_step=cfg.train.global_batch * cfg.seq_len,
        global_batch=cfg.train.global_batch,
    )


def make_optimizer_for(cfg: RunConfig) -> optax.GradientTransformation:
    return make_optimizer(cfg.optim, cfg.schedule, **_durations(cfg))


def init_state(cfg: RunConfig, mesh: jax.sharding.Mesh):
    """(graphdef, state, state shardings), the state created sharded by jit (never replicated)."""
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, abstract_params = nnx.split(abstract)
    param_shardings = sharding.state_shardings(abstract_params, mesh)
    optimizer = make_optimizer_for(cfg)

    def create() -> TrainState:
        params = nnx.state(build_model(cfg))
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    abstract_state = jax.eval_shape(create)
    state_shardings = _state_shardings(abstract_state, param_shardings, mesh)
    state = jax.jit(create, out_shardings=state_shardings)()
    return graphdef, state, state_shardings


def _state_shardings(abstract_state: TrainState, param_shardings, mesh) -> TrainState:
    """Optimizer moments (subtrees shaped like the params) shard like them; the rest replicates."""
    params_def = jax.tree.structure(abstract_state.params)

    def like_params(node) -> bool:
        return jax.tree.structure(node) == params_def

    opt_shardings = jax.tree.map(
        lambda node: param_shardings if like_params(node) else sharding.replicated(mesh),
        abstract_state.opt_state,
        is_leaf=like_params,
    )
    return TrainState(param_shardings, opt_shardings, sharding.replicated(mesh))


def make_train_step(graphdef, cfg: RunConfig) -> Callable:
    """The pure step: microbatched, token-weighted gradients, clipping and the optimizer."""
    optimizer = make_optimizer_for(cfg)
    schedule = lr_multiplier(cfg.schedule, **_durations(cfg))
    n_micro = cfg.train.global_batch // (cfg.train.microbatch or cfg.train.global_batch)
    m = cfg.model
    uses_dropout = bool(m.resid_pdrop or m.emb_pdrop or m.attn_pdrop)
    base_key = jax.random.key(cfg.train.seed)

    def loss_sums(params, ids, seg, key):
        logits = nnx.merge(graphdef, params)(ids, segment_ids=seg, dropout_key=key)
        return cross_entropy_sum(logits, shift_targets(ids))

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        ids = batch["input_ids"]
        seg = batch.get("segment_ids")
        step_key = jax.random.fold_in(base_key, state.step) if uses_dropout else None

        def split(x):
            # rows i, i+M, i+2M, ... form microbatch i: each device keeps its own rows
            return None if x is None else x.reshape(-1, n_micro, *x.shape[1:]).swapaxes(0, 1)

        def micro(carry, xs):
            grads_acc, loss_acc, count_acc = carry
            i, ids_mb, seg_mb = xs
            key = None if step_key is None else jax.random.fold_in(step_key, i)
            (loss_sum, count), grads = grad_fn(state.params, ids_mb, seg_mb, key)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, loss_acc + loss_sum, count_acc + count), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        xs = (jnp.arange(n_micro), split(ids), split(seg))
        (grad_sum, loss_sum, count), _ = jax.lax.scan(micro, init, xs)
        # token-weighted: the mean over every counted token of the global batch
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, state.params)
        loss = loss_sum / denom
        grad_norm = global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": cfg.optim.lr * schedule(state.step),
            "tokens": count,
        }
        return TrainState(params, opt_state, state.step + 1), out

    return step


def make_eval_step(graphdef) -> Callable:
    """(params, batch) -> (loss sum, token count), jitted by the caller."""

    def eval_step(params, batch):
        logits = nnx.merge(graphdef, params)(
            batch["input_ids"], segment_ids=batch.get("segment_ids")
        )
        return cross_entropy_sum(logits, shift_targets(batch["input_ids"]))

    return eval_step


# ---------------------------------------------------------------------------------------------
# Run folder


def prepare_run_dir(cfg: RunConfig, raw: dict[str, Any], *, overwrite: bool) -> Path:
    """Create RUN_DIR with the resolved config; refuse a folder that holds a different one."""
    run_dir = Path(cfg.run_dir)
    config_path = run_dir / "config.yaml"
    resolved = yaml.safe_dump(raw, sort_keys=False)
    if config_path.is_file():
        previous = yaml.safe_load(config_path.read_text())
        if previous != raw and not overwrite:
            changed = _diff_keys(previous, raw)
            raise ConfigError(
                f"{run_dir}: holds a run with a different config ({', '.join(changed[:5])}); "
                "pass --overwrite to replace it or choose another run_dir"
            )
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = config_path.with_suffix(".yaml.tmp")
    tmp.write_text(resolved)
    tmp.replace(config_path)
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.exists():  # a restart without checkpoints starts from step 0 again
        metrics_file.unlink()
    return run_dir


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------
# The host loop


def _datasets(cfg: RunConfig, progress: bool):
    sources = (
        [(cfg.data.path, 1.0)] if cfg.data.path else [(s.path, s.weight) for s in cfg.data.mixture]
    )
    out = []
    for path, weight in sources:
        meta = resolve_dataset(
            path, seq_len=cfg.seq_len, tokenizer=cfg.data.tokenizer, progress=progress
        )
        check_compatible(
            meta, seq_len=cfg.seq_len, vocab_size=cfg.model.vocab_size, tokenizer=cfg.data.tokenizer
        )
        out.append((meta, weight))
    return out


def evaluate(eval_fn, params, datasets, cfg: RunConfig, batch_sharding) -> float:
    """Mean validation loss over the first eval_batches batches of the first dataset's val split."""
    meta = datasets[0][0]
    rows = meta.splits["val"]["rows"]
    procs = jax.process_count()
    batch = min(cfg.train.global_batch, rows // procs * procs)
    if batch <= 0:
        raise DataError(f"{meta.folder}: the val split has fewer rows than processes")
    loader = BatchLoader(
        [(meta, 1.0)],
        global_batch=batch,
        split="val",
        shuffle=False,
        repeat=False,
        segment_ids=cfg.model.attn_uses_sequence_id,
        sharding=batch_sharding,
    )
    total = count = 0.0
    try:
        for i, b in enumerate(loader):
            if i >= cfg.train.eval_batches:
                break
            s, c = eval_fn(params, b)
            total, count = total + float(s), count + float(c)
    finally:
        loader.close()
    return total / max(count, 1.0)


def run(cfg: RunConfig, *, overwrite: bool = False) -> dict:
    """Train as configured; returns the final metrics (and writes RUN_DIR)."""
    raw = to_dict(cfg)  # the resolved config: every field, the model fully expanded
    is_main = jax.process_index() == 0
    run_dir = prepare_run_dir(cfg, raw, overwrite=overwrite) if is_main else Path(cfg.run_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    if cfg.train.global_batch % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ConfigError(
            f"train.global_batch: {cfg.train.global_batch} is not a multiple of data*fsdp "
            f"({mesh.shape['data'] * mesh.shape['fsdp']})"
        )
    micro = cfg.train.microbatch or cfg.train.global_batch
    if micro % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ConfigError(f"train.microbatch: {micro} is not a multiple of data*fsdp")
    show = cfg.train.progress and is_main
    datasets = _datasets(cfg, progress=show)
    batch_sharding = sharding.batch_sharding(mesh)

    graphdef, state, state_shardings = init_state(cfg, mesh)
    step_fn = jax.jit(
        make_train_step(graphdef, cfg),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        make_eval_step(graphdef), in_shardings=(state_shardings.params, batch_sharding)
    )
    loader = BatchLoader(
        datasets,
        global_batch=cfg.train.global_batch,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        segment_ids=cfg.model.attn_uses_sequence_id,
        sharding=batch_sharding,
        num_threads=cfg.data.num_threads,
        prefetch=cfg.data.prefetch,
    )
    logger = metrics_lib.MetricsLogger(
        run_dir,
        enabled=is_main,
        wandb_project=cfg.train.wandb_project,
        wandb_mode=cfg.train.wandb_mode,
        config=raw,
    )
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind, cfg.train.precision)
    # a 10-step window, as llm-foundry's speed_monitor
    throughput = metrics_lib.Throughput.from_config(
        cfg.model, cfg.seq_len, n_devices=jax.device_count(), peak=peak, remat=cfg.train.remat
    )
    total = cfg.total_steps
    bar = _progress(total, show)
    profiler = _Profiler(cfg.train.profile, run_dir / "profile")
    final: dict[str, Any] = {}
    pending: tuple[int, dict, float, float] | None = None
    last_time = time.perf_counter()
    try:
        for step in range(total):
            profiler.at_step(step)
            t0 = time.perf_counter()
            batch = next(loader)
            data_wait = time.perf_counter() - t0
            state, out = step_fn(state, batch)
            # read step n-1's metrics only after step n is dispatched: the host never stalls
            if pending is not None:
                final = _log_step(pending, cfg, logger, throughput, bar)
            now = time.perf_counter()
            pending = (step, out, now - last_time, data_wait)
            last_time = now
            evaluate_now = cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
            if evaluate_now and step + 1 < total:
                final = _log_step(pending, cfg, logger, throughput, bar, force=True)
                pending = None
                val = evaluate(eval_fn, state.params, datasets, cfg, batch_sharding)
                logger.log(step + 1, {"val_loss": val, "val_perplexity": math.exp(min(val, 50))})
                last_time = time.perf_counter()  # evaluation time is not step time
        if pending is not None:
            final = _log_step(pending, cfg, logger, throughput, bar, force=True)
        jax.block_until_ready(state)
        val = evaluate(eval_fn, state.params, datasets, cfg, batch_sharding)
        final.update(val_loss=val, val_perplexity=math.exp(min(val, 50)))
        logger.log(total, {"val_loss": val, "val_perplexity": final["val_perplexity"]})
    finally:
        profiler.stop()
        loader.close()
        logger.close()
        bar.close()
    final["run_dir"] = str(run_dir)
    if cfg.train.export_hf and is_main:
        model = nnx.merge(graphdef, state.params)  # save_pretrained fetches tensor by tensor
        final["hf_dir"] = str(model.save_pretrained(run_dir / "hf", overwrite=True))
    return final


def _log_step(pending, cfg: RunConfig, logger, throughput, bar, force=False) -> dict:
    step, out, step_time, data_wait = pending
    values = {k: float(v) for k, v in jax.device_get(out).items()}
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        raise NonFiniteLossError(
            f"step {step}: non-finite loss {values['loss']} (grad_norm {values['grad_norm']})"
        )
    batch_tokens = cfg.train.global_batch * cfg.seq_len
    throughput.update(max(step_time, 1e-9), cfg.train.global_batch, batch_tokens)
    rates = throughput.compute()
    metrics = {
        "step": step + 1,
        "tokens": (step + 1) * batch_tokens,
        "loss": values["loss"],
        "lr": values["lr"],
        "grad_norm": values["grad_norm"],
        "tokens_per_s": rates["tokens_per_s"],
        "tflops_per_device": rates["tflops_per_device"],
        "mfu": rates.get("mfu"),
        "step_time": step_time,
        "data_wait": data_wait,
    }
    if cfg.train.remat == "full" and "hfu" in rates:
        metrics["hfu"] = rates["hfu"]
    bar.update(1)
    bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
    if force or (step + 1) % cfg.train.log_every == 0 or step == 0:
        logger.log(step + 1, {k: v for k, v in metrics.items() if k != "step"})
    return metrics


def _progress(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not show, file=sys.stderr)


class _Profiler:
    """Traces steps [first, last) of train.profile with jax.profiler (TensorBoard / Perfetto)."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path):
        self.window, self.out_dir, self.active = window, out_dir, False

    def at_step(self, step: int) -> None:
        if self.window is None:
            return
        if step == self.window[0] and not self.active:
            jax.profiler.start_trace(str(self.out_dir))
            self.active = True
        elif step == self.window[1]:
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def load_and_run(config_path: str, overrides: list[str], *, overwrite: bool = False) -> dict:
    """Load a YAML run config with overrides and train it."""
    from mpt_jax.config import apply_overrides, load_yaml

    raw = apply_overrides(load_yaml(config_path), overrides)
    cfg = run_config_from_dict(raw, where=config_path)
    return run(cfg, overwrite=overwrite)


__all__ = [
    "NonFiniteLossError",
    "TrainState",
    "build_model",
    "evaluate",
    "init_state",
    "load_and_run",
    "make_eval_step",
    "make_train_step",
    "run",
]
