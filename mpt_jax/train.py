"""Sharded MPT training: state init under a mesh, the pure jitted step, and the host loop."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.experimental import multihost_utils

from mpt_jax import checkpoint, distributed, resilience, run_log, sharding
from mpt_jax import metrics as metrics_lib
from mpt_jax.atomic_write import ASIDE, TEMPORARY, sibling_target, unwritable_reason, write_atomic
from mpt_jax.config import (
    ConfigError,
    RunConfig,
    run_config_from_dict,
    to_dict,
    with_defaults,
)
from mpt_jax.data import (
    BatchLoader,
    DataError,
    check_compatible,
    check_same_eos,
    resolve_dataset,
    tokenizer_from_spec,
)
from mpt_jax.evaluation.during_training import IclDuringTraining
from mpt_jax.evaluation.errors import EvalError
from mpt_jax.hf_checkpoint import read_config
from mpt_jax.loss import chunked_cross_entropy_sum, counted, cross_entropy_sum, shift_targets
from mpt_jax.loss_spikes import LossSpikeError, LossSpikeMonitor
from mpt_jax.memory import (
    compiled_bytes,
    describe_bytes,
    device_memory_bytes,
    memory_in_use_gib,
)
from mpt_jax.model import MPTForCausalLM
from mpt_jax.optim import global_norm, lr_multiplier, make_optimizer, update_count

PRECISIONS = {  # precision -> (param dtype, compute dtype)
    "fp32": (jnp.float32, jnp.float32),
    "amp_bf16": (jnp.float32, jnp.bfloat16),
    "pure_bf16": (jnp.bfloat16, jnp.bfloat16),
}


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm of a step was NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class _Divergence:
    """What calls for a rollback: `where` for messages; the updates from `first_step` on (1-based)
    were applied and must be undone (None: non-finite ones, which were skipped)."""

    where: str
    step: int  # the step that revealed it
    handed_out: int  # data batches handed out through that step: the skip ends there
    first_step: int | None
    error: type[Exception]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything the step updates: parameters, optimizer state and counters."""

    params: nnx.State
    opt_state: Any
    step: jax.Array  # updates attempted (skipped ones included)
    skipped_steps: jax.Array  # updates skipped for a non-finite loss or gradient norm
    bad_streak: jax.Array  # consecutive skipped updates up to now

    def counters(self) -> dict[str, jax.Array]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak,
        }


# ---------------------------------------------------------------------------------------------
# Model, state and step


def compute_params(cfg: RunConfig, params: nnx.State) -> nnx.State:
    """The parameters the forward and backward passes see: with `train.mixed_precision` DEFAULT
    or PURE each is cast to the compute dtype, as FSDP's param_dtype does; else as stored.

    The gradients still reach the stored (float32) parameters through the cast."""
    if cfg.train.mixed_precision == "FULL":
        return params
    _, dtype = PRECISIONS[cfg.train.precision]
    return jax.tree.map(lambda p: p.astype(dtype), params)


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


def _durations(cfg: RunConfig) -> dict[str, int | None]:
    """What composer time strings are resolved against."""
    return dict(
        total_steps=cfg.total_steps,
        tokens_per_step=cfg.train.global_batch * cfg.seq_len,
        global_batch=cfg.train.global_batch,
        total_tokens=cfg.train.tokens,
    )


def make_optimizer_for(cfg: RunConfig) -> optax.GradientTransformation:
    return make_optimizer(cfg.optim, cfg.schedule, **_durations(cfg))


def _creator(cfg: RunConfig) -> Callable[[], TrainState]:
    optimizer = make_optimizer_for(cfg)

    def create() -> TrainState:
        params = nnx.state(build_model(cfg))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(params, optimizer.init(params), zero, zero, zero)

    return create


def abstract_state(cfg: RunConfig, mesh: jax.sharding.Mesh):
    """(graphdef, TrainState of jax.ShapeDtypeStruct with shardings, state shardings)."""
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    param_shardings = sharding.state_shardings(abstract_params, mesh)
    # what _creator makes, from the shapes above (building the model again costs a trace)
    zero = jax.ShapeDtypeStruct((), jnp.int32)
    opt_shapes = jax.eval_shape(make_optimizer_for(cfg).init, abstract_params)
    shapes = TrainState(abstract_params, opt_shapes, zero, zero, zero)
    shardings = _state_shardings(shapes, param_shardings, mesh)
    # shardings is a prefix of the state (one sharding per Param): expand it leaf by leaf
    abstract = jax.tree.map(
        lambda s, node: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), node
        ),
        shardings,
        shapes,
        is_leaf=lambda s: isinstance(s, jax.sharding.Sharding),
    )
    return graphdef, abstract, shardings


def init_state(cfg: RunConfig, mesh: jax.sharding.Mesh, *, known=None):
    """(graphdef, state, state shardings), the state created sharded by jit (never replicated).

    `known`: abstract_state(cfg, mesh), when the caller has it already."""
    graphdef, _, shardings = known or abstract_state(cfg, mesh)
    state = jax.jit(_creator(cfg), out_shardings=shardings)()
    return graphdef, state, shardings


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
    scalar = sharding.replicated(mesh)
    return TrainState(param_shardings, opt_shardings, scalar, scalar, scalar)


def make_train_step(graphdef, cfg: RunConfig, *, poison: bool = False) -> Callable:
    """The pure step: microbatched, token-weighted gradients, clipping and the optimizer.

    A non-finite loss or gradient norm skips the update (params and optimizer state unchanged)
    and is counted. `poison` makes the loss NaN (fault drills, $MPT_JAX_FAULTS).
    """
    optimizer = make_optimizer_for(cfg)
    schedule = lr_multiplier(cfg.schedule, **_durations(cfg))
    n_micro = cfg.train.global_batch // (cfg.train.microbatch or cfg.train.global_batch)
    m = cfg.model
    uses_dropout = bool(m.resid_pdrop or m.emb_pdrop or m.attn_pdrop)
    base_key = jax.random.key(cfg.train.seed)

    def normalized_loss(params, ids, targets, seg, key, denom):
        """The microbatch's summed token losses over the whole batch's token count."""
        loss_sum, _ = _loss_sums(graphdef, cfg, params, ids, targets, seg, key)
        return (loss_sum * jnp.nan if poison else loss_sum) / denom

    grad_fn = jax.value_and_grad(normalized_loss)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        ids = batch["input_ids"]
        seg = batch.get("segment_ids")
        step_key = jax.random.fold_in(base_key, state.step) if uses_dropout else None
        # token-weighted: the mean over every counted token of the global batch. The count
        # depends on the targets only, so the loss is divided before differentiation and the
        # gradients come out normalized (no second params-sized buffer to divide into)
        targets = shift_targets(ids)
        count = counted(targets).sum().astype(jnp.float32)
        denom = jnp.maximum(count, 1.0)

        def micro_key(i):
            return None if step_key is None else jax.random.fold_in(step_key, i)

        def micro(carry, xs):
            grads_acc, loss_acc = carry
            i, ids_mb, targets_mb, seg_mb = xs
            loss, grads = grad_fn(state.params, ids_mb, targets_mb, seg_mb, micro_key(i), denom)
            grads_acc = jax.tree.map(lambda acc, g: acc + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, loss_acc + loss), None

        if n_micro == 1:  # no accumulator: the gradients are the step's
            loss, grads = grad_fn(state.params, ids, targets, seg, micro_key(0), denom)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            init = (zeros, jnp.zeros((), jnp.float32))
            xs = (jnp.arange(n_micro), *(_split_rows(x, n_micro) for x in (ids, targets, seg)))
            (grad_sum, loss), _ = jax.lax.scan(micro, init, xs)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grad_sum, state.params)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        bad = (~finite).astype(jnp.int32)

        def apply(params, opt_state, grads):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def skip(params, opt_state, grads):
            del grads  # lax.cond hands both branches the same operands
            return params, opt_state

        params, opt_state = jax.lax.cond(finite, apply, skip, state.params, state.opt_state, grads)
        new_state = TrainState(
            params,
            opt_state,
            state.step + 1,
            state.skipped_steps + bad,
            (state.bad_streak + 1) * bad,
        )
        out = {
            "loss": loss,
            "grad_norm": grad_norm,
            # the LR this update applied: the schedule runs on updates, which a skip does not count
            "lr": cfg.optim.lr * schedule(update_count(state.opt_state)),
            "tokens": count,
            "skipped_steps": new_state.skipped_steps,
            "bad_streak": new_state.bad_streak,
        }
        return new_state, out

    return step


def _loss_sums(graphdef, cfg: RunConfig, params, ids, targets, seg, key=None):
    """(summed token losses, counted tokens) of a batch as the run computes them: parameters as
    `compute_params` gives them, and over `train.loss_chunk` positions at a time when set."""
    model = nnx.merge(graphdef, compute_params(cfg, params))
    if cfg.train.loss_chunk is None:
        return cross_entropy_sum(model(ids, segment_ids=seg, dropout_key=key), targets)
    h = model.final_hidden(ids, segment_ids=seg, dropout_key=key)
    w, scale = model.output_weight()
    return chunked_cross_entropy_sum(h, w, targets, chunk=cfg.train.loss_chunk, logit_scale=scale)


def _split_rows(x_B, n: int):
    """(B, ...) -> (n, B / n, ...): rows i, i+n, i+2n, ... form part i, so each device keeps its
    own rows. None stays None."""
    return None if x_B is None else x_B.reshape(-1, n, *x_B.shape[1:]).swapaxes(0, 1)


def jit_train_step(graphdef, cfg: RunConfig, mesh, shardings, *, poison: bool = False):
    """The step jitted as the trainer runs it: sharded state and batch, the state donated."""
    return jax.jit(
        sharding.traced_on(mesh, make_train_step(graphdef, cfg, poison=poison)),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


# of the device's memory that `train.microbatch: auto` fills: XLA's estimate of the step leaves
# out library workspaces (cuDNN, NCCL) and the batches prefetched to the device
AUTO_MICROBATCH_SHARE = 0.95


@dataclasses.dataclass(frozen=True)
class MicrobatchChoice:
    """What `train.microbatch: auto` chose, and XLA's per-device estimate for each size tried."""

    microbatch: int
    needed_bytes: dict[int, int | None]
    budget_bytes: int


def choose_microbatch(
    graphdef, cfg: RunConfig, mesh, shardings, abstract: TrainState, budget_bytes: int
) -> tuple[RunConfig, Callable, MicrobatchChoice]:
    """`train.microbatch: auto`: the largest microbatch (dividing the global batch, a multiple
    of data*fsdp) whose compiled step fits `budget_bytes` per device by XLA's estimate.

    Returns the config with it, its jitted step (already compiled, which its first call reuses)
    and the sizes tried (the whole batch, then a bisection) with XLA's estimate for each.
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    total = cfg.train.global_batch
    ids = jax.ShapeDtypeStruct(
        (total, cfg.seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh)
    )
    batch = {"input_ids": ids, **({"segment_ids": ids} if cfg.model.attn_uses_sequence_id else {})}
    sizes = [m for m in range(1, total + 1) if total % m == 0 and m % shards == 0]
    needed: dict[int, int | None] = {}
    steps: dict[int, Callable] = {}

    def fits(size: int) -> bool:
        steps[size] = jit_train_step(graphdef, _with_microbatch(cfg, size), mesh, shardings)
        needed[size] = compiled_bytes(steps[size].lower(abstract, batch).compile())
        return needed[size] is None or needed[size] <= budget_bytes

    # the whole batch first (it usually fits), then a bisection: memory grows with the size
    best = None
    if sizes and fits(sizes[-1]):
        best = sizes[-1]
    else:
        low, high = 0, len(sizes) - 2
        while low <= high:
            middle = (low + high + 1) // 2
            if fits(sizes[middle]):
                best, low = sizes[middle], middle + 1
            else:
                high = middle - 1
    if best is not None:
        return (
            _with_microbatch(cfg, best),
            steps[best],
            MicrobatchChoice(best, needed, budget_bytes),
        )
    if not needed:
        raise ConfigError(
            f"train.microbatch: auto needs a microbatch that is a multiple of data*fsdp "
            f"({shards}) and divides train.global_batch ({total}); there is none"
        )
    smallest = min(needed)
    raise ConfigError(
        f"train.microbatch: auto: even a microbatch of {smallest} needs "
        f"{describe_bytes(needed[smallest])} per device (XLA's estimate), and "
        f"{describe_bytes(budget_bytes)} is available: use train.remat, a shorter sequence or "
        "more devices"
    )


def _with_microbatch(cfg: RunConfig, size: int) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatch=size))


def make_eval_step(graphdef, cfg: RunConfig, data_shards: int = 1) -> Callable:
    """(params, batch) -> (loss sum, token count), jitted by the caller.

    As the train step computes its loss: in parts of at most `train.microbatch` rows (a multiple
    of `data_shards`, data x fsdp) and with `train.loss_chunk`, so that evaluation fits where
    training does.
    """
    micro = cfg.train.fixed_microbatch

    def loss_sums(params, ids, seg):
        return _loss_sums(graphdef, cfg, params, ids, shift_targets(ids), seg)

    def eval_step(params, batch):
        ids, seg = batch["input_ids"], batch.get("segment_ids")
        n = _eval_parts(ids.shape[0], micro, data_shards)
        if n == 1:
            return loss_sums(params, ids, seg)

        def part(carry, xs):
            s, c = loss_sums(params, *xs)
            return (carry[0] + s, carry[1] + c), None

        zero = jnp.zeros((), jnp.float32)
        (total, count), _ = jax.lax.scan(
            part, (zero, zero), (_split_rows(ids, n), _split_rows(seg, n))
        )
        return total, count

    return eval_step


def _eval_parts(rows: int, micro: int | None, data_shards: int) -> int:
    """The fewest parts of equal size, a multiple of data_shards and at most `micro` rows, that
    `rows` (a multiple of data_shards) splits into."""
    if micro is None or rows <= micro:
        return 1
    per_shard = rows // data_shards
    return next(n for n in range(1, per_shard + 1) if per_shard % n == 0 and rows // n <= micro)


# ---------------------------------------------------------------------------------------------
# Run folder


# Keys a resumed run may change: they alter speed, logging or duration, not the sample order
# or the model. Any other difference needs --overwrite or another run_dir.
RESUMABLE_KEYS = (
    "run_dir",  # a run folder may be moved, or named by another path
    "mesh.",
    "distributed.",
    "checkpoint.",
    "init_from",
    "data.num_threads",
    "data.prefetch",
    "model.attn_impl",
    "model.norm_impl",
    "train.steps",
    "train.tokens",
    "train.microbatch",
    "train.remat",
    "train.loss_chunk",
    "train.log_every",
    "train.eval_every",
    "train.eval_first",
    "train.eval_batches",
    "data.eval",
    "train.icl_tasks",
    "train.eval_gauntlet",
    "train.icl_subset_num_batches",
    "train.profile",
    "train.progress",
    "train.export_hf",
    "train.export_hf_every",
    "train.wandb_project",
    "train.wandb_mode",
    "train.watchdog_minutes",
    "train.nonfinite_patience",
    "train.rollback_skip_batches",
    "train.max_rollbacks",
    "train.loss_spike",
)


# What only the trainer writes into a folder: with any of them (or the resolved config.yaml it
# writes) the folder is a run's, which --overwrite may replace. Not restarts.jsonl: the
# supervisor writes it before any trainer has looked at the folder.
RUN_MARKERS = ("checkpoints", "metrics.jsonl", "complete.json")
HF_STEPS_DIR = "hf-steps"  # train.export_hf_every's folders: ba<step>


def _holds_a_run(run_dir: Path) -> bool:
    if any((run_dir / marker).exists() for marker in RUN_MARKERS):
        return True
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    # the trainer writes every section; a hand-written config of the same name leaves some out
    sections = {field.name for field in dataclasses.fields(RunConfig)}
    return isinstance(saved, dict) and sections <= saved.keys()


def check_run_dir(cfg: RunConfig, raw: dict[str, Any], *, overwrite: bool) -> None:
    """Refuse, before anything is changed, a run_dir this run may not use (or replace)."""
    run_dir = Path(cfg.run_dir)
    if reason := unwritable_reason(run_dir):
        raise ConfigError(f"run_dir: {reason}")
    steps = checkpoint.committed_steps(run_dir.absolute() / "checkpoints")
    fresh_init = bool(cfg.init_from) and (overwrite or not steps)  # a fresh start reads it
    if fresh_init:
        _check_init_from_exists(cfg)
    if overwrite:
        if run_dir.exists():
            for key, path in _inputs(cfg):
                source = Path(path).resolve()
                if source == run_dir.resolve() or run_dir.resolve() in source.parents:
                    raise ConfigError(
                        f"{key}: {path} is inside run_dir, which --overwrite deletes before it "
                        "is read: move it elsewhere first"
                    )
        if run_dir.is_symlink():
            raise ConfigError(
                f"run_dir: {run_dir} is a symbolic link; --overwrite replaces a real run folder: "
                "name the folder it points to"
            )
        cwd = Path.cwd().resolve()
        if run_dir.exists() and (run_dir.resolve() == cwd or run_dir.resolve() in cwd.parents):
            raise ConfigError(f"run_dir: {run_dir} holds the working directory; not replaced")
        # --overwrite deletes the folder: only a run's, never a folder of other files (the
        # supervisor's log of attempts that died before setting the folder up aside)
        contents = list(run_dir.iterdir()) if run_dir.is_dir() else []
        if any(f.name != "restarts.jsonl" for f in contents) and not _holds_a_run(run_dir):
            raise ConfigError(
                f"run_dir: {run_dir} is not empty and holds no run (no run config.yaml, "
                "checkpoints or metrics); --overwrite replaces run folders only: choose another "
                "run_dir"
            )
    if fresh_init:  # its model, now: --overwrite deletes the folder before the weights are read
        _check_init_from_model(cfg)
    if overwrite:
        return
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        try:
            previous = yaml.safe_load(config_path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"{config_path}: unreadable ({reason}); pass --overwrite to replace the run "
                "or choose another run_dir"
            ) from None
        changed = _non_resumable_changes(with_defaults(previous), raw)
        if changed:
            raise ConfigError(
                f"{run_dir}: holds a run with a different config ({', '.join(changed[:5])}); "
                "pass --overwrite to replace it or choose another run_dir"
            )
        _check_kept_for_good(cfg, previous, steps)
    elif steps:  # checkpoints copied without their config.yaml: theirs stands in for it
        try:
            meta = checkpoint.read_meta(run_dir / "checkpoints" / str(steps[-1]))
        except checkpoint.CheckpointError:
            meta = None  # the restore falls back to an earlier step, checked as it is read
        if meta is not None:
            _check_checkpoint_meta(cfg, raw, steps[-1], meta)
    if steps:
        _check_not_past_end(cfg, steps[-1])
    elif (run_dir / "complete.json").is_file():
        # nothing to resume from: running again would train it anew over its metrics and export
        raise ConfigError(
            f"{run_dir}: holds a finished run without checkpoints (checkpoint.enabled false?); "
            "pass --overwrite to train it again or choose another run_dir"
        )


def _check_kept_for_good(cfg: RunConfig, previous: Any, steps: list[int]) -> None:
    """Refuse a checkpoint.keep_every change that would let the retention delete the steps the
    earlier value kept for good (Orbax applies the new one to every step in the folder)."""
    saved = previous.get("checkpoint") if isinstance(previous, dict) else None
    period = saved.get("keep_every") if isinstance(saved, dict) else None
    new = cfg.checkpoint.keep_every
    if not cfg.checkpoint.enabled or not isinstance(period, int) or period <= 0 or period == new:
        return
    # the latest `keep` steps are no exception: later saves rotate them out too
    lost = [s for s in steps if s % period == 0 and not (new and s % new == 0)]
    if lost:
        raise ConfigError(
            f"checkpoint.keep_every: {new} would delete steps {', '.join(map(str, lost[:8]))}, "
            f"kept for good with keep_every {period}; keep {period}, or move them out first"
        )


def retire_stale_completion(run_dir: Path, total_steps: int, *, overwrite: bool) -> None:
    """Remove complete.json when this run replaces the one it marks, or goes past its step.

    Done at once, not once the run starts: launch scripts and sweeps read the file as 'finished',
    and a relaunch that fails early (a preemption while the data is prepared) would otherwise
    pass for one.
    """
    path = run_dir / "complete.json"
    try:
        step = json.loads(path.read_text()).get("step")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        step = None  # unreadable: no proof of a finished run
    if overwrite or not isinstance(step, int) or step < total_steps:
        path.unlink(missing_ok=True)


def _inputs(cfg: RunConfig) -> list[tuple[str, str]]:
    """The files and folders a run reads, by config key."""
    data = cfg.data
    found = [("init_from", cfg.init_from), ("data.path", data.path)]
    found += [(f"data.mixture[{i}].path", source.path) for i, source in enumerate(data.mixture)]
    found += [(f"data.eval[{i}].path", source.path) for i, source in enumerate(data.eval)]
    found += [
        ("data.tokenizer", data.tokenizer),
        ("train.icl_tasks", cfg.train.icl_tasks),
        ("train.eval_gauntlet", cfg.train.eval_gauntlet),
    ]
    # "byte" and builtin:NAME are no paths (a built-in corpus is cached outside the run)
    return [(k, p) for k, p in found if p and p != "byte" and not p.startswith("builtin:")]


def _check_init_from_exists(cfg: RunConfig) -> None:
    if not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from: {cfg.init_from} does not exist")


def _check_not_past_end(cfg: RunConfig, step: int) -> None:
    if step > cfg.total_steps:
        length = "steps" if cfg.train.steps is not None else "tokens"
        raise ConfigError(
            f"train.{length}: the run ends at step {cfg.total_steps}, before its checkpoint "
            f"at step {step}"
        )


def prepare_run_dir(cfg: RunConfig, raw: dict[str, Any], *, overwrite: bool) -> Path:
    """Create RUN_DIR (emptied with overwrite) holding the resolved config; check_run_dir first."""
    run_dir = Path(cfg.run_dir)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "complete.json").unlink(missing_ok=True)  # written again when this run finishes
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(raw, sort_keys=False))
    return run_dir


def _without_dataset_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """A run config mapping without where its datasets and tokenizer file sit.

    A resume compares what these name by content instead (the datasets' content ids), so a
    dataset moved to another folder or mount continues the run.
    """
    data = dict(raw.get("data") or {})
    if data.get("path") is not None:
        data["path"] = "a dataset"
    data["mixture"] = [
        {**source, "path": "a dataset"} if isinstance(source, dict) else source
        for source in data.get("mixture") or ()
    ]
    if data.get("tokenizer", "byte") != "byte":
        data["tokenizer"] = "a tokenizer file"
    return {**raw, "data": data}


def _non_resumable_changes(previous: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """The keys a resumed run may not change (not RESUMABLE_KEYS) that differ; datasets and
    tokenizer files by what they are, not where."""
    keys = _diff_keys(_without_dataset_paths(previous), _without_dataset_paths(raw))
    return [key for key in keys if not key.startswith(RESUMABLE_KEYS)]


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _model_changes(saved: Any, ours: Any, prefix: str = "") -> list[str]:
    """Model fields that differ, except the kernel choices (same weights, other kernels)."""
    kernels = (f"{prefix}attn_impl", f"{prefix}norm_impl")
    return [k for k in _diff_keys(saved, ours, prefix) if k not in kernels]


def _finish_hf_exports(folder: Path, names: str = "ba*") -> None:
    """HF exports named `names` in `folder` that a kill cut short (write_folder's temporary
    names): a whole one whose folder is missing (killed between its two renames) is put in place,
    the rest removed."""
    for tmp in sorted(folder.glob(f".{names}{TEMPORARY}*")):
        target = sibling_target(tmp)
        try:  # config.json is written last: whole if it parses
            json.loads((tmp / "config.json").read_text())
            whole = True
        except (OSError, ValueError):
            whole = False
        if whole and not target.exists():
            tmp.rename(target)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in folder.glob(f".{names}{ASIDE}*"):
        shutil.rmtree(old, ignore_errors=True)


def _truncate_metrics(
    run_dir: Path, last_step: int, *, evaluates: bool = False, lines: int | None = None
) -> None:
    """Drop metrics.jsonl lines a run resumed at `last_step` logs again.

    The first `lines` lines (as many as the file held when the checkpoint was saved) stay
    whole: after a rollback they hold steps past `last_step` that the resumed run does not
    repeat, and its record. Of the lines after them (all of them for a checkpoint without the
    count), those after `last_step` go (but for the record of a save of `last_step` or earlier
    that finished later), as does its evaluation when the resumed run `evaluates` there again
    (at an evaluation step, whose result a stop may have cut off, or at the end), and a line cut
    short by a crash.
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    text = path.read_text().splitlines(keepends=True)
    head = lines or 0
    kept = [line for line in text[:head] if line.endswith("\n")]
    for line in text[head:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash or a full disk, or an empty one
        if not isinstance(record, dict):
            continue
        step = record.get("step", 0)
        again = step > last_step or (step == last_step and evaluates and "val_loss" in record)
        # a save that finished later is still the record of a checkpoint the run goes on from
        saved = record.get("checkpoint_step", last_step + 1) <= last_step
        if saved or not again:
            kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept))


def _evaluates_at(cfg: RunConfig, step: int) -> bool:
    """Whether the run evaluates after `step` updates: every train.eval_every, at the end, and
    before the first with train.eval_first."""
    if step == 0:
        return cfg.train.eval_first
    every = cfg.train.eval_every
    return step == cfg.total_steps or bool(every and step % every == 0)


def _check_checkpoint_meta(
    cfg: RunConfig, raw: dict[str, Any], step: int, meta: dict[str, Any]
) -> None:
    """Refuse a checkpoint written for another config (as config.yaml is, for a checkpoint
    copied without it) or beyond this run."""
    _check_not_past_end(cfg, step)
    changed = _non_resumable_changes(with_defaults(meta["config"]), raw)
    if changed:
        raise ConfigError(
            f"checkpoint step {step}: written for a different config ({', '.join(changed[:5])})"
        )


def _schedule_change(
    cfg: RunConfig, saved_raw: dict[str, Any], updates: int, step: int
) -> str | None:
    """A warning where a changed train.steps or train.tokens moves the learning rate of the
    update after `updates` applied, at step `step` + 1: schedules given in dur stretch with the
    run (a cosine restarts high)."""
    try:
        saved = run_config_from_dict(with_defaults(saved_raw))
    except ConfigError:  # a checkpoint from an older layout: its check says what differs
        return None
    if saved.total_steps == cfg.total_steps:
        return None
    rates = [
        float(c.optim.lr * lr_multiplier(c.schedule, **_durations(c))(updates))
        for c in (saved, cfg)
    ]
    if rates[0] == rates[1]:
        return None
    return (
        f"warning: the run's length changed from {saved.total_steps} to {cfg.total_steps} steps, "
        f"and its schedule ({cfg.schedule.name}, t_max {cfg.schedule.t_max}) with it: the "
        f"learning rate of step {step + 1} is {rates[1]:.3g}, where the saved run's was "
        f"{rates[0]:.3g}"
    )


def _meta(
    cfg: RunConfig, raw: dict, step: int, loader: BatchLoader, rollbacks: int, loop: dict
) -> dict:
    """A checkpoint's JSON item; `loop`: the host loop's state (loss window, metrics.jsonl's
    lines, why it was saved)."""
    key = jax.random.key_data(jax.random.key(cfg.train.seed))
    return {
        "step": step,
        "tokens": step * cfg.train.global_batch * cfg.seq_len,
        "data": loader.state(),
        "rng": {"seed": cfg.train.seed, "key_data": [int(x) for x in jax.device_get(key)]},
        "rollbacks": rollbacks,
        **loop,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"jax": jax.__version__},
        "config": raw,
    }


def _items(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "counters": state.counters()}


def _initial_params(cfg: RunConfig, abstract_params) -> Any:
    """init_from: weights from an HF MPT folder, a run folder or a checkpoint step folder."""
    source = Path(cfg.init_from)
    if (source / "config.json").is_file():
        param_dtype, _ = PRECISIONS[cfg.train.precision]
        # in the run's layout of the layers (HF folders hold each block's tensors apart)
        loaded = MPTForCausalLM.from_pretrained(
            source, param_dtype=param_dtype, scan_layers=cfg.model.scan_layers
        )
        params = nnx.state(loaded, nnx.Param)
        _check_same_shapes(params, abstract_params, source)
        return jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract_params))
    _check_init_from_exists(cfg)
    return checkpoint.load_params(_init_from_step_dir(cfg), abstract_params)


# init_from takes the weights only: how a fresh model would be initialized and the dropout and
# embedding-gradient scale of training may differ from the source's (the kernels too)
_INIT_FROM_FREE = ("init_config", "resid_pdrop", "emb_pdrop", "attn_pdrop", "embedding_fraction")


def _init_from_changes(source_model: dict[str, Any], cfg: RunConfig, *, layout: bool) -> str:
    """The model fields init_from's source and the run differ in, as `holds a different model
    (...)`, or ""; `layout`: scan_layers may differ too (an HF folder is loaded in either)."""
    free = _INIT_FROM_FREE + (("scan_layers",) if layout else ())
    if not cfg.model.learned_pos_emb:  # no tensor holds the length: a longer context (ALiBi)
        free += ("max_seq_len",)
    changed = _model_changes(source_model, to_dict(cfg.model))
    changed = [key for key in changed if key.split(".")[0] not in free]
    return f"holds a different model ({', '.join(changed[:5])})" if changed else ""


def _init_from_step_dir(cfg: RunConfig) -> Path:
    """init_from's step folder (a run folder's latest), refused if it holds another model."""
    try:
        step_dir = checkpoint.find_step_dir(Path(cfg.init_from))
    except ConfigError as e:
        raise ConfigError(f"init_from: {e} (nor an HF MPT folder: no config.json)") from None
    saved_model = with_defaults(checkpoint.read_meta(step_dir)["config"]).get("model", {})
    if changed := _init_from_changes(saved_model, cfg, layout=False):
        raise ConfigError(f"init_from: {step_dir} {changed}")
    return step_dir


def _check_init_from_model(cfg: RunConfig) -> None:
    """init_from's model against the run's from its config alone, before --overwrite deletes
    anything: the weights are read once the run folder is set up."""
    source = Path(cfg.init_from)
    if not (source / "config.json").is_file():
        _init_from_step_dir(cfg)
        return
    if changed := _init_from_changes(to_dict(read_config(source)), cfg, layout=True):
        raise ConfigError(f"init_from: {source} {changed}")


def _check_same_shapes(params, abstract_params, source: Path) -> None:
    ours = dict(nnx.to_flat_state(abstract_params))
    for path, var in nnx.to_flat_state(params):
        want = ours.get(path)
        if want is None or tuple(want.shape) != tuple(var.shape):
            name = ".".join(map(str, path))
            shape = None if want is None else tuple(want.shape)
            raise ConfigError(
                f"init_from: {source} tensor {name} has shape {tuple(var.shape)}, the run's "
                f"model needs {shape}"
            )


# ---------------------------------------------------------------------------------------------
# The host loop


def _datasets(cfg: RunConfig, progress: bool):
    sources = (
        [(cfg.data.path, 1.0)] if cfg.data.path else [(s.path, s.weight) for s in cfg.data.mixture]
    )
    return [(_open_dataset(cfg, path, progress), weight) for path, weight in sources]


def _open_dataset(cfg: RunConfig, path: str, progress: bool):
    """A dataset resolved (a built-in corpus prepared once) and checked against the run."""
    meta = resolve_dataset(
        path, seq_len=cfg.seq_len, tokenizer=cfg.data.tokenizer, progress=progress
    )
    check_compatible(
        meta, seq_len=cfg.seq_len, vocab_size=cfg.model.vocab_size, tokenizer=cfg.data.tokenizer
    )
    return meta


def _eval_datasets(
    cfg: RunConfig, first, progress: bool, data_shards: int
) -> list[tuple[str, Any]]:
    """(label, dataset) of each data.eval entry, checked as the training datasets are."""
    out = []
    for i, source in enumerate(cfg.data.eval):
        try:
            meta = _open_dataset(cfg, source.path, progress)
            check_same_eos(first, meta)
            # an empty or too small val split is refused now, not at the first evaluation
            eval_batch_size(
                meta,
                cfg.train.global_batch,
                data_shards=data_shards,
                processes=jax.process_count(),
            )
        except DataError as e:
            raise DataError(f"data.eval[{i}] ({source.label}): {e}") from None
        out.append((source.label, meta))
    return out


def _icl_during_training(cfg: RunConfig, meta, data_shards: int) -> IclDuringTraining | None:
    """train.icl_tasks in the first dataset's tokens, batched as the eval step is."""
    if cfg.train.icl_tasks is None:
        return None
    micro = cfg.train.fixed_microbatch
    try:
        return IclDuringTraining(
            cfg.train.icl_tasks,
            cfg.train.eval_gauntlet,
            tokenizer_from_spec(meta.tokenizer, meta.folder),
            max_seq_len=cfg.model.max_seq_len,
            batch_size=max(data_shards, micro or cfg.train.global_batch),
            row_multiple=data_shards,
            subset_num_batches=cfg.train.icl_subset_num_batches,
            loss_chunk=cfg.train.loss_chunk,  # scoring fits where the loss does
        )
    except EvalError as e:
        raise ConfigError(f"train.{e}") from None


def _stop_together(problem: BaseException | None, field: str, what: str) -> None:
    """Raise `problem` here, and on the other processes an error naming the one that failed,
    so that none waits in a later collective for a process that has stopped."""
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(problem is not None))
        if problem is None and failed.any():
            raise ConfigError(
                f"{field}: process {int(np.argmax(failed))} {what} (its own error says why); "
                "all processes stop"
            )
    if problem is not None:
        raise problem


def _differences(texts: Sequence[str]) -> tuple[int, list[int]] | None:
    """(the first process whose `texts` differ from process 0's, the indices that differ), or
    None when every process gave the same; the texts are compared by digest."""
    ours = np.array([int(hashlib.sha256(t.encode()).hexdigest()[:7], 16) for t in texts], np.int32)
    differs = multihost_utils.process_allgather(ours).reshape(-1, len(texts))
    differs = differs != differs[0]  # (processes, texts)
    if not differs.any():
        return None
    return int(np.argmax(differs.any(axis=1))), np.flatnonzero(differs.any(axis=0)).tolist()


def _check_same_everywhere(digest: str, field: str, what: str, here: str = "") -> None:
    """Refuse processes whose `digest` differs from process 0's (per-host copies that differ)."""
    if (found := _differences([digest])) is not None:
        raise ConfigError(
            f"{field}: process {found[0]} {what} than process 0"
            f"{here}; every process's copy must hold the same"
        )


# settings that may differ between processes: paths (per-host copies, mounts), host resources,
# what only process 0 shows or logs, and the process's own identity
PER_PROCESS_KEYS = {
    "data.path",
    "data.mixture",
    "data.tokenizer",
    "data.eval",
    "data.num_threads",
    "data.prefetch",
    "train.icl_tasks",
    "train.eval_gauntlet",
    "train.progress",
    "train.wandb_project",
    "train.wandb_mode",
    "init_from",
    "run_dir",
}


def _check_same_config(raw: Mapping[str, Any]) -> None:
    """Refuse processes started with other settings than process 0's, naming the keys: they
    would wait for each other in collectives that never match (paths aside, which per-host
    copies change; the data and tasks' contents are compared once read)."""
    flat = {}
    for section, value in raw.items():
        fields = value.items() if isinstance(value, Mapping) else [(None, value)]
        for name, item in fields:
            flat[section if name is None else f"{section}.{name}"] = item
    keys = sorted(k for k in flat if k not in PER_PROCESS_KEYS and not k.startswith("distributed"))
    # the key list first: the values line up only if it is the same (same mpt_jax)
    if (found := _differences([" ".join(keys)])) is not None:
        raise ConfigError(
            f"config: process {found[0]} has other config fields than process 0 (another "
            "mpt_jax version?); every process must run the same"
        )
    values = [json.dumps(flat[k], sort_keys=True, default=str) for k in keys]
    if (found := _differences(values)) is not None:
        process, changed = found
        raise ConfigError(
            f"config: process {process} runs with other settings than process 0 "
            f"({', '.join(keys[i] for i in changed[:5])}); every process must run the same config"
        )


def eval_batch_size(meta, global_batch: int, *, data_shards: int, processes: int) -> int:
    """The evaluation batch: at most global_batch rows of the val split, split evenly over the
    data-parallel devices (data x fsdp) and the processes feeding them."""
    rows = meta.splits["val"]["rows"]
    shards = math.lcm(data_shards, processes)
    if rows == 0:
        raise DataError(
            f"{meta.folder}: the val split is empty (prepared with val_fraction 0); training "
            "evaluates on it, at least at the end"
        )
    if rows < shards:
        raise DataError(
            f"{meta.folder}: the val split has {rows} rows, fewer than the {shards} data-parallel "
            "shards of one evaluation batch"
        )
    return min(global_batch, rows // shards * shards)


def evaluate(
    eval_fn, params, datasets, cfg: RunConfig, batch_sharding, on_batch: Callable | None = None
) -> float:
    """Mean validation loss over the first eval_batches batches of the first dataset's val split
    (all of its whole batches when eval_batches is None)."""
    meta = datasets[0][0]
    mesh_shape = batch_sharding.mesh.shape
    batch = eval_batch_size(
        meta,
        cfg.train.global_batch,
        data_shards=mesh_shape["data"] * mesh_shape["fsdp"],
        processes=jax.process_count(),
    )
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
            if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
                break
            s, c = eval_fn(params, b)
            total, count = total + float(s), count + float(c)
            if on_batch is not None:
                on_batch()
    finally:
        loader.close()
    return total / max(count, 1.0)


def run(cfg: RunConfig, *, overwrite: bool = False) -> dict:
    """Train as configured, resuming from RUN_DIR's latest checkpoint; returns final metrics."""
    with run_log.captured_output():
        trainer = _Trainer(cfg)
        try:
            trainer.start(overwrite=overwrite)
            return trainer.train()
        finally:
            trainer.close()


class _Trainer:
    """The host loop: steps, logging, evaluation, checkpoints, preemption and recovery."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.raw = to_dict(cfg)  # the resolved config: every field, the model expanded
        self.is_main = jax.process_index() == 0
        self.loader = self.checkpointer = self.logger = self.bar = self.icl = None
        self.eval_datasets: list[tuple[str, Any]] = []
        self.watchdog = self.preemption = self.profiler = None
        self.scramble: Callable | None = None  # the spike drill's

    def start(self, *, overwrite: bool) -> None:
        """Set up the run folder, mesh, data, state (restored or fresh) and the loop's helpers."""
        cfg, raw = self.cfg, self.raw
        if jax.process_count() > 1:
            _check_same_config(raw)
        # every process checks (the folder is shared), so that all refuse together
        check_run_dir(cfg, raw, overwrite=overwrite)
        if self.is_main:
            retire_stale_completion(Path(cfg.run_dir), cfg.total_steps, overwrite=overwrite)
        self.mesh = mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_tensor_within_processes(mesh.devices)
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if cfg.train.global_batch % shards:
            raise ConfigError(
                f"train.global_batch: {cfg.train.global_batch} is not a multiple of data*fsdp "
                f"({shards})"
            )
        if cfg.train.fixed_microbatch and cfg.train.fixed_microbatch % shards:
            raise ConfigError(
                f"train.microbatch: {cfg.train.microbatch} is not a multiple of data*fsdp "
                f"({shards})"
            )
        self.show = cfg.train.progress and self.is_main
        problem = None
        try:
            self.datasets = _datasets(cfg, progress=self.show)
            for meta, _ in self.datasets[1:]:
                check_same_eos(self.datasets[0][0], meta)
            # the run evaluates on the first dataset's val split, at least at its end: an empty
            # or too small split is refused now, not after the training it would cost
            processes = jax.process_count()
            eval_batch_size(
                self.datasets[0][0], cfg.train.global_batch, data_shards=shards, processes=processes
            )
            self.eval_datasets = _eval_datasets(cfg, self.datasets[0][0], self.show, shards)
        except (DataError, ConfigError, OSError) as e:  # a per-host copy missing, say
            problem = e
        _stop_together(problem, "data", "could not open its datasets")
        if jax.process_count() > 1:
            metas = [meta for meta, _ in self.datasets] + [m for _, m in self.eval_datasets]
            ids = [meta.content_id for meta in metas]  # not paths: copies may differ
            here = ", ".join(f"{meta.folder}: {meta.content_id}" for meta in metas)
            _check_same_everywhere(" ".join(ids), "data", "reads other rows", f" ({here})")
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.graphdef, self.abstract, shardings = abstract_state(cfg, mesh)
        self.shardings = shardings
        share = sharding.device_share(self.abstract.params)
        splits = mesh.shape["fsdp"] * mesh.shape["tensor"]
        if splits > 1 and share > 2 / splits and self.is_main:
            # a dimension the mesh axes do not divide stays whole: warn, as it costs memory
            m = cfg.model
            print(
                f"warning: each device holds {100 * share:.0f}% of the parameters, not about "
                f"1/{splits}: mesh fsdp {mesh.shape['fsdp']} and tensor {mesh.shape['tensor']} "
                f"divide too few of their dimensions (d_model {m.d_model}, n_heads {m.n_heads}, "
                f"vocab_size {m.vocab_size}), which stay whole; choose sizes that do",
                file=sys.stderr,
                flush=True,
            )
        if cfg.train.microbatch == "auto":
            # the step's config gets the chosen size; config.yaml keeps `auto`
            cfg, self.step_fn = self._choose_microbatch(shardings)
        else:
            self.step_fn = jit_train_step(self.graphdef, cfg, mesh, shardings)
        self.faults = resilience.InjectedFaults()
        self.poisoned_step_fn = (
            jit_train_step(self.graphdef, cfg, mesh, shardings, poison=True)
            if self.faults.nan_batches
            else None
        )
        self.eval_fn = jax.jit(
            sharding.traced_on(mesh, make_eval_step(self.graphdef, cfg, shards)),
            in_shardings=(shardings.params, self.batch_sharding),
        )
        self.loader = BatchLoader(
            self.datasets,
            global_batch=cfg.train.global_batch,
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
            segment_ids=cfg.model.attn_uses_sequence_id,
            sharding=self.batch_sharding,
            num_threads=cfg.data.num_threads,
            prefetch=cfg.data.prefetch,
        )
        if not overwrite:
            self._check_data_continues()
        # task files are read and tokenized now: a bad one stops the run before it starts
        problem = None
        try:
            self.icl = _icl_during_training(cfg, self.datasets[0][0], shards)
        except (ConfigError, DataError, OSError) as e:
            problem = e
        _stop_together(problem, "train.icl_tasks", "could not prepare its tasks")
        if self.icl is not None and jax.process_count() > 1:
            _check_same_everywhere(
                self.icl.digest(), "train.icl_tasks", "prepared other prompts from its task files"
            )
        # the run folder changes only now, once the mesh, data and model are known to be usable
        self.run_dir = (
            prepare_run_dir(cfg, raw, overwrite=overwrite) if self.is_main else Path(cfg.run_dir)
        )
        checkpoints = self.run_dir.absolute() / "checkpoints"
        self.saving = cfg.checkpoint.enabled
        # with saving off, a run's existing checkpoints are still read: it resumes, not restarts
        # (process 0's view decides, so that all processes restore or none)
        has_steps = bool(checkpoint.committed_steps(checkpoints))
        if jax.process_count() > 1:
            has_steps = bool(multihost_utils.broadcast_one_to_all(np.int32(has_steps)))
        # after the broadcast: process 0 has set up the folder (--overwrite empties it)
        run_log.attach(self.run_dir, jax.process_index())
        if self.is_main:
            _finish_hf_exports(self.run_dir / HF_STEPS_DIR)
            _finish_hf_exports(self.run_dir, names="hf")  # train.export_hf's, at the end
        self.checkpointer = (
            checkpoint.Checkpointer(checkpoints, cfg.checkpoint)
            if self.saving or has_steps
            else None
        )
        self.rollbacks = 0
        self.save_waiting = False  # a scheduled save put off by an open outlier streak
        self.spikes = LossSpikeMonitor(cfg.train.loss_spike, cfg.total_steps)
        # armed from here: a restore (Orbax's barriers wait for every process) or a first batch
        # that hangs is caught as a hung step is; compiles (a fresh init, the first step) are not
        minutes = cfg.train.watchdog_minutes
        self.watchdog = resilience.Watchdog(None if minutes is None else 60.0 * minutes)
        self.watchdog.heartbeat()
        self.start_step = self._restore_or_init()
        # a killed attempt's exports past its last checkpoint: a resumed run may train those steps
        # differently (train.steps and schedule, rollback settings may change on resume)
        self._discard_exports_after(self.start_step)
        self.logger = metrics_lib.MetricsLogger(
            self.run_dir,
            enabled=self.is_main,
            wandb_project=cfg.train.wandb_project,
            wandb_mode=cfg.train.wandb_mode,
            config=raw,
            console=not self.show,  # a line per logged step where no progress bar shows them
            resumed_at=self.start_step,
        )
        peak = metrics_lib.peak_flops(jax.devices()[0].device_kind, cfg.train.precision)
        # a 10-step window, as llm-foundry's speed_monitor
        self.throughput = metrics_lib.Throughput.from_config(
            cfg.model, cfg.seq_len, n_devices=jax.device_count(), peak=peak, remat=cfg.train.remat
        )
        self.preemption = resilience.Preemption()
        self.bar = _progress(cfg.total_steps, self.show, initial=self.start_step)
        self.profiler = _Profiler(cfg.train.profile, self.run_dir / "profile", self.start_step)
        self.save_times = {"checkpoint_blocked_s": 0.0, "checkpoint_save_s": 0.0, "saves": 0}

    def _choose_microbatch(self, shardings) -> tuple[RunConfig, Callable]:
        budget = int(AUTO_MICROBATCH_SHARE * device_memory_bytes(jax.local_devices()))
        if jax.process_count() > 1:  # every process chooses from the same budget
            # in MiB: without jax_enable_x64 the gather is int32, which bytes overflow
            mib = multihost_utils.process_allgather(np.int32(budget >> 20))
            budget = int(np.min(mib)) << 20
        cfg, step_fn, choice = choose_microbatch(
            self.graphdef, self.cfg, self.mesh, shardings, self.abstract, budget
        )
        if jax.process_count() > 1:  # one program on all: the smallest choice, should they differ
            agreed = int(np.min(multihost_utils.process_allgather(np.int32(choice.microbatch))))
            if agreed != choice.microbatch:
                cfg = _with_microbatch(cfg, agreed)
                step_fn = jit_train_step(self.graphdef, cfg, self.mesh, shardings)
                choice = dataclasses.replace(choice, microbatch=agreed)
        self.cfg = cfg
        if self.is_main:
            needed = choice.needed_bytes.get(choice.microbatch)
            print(
                f"train.microbatch: auto: {choice.microbatch} of {cfg.train.global_batch} "
                "sequences per forward and backward"
                + ("" if needed is None else f", {describe_bytes(needed)} per device")
                + f" of the {describe_bytes(budget)} allowed (XLA's estimate)",
                file=sys.stderr,
                flush=True,
            )
        return cfg, step_fn

    def _check_data_continues(self) -> None:
        """Refuse, before the folder changes, to resume over datasets with other rows than the
        run's checkpoints were saved over; all processes refuse if one does."""
        checkpoints = Path(self.cfg.run_dir).absolute() / "checkpoints"
        problem, newest = None, True
        for step in reversed(checkpoint.committed_steps(checkpoints)):  # any may be restored
            try:
                state = checkpoint.read_meta(checkpoints / str(step))["data"]
            except Exception:  # restoring reports an unreadable step and tries the one before
                continue
            # an older step saved before content ids can only be checked by folder, which may
            # have moved since: only the newest is held to that
            if newest or "contents" in state:
                try:
                    self.loader.check_state(state)
                except DataError as e:
                    problem = e
                    break
            newest = False
        _stop_together(problem, "data", "reads other rows than the run trained on")

    # -- state -----------------------------------------------------------------------------------

    def _restore_or_init(self) -> int:
        """Resume from the newest readable checkpoint, else initialize (and apply init_from)."""
        restored = None
        if self.checkpointer is not None:
            restored = self.checkpointer.restore_latest(
                _items(self.abstract),
                check_meta=functools.partial(_check_checkpoint_meta, self.cfg, self.raw),
            )
        if restored is None:
            known = (self.graphdef, self.abstract, self.shardings)
            self.watchdog.disarm()  # the init compiles: no hang
            _, self.state, _ = init_state(self.cfg, self.mesh, known=known)
            self.watchdog.heartbeat()
            if self.cfg.init_from:
                self.state.params = _initial_params(self.cfg, self.abstract.params)
            if self.is_main:
                _truncate_metrics(self.run_dir, 0)
                # a fresh start is a new W&B run too (W&B drops steps below a run's last one)
                (self.run_dir / "wandb_run_id").unlink(missing_ok=True)
            return 0
        self._adopt(restored)
        self.loader.restore(restored.meta["data"])
        if self.is_main:
            evaluates = _evaluates_at(self.cfg, restored.step)
            _truncate_metrics(
                self.run_dir,
                restored.step,
                evaluates=evaluates,
                lines=restored.meta.get("metrics_lines"),
            )
            print(
                f"resuming from {self.checkpointer.directory / str(restored.step)}",
                file=sys.stderr,
                flush=True,
            )
            # the schedule runs on the updates applied: skipped (non-finite) steps are none
            updates = int(update_count(restored.opt_state))
            stretched = _schedule_change(self.cfg, restored.meta["config"], updates, restored.step)
            if stretched:
                print(stretched, file=sys.stderr, flush=True)
        return restored.step

    def _adopt(self, restored: checkpoint.Restored) -> None:
        c = restored.counters
        self.state = TrainState(
            restored.params, restored.opt_state, c["step"], c["skipped_steps"], c["bad_streak"]
        )
        self.rollbacks = int(restored.meta.get("rollbacks", 0))
        self.spikes.restore(restored.meta.get("loss_spike"), restored.step)

    def _save(self, step: int, reason: str, *, wait: bool = False) -> None:
        if not self.saving:
            return
        self.watchdog.heartbeat()
        loop = {
            "loss_spike": self.spikes.state(),
            "metrics_lines": self.logger.lines,  # process 0's, which writes metrics.jsonl and this
            "reason": reason,
        }
        meta = _meta(self.cfg, self.raw, step, self.loader, self.rollbacks, loop)
        self.checkpointer.save(step, **_items(self.state), meta=meta, wait=wait)
        self.watchdog.heartbeat()
        self._log_saves(step)

    def _log_saves(self, step: int) -> None:
        self.checkpointer.poll()
        for done in self.checkpointer.completed:
            self.save_times["checkpoint_blocked_s"] += done["checkpoint_blocked_s"]
            self.save_times["checkpoint_save_s"] += done["checkpoint_save_s"]
            self.save_times["saves"] += 1
            self.logger.log(step, done)
        self.checkpointer.completed.clear()

    def _rollback(self, cause: _Divergence) -> int:
        """Back to the newest checkpoint before `cause.first_step` (any, for non-finite losses,
        whose updates were skipped), and on with the data after the revealing step's batch."""
        cfg = self.cfg.train
        if not self.saving or self.rollbacks >= cfg.max_rollbacks:
            raise cause.error(
                f"{cause.where}; no rollback left (train.max_rollbacks {cfg.max_rollbacks}, "
                f"checkpoints {'on' if self.saving else 'off'})"
            )
        self.checkpointer.wait()
        before = self._rollback_bound(cause.first_step)
        try:
            restored = self.checkpointer.restore_latest(_items(self.abstract), before=before)
        except checkpoint.CheckpointError:
            if before == cause.first_step:
                raise
            restored = None
        if restored is None and before != cause.first_step:  # none scheduled is readable
            restored = self.checkpointer.restore_latest(
                _items(self.abstract), before=cause.first_step
            )
        if jax.process_count() > 1:  # each process read for itself: all must hold one step
            mine = -1 if restored is None else restored.step
            steps = {int(x) for x in multihost_utils.process_allgather(np.int32(mine))}
            if len(steps) > 1:
                raise checkpoint.CheckpointError(
                    f"{cause.where}; the processes rolled back to different checkpoints "
                    f"(steps {sorted(steps)}): a checkpoint is unreadable on some of them"
                )
        if restored is None:
            where = "" if cause.first_step is None else f" before step {cause.first_step}"
            raise cause.error(f"{cause.where}; there is no checkpoint to roll back to{where}")
        self._discard_exports_after(restored.step)
        # the later ones hold the spike's updates, or are preemption saves the uninterrupted
        # run did not make: they must not be resumed from
        discarded = self.checkpointer.discard_after(restored.step)
        done = self.rollbacks  # the checkpoint's count may be lower: this session's counts
        self.save_waiting = False  # the checkpoint rolled back to is the newest
        self._adopt(restored)
        self.state.bad_streak = jax.device_put(
            jnp.zeros((), jnp.int32), self.abstract.bad_streak.sharding
        )
        self.rollbacks = max(done, self.rollbacks) + 1
        resume_at = cause.handed_out + cfg.rollback_skip_batches
        skipped = resume_at - restored.meta["data"]["batches"]
        self.loader.restore({**restored.meta["data"], "batches": resume_at})
        deleted = ""
        if discarded:
            steps = ", ".join(map(str, sorted(discarded)))
            plural = "s" if len(discarded) > 1 else ""
            deleted = f", deleting the checkpoint{plural} of step{plural} {steps}"
        message = (
            f"{cause.where}: rolled back to step {restored.step}, skipping {skipped} data "
            f"batch{'' if skipped == 1 else 'es'} "
            f"({restored.meta['data']['batches']}..{resume_at - 1}){deleted}; "
            f"rollback {self.rollbacks} of {cfg.max_rollbacks}"
        )
        if self.is_main:
            print(message, file=sys.stderr, flush=True)
        self.logger.log(
            cause.step, {"rollback_to_step": restored.step, "rollback_skipped_batches": skipped}
        )
        self.bar.reset(total=self.cfg.total_steps)
        self.bar.update(restored.step)
        return restored.step

    def _rollback_bound(self, first_step: int | None) -> int | None:
        """`before` for restore_latest: past the newest scheduled (not preemption) save before
        `first_step`, which the uninterrupted run also has; any save when there is none."""
        bound = first_step
        steps = checkpoint.committed_steps(self.checkpointer.directory)
        for step in reversed([s for s in steps if first_step is None or s < first_step]):
            try:
                reason = checkpoint.read_meta(self.checkpointer.directory / str(step)).get("reason")
            except checkpoint.CheckpointError:
                reason = None  # unreadable: restore_latest reports it (then any save counts)
            if reason != "preemption":
                bound = step + 1
                break
        if jax.process_count() > 1:  # process 0's reading, so that all restore the same step
            agreed = multihost_utils.broadcast_one_to_all(np.int32(-1 if bound is None else bound))
            bound = None if int(agreed) < 0 else int(agreed)
        return bound

    def _divergence(self, finished: dict[str, Any], handed_out: int) -> _Divergence | None:
        """What a finished step's metrics call for: a rollback (returned), a stop (raised), a
        warning or nothing. `handed_out`: the data batches handed out through that step."""
        step, streak = finished["step"], finished["bad_streak"]
        if streak >= self.cfg.train.nonfinite_patience:
            where = f"steps {step - streak + 1}..{step} had non-finite losses"
            return _Divergence(where, step, handed_out, None, NonFiniteLossError)
        if streak:  # a skipped update: not the loss window's business
            return None
        # watched with action off too, so that switching it on when resuming finds a window
        event = self.spikes.observe(step, finished["loss"])
        action = self.cfg.train.loss_spike.action
        if event is None or action == "off":
            return None
        self.logger.log(step, event.metrics())
        if action == "log":
            if self.is_main:
                print(
                    f"warning: {event.describe()}; training on (train.loss_spike.action: log)",
                    file=sys.stderr,
                    flush=True,
                )
            return None
        if event.kind == "high_loss":  # no step to roll back before
            raise LossSpikeError(
                f"{event.describe()}; stopped (train.loss_spike.action: {action}; a rollback "
                "cannot tell where high losses began). To train on: a higher "
                "train.loss_spike.loss_cap, or train.loss_spike.action=log"
            )
        if action == "stop":
            raise LossSpikeError(
                f"{event.describe()}; stopped (train.loss_spike.action: stop). To go on from the "
                "newest checkpoint before it, past its data: train.loss_spike.action=rollback"
            )
        return _Divergence(event.describe(), step, handed_out, event.first_step, LossSpikeError)

    def _stopped(
        self, final: dict[str, Any], step: int, *, saved: bool, why: str | None = None
    ) -> dict[str, Any]:
        """What a preempted run returns, standing at `step` (`why` nothing was saved)."""
        final["preempted"] = self.preemption.signal_name
        final["step"] = step
        final["checkpoint_saved"] = saved
        if not saved and self.saving and why:
            final["not_saved"] = why
        return final

    def _spike_open(self) -> bool:
        """An outlier streak is open that may end in a stop or rollback: a scheduled save now
        would hold the spike's updates, and could push the newest checkpoint before it out of
        `checkpoint.keep`. The save waits for the first step after the streak closes."""
        acting = self.cfg.train.loss_spike.action in ("stop", "rollback")
        return acting and self.spikes.streak > 0

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, total = self.cfg, self.cfg.total_steps
        final: dict[str, Any] = {"run_dir": str(self.run_dir)}
        pending: tuple | None = None
        step = self.start_step
        if step < total and _evaluates_at(cfg, step):
            # train.eval_first at step 0; or a run stopped at an evaluation step saved before
            # evaluating (or was killed between the two): evaluate here, as the uninterrupted
            # run did
            self._evaluate_and_log(step)
        if step > 0 and self._export_due(step):  # stopped at an export step before exporting
            self._export_hf(self._hf_step_dir(step))
        if self.checkpointer is not None:
            self.checkpointer.start_clock()
        last_time = time.perf_counter()
        # the first step of a start (it compiles) or after a rollback (the clock restarts after
        # the restore) has no rate, and the rate window starts afresh after it
        fresh_step = step

        def finish(pending, force: bool = False) -> _Divergence | None:
            """Read and log a dispatched step's metrics; what to roll back, if anything."""
            fresh = pending[0] == fresh_step
            logged = _log_step(
                pending[:4], cfg, self.logger, self.throughput, self.bar, force, fresh
            )
            final.update(logged)
            if fresh:
                self.throughput.reset()
            self.watchdog.heartbeat()
            return self._divergence(final, handed_out=pending[4])

        while step < total:
            self.faults.before_step(step)
            self.profiler.at_step(step, self.state)
            t0 = time.perf_counter()
            batch = next(self.loader)
            data_wait = time.perf_counter() - t0
            batch_index = self.loader.state()["batches"] - 1
            poisoned = self.faults.poisons(batch_index)
            if self.faults.scrambles(batch_index):
                batch = self._scrambled(batch, batch_index)
            step_fn = self.poisoned_step_fn if poisoned else self.step_fn
            if step == self.start_step:
                self.watchdog.disarm()  # the first step compiles: no hang
            self.state, out = step_fn(self.state, batch)
            # dispatch returns once compiled; a hung device blocks reading metrics, below
            self.watchdog.heartbeat()
            # read step n-1's metrics only after step n is dispatched: the host never stalls
            rollback_due = None if pending is None else finish(pending)
            now = time.perf_counter()
            # with the batches handed out through this step: where a rollback's skip ends,
            # whether its metrics are read at once or one step later
            pending = (step, out, now - last_time, data_wait, batch_index + 1)
            last_time = now
            step += 1
            # before any rollback: with several processes only this step is the agreed one
            preempted = self.preemption.reached(step)
            if rollback_due:
                step = fresh_step = self._rollback(rollback_due)
                pending, last_time = None, time.perf_counter()
                if preempted:  # the checkpoint rolled back to is this state (less the skip)
                    return self._stopped(final, step, saved=True)
                continue
            last_step = step == total
            # due() first, on every process alike (preempted too: all processes are at the
            # agreed step): with several processes it is a collective now and then
            due = self.saving and not last_step and self.checkpointer.due(step)
            scheduled = self.saving and not last_step and (due or self.save_waiting)
            save_now = self.saving and (preempted or last_step or scheduled)
            # why: a rollback goes back to scheduled saves, as the uninterrupted run does
            reason = "scheduled" if scheduled else ("final" if last_step else "preemption")
            evaluate_now = _evaluates_at(cfg, step)
            if save_now or preempted or evaluate_now:
                rollback_due = finish(pending, force=True)
                pending = None
                if rollback_due:
                    step = fresh_step = self._rollback(rollback_due)
                    last_time = time.perf_counter()
                    if preempted:
                        return self._stopped(final, step, saved=True)
                    continue
            # this step's loss is read: see _spike_open. A scheduled save waits; a preemption
            # saves nothing (the resumed run replays the streak from the checkpoint before)
            if (scheduled or preempted) and self._spike_open():
                save_now = False
                self.save_waiting |= scheduled
            if save_now:
                self.save_waiting = False
                self._save(step, reason, wait=preempted or last_step)
            elif self.saving:
                self._log_saves(step)
            if preempted:
                why = "a loss streak is open: it resumes from the checkpoint before it"
                return self._stopped(final, step, saved=save_now, why=None if save_now else why)
            # evaluations and exports are no step time: their span is taken out of the clock,
            # not the clock restarted after them, which would drop the step finished before
            # them (its execution ends in the wait above) from the next step's time
            paused = time.perf_counter()
            if evaluate_now and not last_step:
                self._evaluate_and_log(step)
            if self._export_due(step):
                self._export_hf(self._hf_step_dir(step))
            last_time += time.perf_counter() - paused
        jax.block_until_ready(self.state)
        self.profiler.at_step(total, self.state)  # a window ending with the run: not the eval
        final.update(self._evaluate_and_log(total), step=total)
        final.update(self.save_times)
        if cfg.train.export_hf:
            final["hf_dir"] = str(self._export_hf(self.run_dir / "hf"))
        if self.is_main:  # launch scripts requeue a job until this file exists
            write_atomic(self.run_dir / "complete.json", json.dumps(final, indent=1) + "\n")
        return final

    def _discard_exports_after(self, step: int) -> None:
        """Remove train.export_hf_every's exports past `step`: those steps are trained again."""
        if not self.is_main:
            return
        for folder in (self.run_dir / HF_STEPS_DIR).glob("ba*"):
            if folder.name[2:].isdigit() and int(folder.name[2:]) > step:
                (folder / "config.json").unlink(missing_ok=True)  # first: no longer whole
                shutil.rmtree(folder)

    def _hf_step_dir(self, step: int) -> Path:
        return self.run_dir / HF_STEPS_DIR / f"ba{step}"

    def _export_due(self, step: int) -> bool:
        """train.export_hf_every's step, not written yet (a resumed run may have written it: a
        complete folder has its config.json, written last)."""
        every = self.cfg.train.export_hf_every
        if not every or step % every:
            return False
        done = (self._hf_step_dir(step) / "config.json").is_file()
        if jax.process_count() > 1:  # process 0's view: all gather the tensors, or none
            done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
        return not done

    def _export_hf(self, out_dir: Path) -> Path:
        """The current parameters as an HF MPT folder (written whole, then renamed)."""
        self.watchdog.heartbeat()
        model = nnx.merge(self.graphdef, self.state.params)  # fetched tensor by tensor
        if self.is_main:  # with its data's EOS, at which transformers' generate() stops
            eos = {"eos_token_id": self.datasets[0][0].eos_id}
            out_dir = model.save_pretrained(out_dir, overwrite=True, token_ids=eos)
        else:  # tensors sharded across processes are gathered by all of them, in order
            for _ in model.hf_tensors():
                pass
        self.watchdog.heartbeat()
        return out_dir

    def _scrambled(self, batch: dict[str, jax.Array], batch_index: int) -> dict[str, jax.Array]:
        """The batch with uniformly random tokens: the spike drill's noise (`spike@A-B`)."""
        if self.scramble is None:
            vocab = self.cfg.model.vocab_size

            def noise(ids, index):
                key = jax.random.fold_in(jax.random.key(0), index)
                return jax.random.randint(key, ids.shape, 0, vocab, ids.dtype)

            self.scramble = jax.jit(noise, out_shardings=self.batch_sharding)
        return {**batch, "input_ids": self.scramble(batch["input_ids"], batch_index)}

    def _evaluate_and_log(self, step: int) -> dict[str, float]:
        """Evaluate, and log val_loss and val_perplexity at `step`; returns them."""
        self.watchdog.heartbeat()
        # the training data's val split, then data.eval's, each logged under its own label
        val_sets = [("", self.datasets)]
        val_sets += [(f"/{label}", [(meta, 1.0)]) for label, meta in self.eval_datasets]
        values = {}
        for suffix, datasets in val_sets:
            loss = evaluate(
                self.eval_fn,
                self.state.params,
                datasets,
                self.cfg,
                self.batch_sharding,
                on_batch=self.watchdog.heartbeat,
            )
            values[f"val_loss{suffix}"] = loss
            values[f"val_perplexity{suffix}"] = math.exp(min(loss, 50))
        if self.icl is not None:
            params = compute_params(self.cfg, self.state.params)  # as the eval step sees them
            values |= self.icl.evaluate(
                self.graphdef, params, self.mesh, on_batch=self.watchdog.heartbeat
            )
        self.logger.log(step, values)
        return values

    def close(self) -> None:
        """Release what `start` set up, also after a failed start."""
        for part, method in (
            (self.watchdog, "close"),
            (self.preemption, "close"),
            (self.profiler, "stop"),
            (self.loader, "close"),
            (self.logger, "close"),
            (self.bar, "close"),
            (self.checkpointer, "close"),
        ):
            if part is not None:
                getattr(part, method)()


def _log_step(pending, cfg: RunConfig, logger, throughput, bar, force=False, fresh=False) -> dict:
    """Log one step's metrics. `fresh`: the first step of a start, whose time is mostly
    compilation, or after a rollback, timed from the restore's end: its rates are unknown
    (null), as before composer's speed window fills."""
    step, out, step_time, data_wait = pending
    values = {k: v.item() for k, v in jax.device_get(out).items()}
    batch_tokens = cfg.train.global_batch * cfg.seq_len
    throughput.update(max(step_time, 1e-9), cfg.train.global_batch, batch_tokens)
    rates = throughput.compute()
    if fresh:
        rates = {key: None for key in rates}
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
        "skipped_steps": values["skipped_steps"],
        # the steps left at the window's pace; evaluations and saves not counted (composer's
        # runtime_estimator)
        "remaining_s": None if fresh else (cfg.total_steps - step - 1) * rates["step_time_s"],
    }
    if cfg.train.remat == "full":
        metrics["hfu"] = rates.get("hfu")  # null with mfu where the peak is unknown (CPU)
    bad = values["bad_streak"] > 0
    bar.update(1)
    bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
    if force or bad or (step + 1) % cfg.train.log_every == 0 or step == 0:
        memory = memory_in_use_gib(jax.local_devices())  # process 0's devices
        logger.log(step + 1, {**{k: v for k, v in metrics.items() if k != "step"}, **memory})
    if bad:
        print(
            f"step {step + 1}: non-finite loss {values['loss']} "
            f"(grad_norm {values['grad_norm']}); "
            f"update skipped ({values['bad_streak']} in a row)",
            file=sys.stderr,
            flush=True,
        )
    return {**metrics, "bad_streak": values["bad_streak"]}


def _progress(total: int, show: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        disable=not show,
        file=run_log.terminal_stderr(),  # its redraws stay out of the run log
    )


class _Profiler:
    """Traces steps [first, last) of train.profile with jax.profiler (TensorBoard / Perfetto).

    The first step of a start compiles: a window holding it starts after it, as MaxText skips
    its first steps. The host runs a step ahead: the step before the window and the window's
    last step are waited for at its edges, so that the trace holds the window's steps alone."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, start_step: int):
        self.window, self.out_dir = window, out_dir
        self.active = self.done = False
        if window is not None and window[0] <= start_step < window[1]:
            begin = start_step + 1
            why = "the run resumed inside the window and " if start_step > window[0] else ""
            what = f"tracing steps [{begin}, {window[1]}) only" if begin < window[1] else "nothing"
            print(
                f"train.profile: {what} of [{window[0]}, {window[1]}): {why}step {start_step} "
                "compiles",
                file=sys.stderr,
            )
            self.window = (begin, window[1]) if begin < window[1] else None

    def at_step(self, step: int, state: Any) -> None:
        """Before step `step` (0-based) is dispatched; `state` holds the steps dispatched."""
        if self.window is None or self.done:
            return
        first, last = self.window
        if not self.active and first <= step < last:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.out_dir), create_perfetto_trace=True)
            self.active = True
        elif self.active and step >= last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True


def load_and_run(config_path: str, overrides: list[str], *, overwrite: bool = False) -> dict:
    """Load a YAML run config with overrides, join the other processes if any, and train."""
    from mpt_jax.config import apply_overrides, load_yaml

    raw = apply_overrides(load_yaml(config_path), overrides)
    cfg = run_config_from_dict(raw, where=config_path)
    distributed.initialize(cfg.distributed)  # before any other JAX call
    return run(cfg, overwrite=overwrite)


__all__ = [
    "NonFiniteLossError",
    "TrainState",
    "build_model",
    "evaluate",
    "init_state",
    "jit_train_step",
    "load_and_run",
    "make_eval_step",
    "make_train_step",
    "run",
]
