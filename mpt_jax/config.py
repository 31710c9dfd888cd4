"""Typed, validated model config with llm-foundry's MPT field names; YAML and dotted overrides."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "experiments" / "models"

AttnType = Literal["multihead_attention", "multiquery_attention", "grouped_query_attention"]
NormType = Literal["low_precision_layernorm", "layernorm", "low_precision_rmsnorm", "rmsnorm"]
FfnType = Literal["mptmlp", "mptglu"]
ActFn = Literal["gelu", "silu", "relu"]
AttnImpl = Literal["auto", "xla", "cudnn", "pallas_gpu", "pallas_mgpu", "pallas_tpu", "tokamax"]
NormImpl = Literal["auto", "xla", "pallas_gpu"]
InitName = Literal["kaiming_normal_", "kaiming_uniform_", "baseline_", "small_init_", "neox_init_"]
FanMode = Literal["fan_in", "fan_out"]
Nonlinearity = Literal["relu", "leaky_relu", "linear"]


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig:
    """llm-foundry's `init_config` (param_init_fns.py); defaults are llm-foundry's."""

    name: InitName = "kaiming_normal_"
    fan_mode: FanMode = "fan_in"
    init_nonlinearity: Nonlinearity = "relu"
    # True divides residual projections (out_proj, down_proj) by sqrt(2 * n_layers); a number
    # is used as the divisor itself.
    init_div_is_residual: bool | float = True
    emb_init_std: float | None = None
    emb_init_uniform_lim: float | tuple[float, float] | None = None
    init_std: float | None = None  # required by baseline_
    init_gain: float = 0.0  # kaiming's `a` (leaky_relu slope)

    def __post_init__(self) -> None:
        check_choices(self, "init_config")
        if self.name == "baseline_" and self.init_std is None:
            raise ConfigError("init_config.init_std: baseline_ init needs init_std (a float > 0)")
        for field in ("init_std", "emb_init_std"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(f"init_config.{field}: must be > 0, got {value}")
        div = self.init_div_is_residual
        if not isinstance(div, bool) and div <= 0:
            raise ConfigError(
                f"init_config.init_div_is_residual: must be true, false or > 0, got {div}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """MPT hyperparameters named and defaulted as llm-foundry's MPTConfig (attn fields flat)."""

    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: float = 4  # FFN width = d_model * expansion_ratio, which must be integral
    max_seq_len: int = 2048
    vocab_size: int = 50368  # released MPT-7B/30B use 50432
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = True
    no_bias: bool = False  # removes Linear biases *and* LayerNorm biases
    norm_type: NormType = "low_precision_layernorm"
    norm_eps: float = 1e-5
    norm_impl: NormImpl = "auto"  # mpt_jax: the norms' kernels (same math); auto: xla for now
    logit_scale: float | Literal["inv_sqrt_d_model"] | None = None
    embedding_fraction: float = 1.0  # GLM-130B trick: scales the gradient into the embeddings
    tie_word_embeddings: bool = True
    init_config: InitConfig = dataclasses.field(default_factory=InitConfig)
    # attn_config, flattened
    attn_type: AttnType = "multihead_attention"
    kv_n_heads: int | None = None  # None: n_heads for MHA, 1 for MQA; required for GQA
    attn_pdrop: float = 0.0
    qk_ln: bool = False
    clip_qkv: float | None = None
    softmax_scale: float | None = None  # None: 1 / sqrt(d_model / n_heads)
    alibi: bool = False
    alibi_bias_max: float = 8
    attn_uses_sequence_id: bool = False
    attn_impl: AttnImpl = "auto"
    # ffn_config, flattened
    ffn_type: FfnType = "mptmlp"
    ffn_act_fn: ActFn = "gelu"  # gelu is exact (erf), as in llm-foundry
    # mpt_jax: stack the blocks and run them with lax.scan (same math, much faster compiles)
    scan_layers: bool = False

    def __post_init__(self) -> None:
        check_choices(self, "model")
        for field in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"model.{field}: must be > 0, got {getattr(self, field)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads: d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads})"
            )
        if self.expansion_ratio <= 0 or not float(self.d_model * self.expansion_ratio).is_integer():
            raise ConfigError(
                f"model.expansion_ratio: d_model * expansion_ratio must be a positive integer, "
                f"got {self.d_model} * {self.expansion_ratio}"
            )
        self._check_heads()
        if self.alibi and self.learned_pos_emb:
            raise ConfigError(
                "model.learned_pos_emb: cannot be true together with alibi: true "
                "(set learned_pos_emb: false)"
            )
        for field in ("resid_pdrop", "emb_pdrop", "attn_pdrop"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{field}: must be in [0, 1), got {value}")
        if not 0.0 < self.embedding_fraction <= 1.0:
            raise ConfigError(
                f"model.embedding_fraction: must be in (0, 1], got {self.embedding_fraction}"
            )
        positive = ("norm_eps", "clip_qkv", "softmax_scale", "alibi_bias_max")
        for field in positive:
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{field}: must be > 0, got {value}")
        if isinstance(self.logit_scale, float | int) and self.logit_scale == 0:
            raise ConfigError("model.logit_scale: must be non-zero, 'inv_sqrt_d_model' or null")

    def _check_heads(self) -> None:
        kv = self.kv_n_heads
        if kv is not None and kv <= 0:
            raise ConfigError(f"model.kv_n_heads: must be > 0, got {kv}")
        if self.attn_type == "multihead_attention" and kv not in (None, self.n_heads):
            raise ConfigError(
                f"model.kv_n_heads: multihead_attention uses n_heads ({self.n_heads}) kv heads, "
                f"got {kv}; use attn_type: grouped_query_attention"
            )
        if self.attn_type == "multiquery_attention" and kv not in (None, 1):
            raise ConfigError(f"model.kv_n_heads: multiquery_attention uses 1 kv head, got {kv}")
        if self.attn_type == "grouped_query_attention":
            if kv is None:
                raise ConfigError("model.kv_n_heads: required for grouped_query_attention")
            if kv > self.n_heads or self.n_heads % kv:
                raise ConfigError(
                    f"model.kv_n_heads: n_heads ({self.n_heads}) must be divisible by "
                    f"kv_n_heads ({kv})"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        """kv_n_heads resolved from attn_type."""
        if self.attn_type == "multiquery_attention":
            return 1
        return self.kv_n_heads if self.kv_n_heads is not None else self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return int(self.d_model * self.expansion_ratio)

    @property
    def resolved_softmax_scale(self) -> float:
        # llm-foundry divides d_model by n_heads here even if head_dim were overridden
        if self.softmax_scale is not None:
            return float(self.softmax_scale)
        return 1.0 / math.sqrt(self.d_model / self.n_heads)

    @property
    def resolved_logit_scale(self) -> float | None:
        if self.logit_scale == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.d_model)
        return None if self.logit_scale is None else float(self.logit_scale)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "model") -> ModelConfig:
        """Build from flat fields; llm-foundry's nested `attn_config`/`ffn_config` are accepted."""
        flat = dict(data)
        for nested in ("attn_config", "ffn_config"):
            if nested in flat:
                sub = flat.pop(nested)
                if not isinstance(sub, Mapping):
                    raise ConfigError(f"{where}.{nested}: expected a mapping, got {sub!r}")
                for key, value in sub.items():
                    if key in flat:
                        raise ConfigError(f"{where}.{nested}.{key}: also given at the top level")
                    flat[key] = value
        act = flat.get("ffn_act_fn")
        if isinstance(act, Mapping):  # llm-foundry's form, {name: silu}, as in its YAMLs
            if set(act) - {"name", "approximate"} or act.get("approximate", "none") != "none":
                raise ConfigError(
                    f"{where}.ffn_act_fn: expected a name or {{name: gelu | silu | relu}} "
                    f"(exact gelu), got {dict(act)!r}"
                )
            flat["ffn_act_fn"] = act.get("name")
        return from_dict(cls, flat, where=where)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON friendly)."""
        return to_dict(self)


# ---------------------------------------------------------------------------------------------
# Training run configs

Precision = Literal["amp_bf16", "fp32", "pure_bf16"]
# llm-foundry's fsdp_config.mixed_precision: FULL leaves parameters as stored outside the
# matmuls (torch autocast); DEFAULT and PURE cast every one to the compute dtype (FSDP's
# param_dtype), so embeddings, norms and the residual stream run in bf16 too
MixedPrecision = Literal["FULL", "DEFAULT", "PURE"]
Remat = Literal["none", "dots_saveable", "full"]
OptimName = Literal["decoupled_adamw", "decoupled_lionw", "adamw"]
ScheduleName = Literal[
    "cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup", "inv_sqrt_with_warmup"
]
_TIME_UNITS = ("ba", "tok", "sp", "dur")


def split_time(value: str, where: str, *, allow_dur: bool = True) -> tuple[float, str]:
    """(number, unit) of a composer time string: `100ba`, `2.5e9tok`, `512sp`, `0.05dur`."""
    unit = next((u for u in _TIME_UNITS if value.endswith(u)), None)
    try:
        number = float(value[: -len(unit)]) if unit else -1.0
    except ValueError:
        number = -1.0
    if not number >= 0:  # NaN too
        raise ConfigError(
            f"{where}: {value!r} is not a time (a number with ba, tok, sp or dur, e.g. 100ba)"
        )
    if unit == "dur" and not allow_dur:
        raise ConfigError(f"{where}: {value!r} cannot be in units of dur")
    if unit != "dur" and not number.is_integer():
        # composer's Time refuses a fractional count of batches, samples or tokens
        raise ConfigError(
            f"{where}: {value!r} is not a whole number of {unit} (only dur is a fraction)"
        )
    return number, unit


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSource:
    """One dataset of a weighted mixture."""

    path: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSource:
    """A dataset whose val split is evaluated beside the training data's (an eval_loader of
    llm-foundry's list); logged as val_loss/LABEL."""

    label: str
    path: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where batches come from; `path` is a prepared folder or `builtin:python-stdlib`."""

    path: str | None = None
    mixture: tuple[DataSource, ...] = ()
    tokenizer: str = "byte"  # 'byte' or a tokenizer.json; built-in corpora are prepared with it
    shuffle: bool = True
    num_threads: int = 2
    prefetch: int = 2
    eval: tuple[EvalSource, ...] = ()  # more val splits at every evaluation

    def __post_init__(self) -> None:
        if (self.path is None) == (not self.mixture):
            raise ConfigError("data: give exactly one of data.path and data.mixture")
        labels = [source.label for source in self.eval]
        for i, label in enumerate(labels):
            if not label or "/" in label or label != label.strip():
                raise ConfigError(
                    f"data.eval[{i}].label: {label!r} must be a non-empty name without '/' "
                    "or surrounding spaces (it becomes val_loss/LABEL)"
                )
            if label in labels[:i]:
                raise ConfigError(f"data.eval[{i}].label: {label!r} is given twice")
        for i, source in enumerate(self.mixture):
            if source.weight <= 0:
                raise ConfigError(f"data.mixture[{i}].weight: must be > 0, got {source.weight}")
        if self.num_threads < 0:  # 0: grain reads in the loader's own thread
            raise ConfigError(f"data.num_threads: must be >= 0, got {self.num_threads}")
        if self.prefetch < 0:  # 0 and 1 alike: one batch ahead
            raise ConfigError(f"data.prefetch: must be >= 0, got {self.prefetch}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """composer's DecoupledAdamW / llm-foundry's DecoupledLionW, or optax-style AdamW."""

    name: OptimName = "decoupled_adamw"
    lr: float = 6.0e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    clipping_threshold: float | None = 1.0  # global gradient L2 norm; null disables

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: each must be in [0, 1), got {list(self.betas)}")
        for name in ("eps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(self, name)}")
        if self.clipping_threshold is not None and self.clipping_threshold <= 0:
            raise ConfigError(
                f"optim.clipping_threshold: must be > 0, got {self.clipping_threshold}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """LR multiplier schedules with composer's semantics and time strings."""

    name: ScheduleName = "cosine_with_warmup"
    t_warmup: str = "100ba"
    t_max: str = "1dur"
    alpha_f: float = 0.0  # cosine / linear: final multiplier
    alpha_i: float = 1.0  # linear: multiplier after warmup
    alpha: float = 1.0  # constant: multiplier after warmup
    t_scale: str = "100ba"  # inv_sqrt
    t_cooldown: str = "0ba"  # inv_sqrt
    alpha_f_decay: float = 0.0  # inv_sqrt
    alpha_f_cooldown: float = 0.0  # inv_sqrt

    def __post_init__(self) -> None:
        inv_sqrt = self.name == "inv_sqrt_with_warmup"
        # valid times now; they become steps once the run's length is known (mpt_jax.optim)
        split_time(self.t_warmup, "schedule.t_warmup", allow_dur=not inv_sqrt)
        split_time(self.t_max, "schedule.t_max")
        split_time(self.t_scale, "schedule.t_scale", allow_dur=False)
        split_time(self.t_cooldown, "schedule.t_cooldown", allow_dur=False)
        if inv_sqrt and self.alpha_f_decay < self.alpha_f_cooldown:
            raise ConfigError("schedule.alpha_f_decay: must be >= alpha_f_cooldown")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh sizes; one of them may be -1 (filled from the device count).

    The dcn_* factors say how much of each axis crosses slices (TPU multislice) or, on GPU and
    CPU, processes (one per node): a hybrid mesh. dcn_data null means: all slices on data.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int | None = None
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh: sizes must be positive with at most one -1, got {sizes}")
        for name in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"mesh.{name}: must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """jax.distributed settings; unset fields come from MPT_JAX_* variables or auto-detection."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # one process per node driving these GPUs
    initialization_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes: must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ConfigError(f"distributed.process_id: must be >= 0, got {self.process_id}")
        if self.initialization_timeout_s <= 0:
            raise ConfigError("distributed.initialization_timeout_s: must be > 0")


SpikeAction = Literal["off", "log", "stop", "rollback"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSpikeConfig:
    """llm-foundry's kill_loss_spike, with a rollback besides (docs/fault-tolerance.md)."""

    # log: report; stop: exit 3 (a restart would repeat it); rollback: to the newest checkpoint
    # before the spike, past its data (as after non-finite losses)
    action: SpikeAction = "log"
    patience: int = 4  # outliers in a row tolerated: the next one is a spike
    outlier_multiplier: float = 2.0  # an outlier: a loss >= this x the mean of the window
    window: int | None = None  # losses in the window; null: max(100, 5% of the run's steps)
    loss_cap: float | None = None  # null: min(10, the first window's highest loss)

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ConfigError(f"train.loss_spike.patience: must be >= 0, got {self.patience}")
        if self.outlier_multiplier <= 1:
            raise ConfigError(
                "train.loss_spike.outlier_multiplier: must be > 1 (a loss at the mean would be "
                f"an outlier), got {self.outlier_multiplier}"
            )
        if self.window is not None and self.window < 1:
            raise ConfigError(f"train.loss_spike.window: must be >= 1, got {self.window}")
        if self.loss_cap is not None and self.loss_cap <= 0:
            raise ConfigError(f"train.loss_spike.loss_cap: must be > 0, got {self.loss_cap}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Batch, duration, precision and logging of a training run."""

    global_batch: int = 8  # sequences per optimizer step
    # sequences per forward/backward, accumulated; null: the global batch; auto: the largest
    # that fits the device's memory (composer's device_train_microbatch_size: auto)
    microbatch: int | Literal["auto"] | None = None
    steps: int | None = None
    tokens: int | None = None  # token budget instead of steps (rounded up to whole steps)
    seed: int = 17
    precision: Precision = "amp_bf16"
    mixed_precision: MixedPrecision = "FULL"
    remat: Remat = "none"
    # cross-entropy over chunks of this many positions, never holding the (B, S, V) logits;
    # null: the whole logits at once
    loss_chunk: int | None = None
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_first: bool = False  # also evaluate before the first step (llm-foundry's eval_first)
    eval_batches: int | None = 8  # null: the whole val split (eval_subset_num_batches: -1)
    # llm-foundry's icl_tasks: a task-list YAML (as for `mpt-jax eval --tasks`) run at every
    # evaluation, with an eval_gauntlet YAML (else the list's inline eval_gauntlet, if any)
    icl_tasks: str | None = None
    eval_gauntlet: str | None = None
    icl_subset_num_batches: int | None = None  # null: every example of each task
    profile: tuple[int, int] | None = None  # [first, last) steps traced with jax.profiler
    progress: bool = True
    export_hf: bool = False  # write RUN_DIR/hf with save_pretrained at the end
    # also RUN_DIR/hf-steps/ba<step> every N steps (llm-foundry's hf_checkpointer save_interval)
    export_hf_every: int | None = None
    wandb_project: str | None = None  # logs to Weights & Biases when set and wandb is installed
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    # fault tolerance (docs/fault-tolerance.md)
    watchdog_minutes: float | None = 30.0  # no step completed for this long: dump stacks, exit 75
    nonfinite_patience: int = 5  # consecutive skipped (non-finite) steps before a rollback
    rollback_skip_batches: int = 0  # batches skipped beyond the bad window after a rollback
    max_rollbacks: int = 3
    loss_spike: LossSpikeConfig = dataclasses.field(default_factory=LossSpikeConfig)

    @property
    def fixed_microbatch(self) -> int | None:
        """`microbatch` when a number (None: the whole batch, or `auto` not chosen yet)."""
        return self.microbatch if isinstance(self.microbatch, int) else None

    def __post_init__(self) -> None:
        if self.global_batch <= 0:
            raise ConfigError(f"train.global_batch: must be > 0, got {self.global_batch}")
        if isinstance(self.microbatch, int) and (
            self.microbatch <= 0 or self.global_batch % self.microbatch
        ):
            raise ConfigError(
                f"train.microbatch: must divide train.global_batch ({self.global_batch}), "
                f"got {self.microbatch}"
            )
        if (self.steps is None) == (self.tokens is None):
            raise ConfigError("train: give exactly one of train.steps and train.tokens")
        for field in ("steps", "tokens"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{field}: must be > 0, got {value}")
        if self.loss_chunk is not None and self.loss_chunk <= 0:
            raise ConfigError(f"train.loss_chunk: must be > 0, got {self.loss_chunk}")
        for name in ("eval_gauntlet", "icl_subset_num_batches"):
            if getattr(self, name) is not None and self.icl_tasks is None:
                raise ConfigError(f"train.{name}: needs train.icl_tasks")
        for name, least in (
            ("log_every", 1),
            ("eval_every", 0),
            ("eval_batches", 1),
            ("icl_subset_num_batches", 1),
            ("export_hf_every", 1),
        ):
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise ConfigError(f"train.{name}: must be >= {least}, got {getattr(self, name)}")
        if self.profile is not None and not 0 <= self.profile[0] < self.profile[1]:
            raise ConfigError(f"train.profile: expected [first, last) steps, got {self.profile}")
        if self.watchdog_minutes is not None and self.watchdog_minutes <= 0:
            raise ConfigError(f"train.watchdog_minutes: must be > 0, got {self.watchdog_minutes}")
        if self.nonfinite_patience < 1:
            raise ConfigError(
                f"train.nonfinite_patience: must be >= 1, got {self.nonfinite_patience}"
            )
        if self.rollback_skip_batches < 0 or self.max_rollbacks < 0:
            raise ConfigError("train.rollback_skip_batches and train.max_rollbacks: must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints in RUN_DIR/checkpoints/<step>/ (docs/fault-tolerance.md)."""

    enabled: bool = True
    every: int | None = 1000  # steps (llm-foundry's save_interval 1000ba); null: time and end only
    every_minutes: float | None = 30.0  # time backstop between step-based saves
    keep: int = 3  # the latest K are kept
    keep_every: int | None = None  # steps that are multiples of P are also kept for good
    async_save: bool = True  # write in the background while training continues

    def __post_init__(self) -> None:
        for field in ("every", "keep_every"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ConfigError(f"checkpoint.{field}: must be > 0, got {value}")
        if self.every_minutes is not None and self.every_minutes <= 0:
            raise ConfigError(f"checkpoint.every_minutes: must be > 0, got {self.every_minutes}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep: must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything `mpt-jax train` needs."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    init_from: str | None = None  # weights only: an HF MPT folder, a run folder or a step folder
    run_dir: str

    def __post_init__(self) -> None:
        _check_schedule_covers_run(self.schedule, self.train)
        if self.train.profile is not None and self.train.profile[1] > self.total_steps:
            raise ConfigError(
                f"train.profile: [{self.train.profile[0]}, {self.train.profile[1]}) ends past "
                f"the run's {self.total_steps} steps (the trace would hold its final evaluation "
                "and save)"
            )
        if self.train.loss_spike.action == "rollback" and not self.checkpoint.enabled:
            raise ConfigError(
                "train.loss_spike.action: rollback needs checkpoints to roll back to "
                "(checkpoint.enabled is false); use stop or log"
            )

    @property
    def seq_len(self) -> int:
        return self.model.max_seq_len

    @property
    def total_steps(self) -> int:
        if self.train.steps is not None:
            return self.train.steps
        return -(-self.train.tokens // (self.train.global_batch * self.seq_len))


def _check_schedule_covers_run(schedule: ScheduleConfig, train: TrainConfig) -> None:
    """Refuse a t_max that ends before the run, where composer's units make them comparable."""
    if schedule.name == "inv_sqrt_with_warmup":
        return
    number, unit = split_time(schedule.t_max, "schedule.t_max")
    duration, run_unit = (train.steps, "ba") if train.steps is not None else (train.tokens, "tok")
    if unit == "dur":
        ends = int(number * duration)  # composer rounds a duration fraction down
    elif unit == run_unit:
        ends = number
    else:
        return  # composer cannot compare them either and lets them pass
    if ends < duration:
        length = f"train.steps {duration}" if run_unit == "ba" else f"train.tokens {duration}"
        raise ConfigError(
            f"schedule.t_max: {schedule.t_max!r} ends before the run ({length}); composer "
            "refuses a schedule shorter than max_duration"
        )


def _model_section(value: Any, where: str) -> ModelConfig:
    """`model:` is a preset name, or fields with an optional `preset:` to start from."""
    if isinstance(value, str):
        return load_model_config(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a preset name or a mapping, got {value!r}")
    fields = dict(value)
    preset = fields.pop("preset", None)
    if preset is not None:
        base = load_model_config(preset).to_dict()
        base.update(fields)
        fields = base
    return ModelConfig.from_dict(fields, where=where)


def run_config_from_dict(data: Mapping[str, Any], *, where: str = "config") -> RunConfig:
    """Validate a whole run config (model section resolved from presets)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    for key in ("model", "data", "train", "run_dir"):
        if key not in data:
            raise ConfigError(f"{where}: the {key!r} section is missing")
    data["model"] = _model_section(data["model"], "model")
    return from_dict(RunConfig, data, where="")


def with_defaults(saved: Any) -> Any:
    """A saved resolved run config (a run folder's config.yaml) with the fields added since it
    was written at their defaults, so that it compares equal to the same config resolved today;
    as saved if it no longer parses."""
    try:
        return to_dict(run_config_from_dict(saved))
    except Exception:  # a config that no longer parses (hand edits too) is compared as saved
        return saved


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run YAML and apply dotted `key=value` overrides."""
    data = apply_overrides(load_yaml(path), overrides)
    return run_config_from_dict(data, where=str(path))


# ---------------------------------------------------------------------------------------------
# Generic typed loading: unknown keys and wrong types are errors naming the dotted field.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return "a list of " + ", ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, where)
            except ConfigError:
                continue
        raise _mismatch(where, tp, value)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        raise ConfigError(f"{where}: must be one of {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if isinstance(value, Sequence) and not isinstance(value, str):
                return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == len(args):
            return tuple(
                _convert(a, v, f"{where}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, where=where)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # not NaN or infinity, which every range check would pass (_mismatch says so)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return value if isinstance(value, int) else float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in a config class
        raise TypeError(f"unsupported annotation {tp!r} at {where}")
    raise _mismatch(where, tp, value)


def check_choices(obj: Any, where: str) -> None:
    """Fields of dataclass `obj` whose type names choices (a Literal) hold one of them: a config
    built in Python, not from a mapping, is held to what from_dict checks (a misspelt norm type
    would otherwise fall through to another one's math)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        parts = (tp, *typing.get_args(tp))
        if any(typing.get_origin(part) is Literal for part in parts):
            _convert(tp, getattr(obj, f.name), f"{where}.{f.name}")


def _mismatch(where: str, tp: Any, value: Any) -> ConfigError:
    """The wrong-type error; a whole number written as a float (2.5e9) for an int, and a NaN or
    infinity for a float, are told so."""
    hint = ""
    wants = (tp, *typing.get_args(tp))
    if float in wants and isinstance(value, float) and not math.isfinite(value):
        return ConfigError(f"{where}: expected a finite number, got {value!r}")
    if int in wants and isinstance(value, float) and value.is_integer():
        hint = f" (write a whole number without a point or exponent: {int(value)})"
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}{hint}")


def from_dict(cls: type, data: Mapping[str, Any], *, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(fields))}"
        )
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and f.name not in data:  # not the constructor's TypeError
            raise ConfigError(f"{where or 'config'}: missing required key {f.name!r}")
    kwargs = {key: _convert(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclasses to plain dicts, tuples to lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# YAML and overrides


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `3e-4` and `2.5e9` as floats as YAML 1.2 (and llm-foundry's
    OmegaConf) does; YAML 1.1 wants a dot and a signed exponent (`3.0e-4`), else a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def safe_load_yaml(text: str) -> Any:
    """yaml.safe_load, with exponent floats without a dot read as floats."""
    return yaml.load(text, Loader=_YamlLoader)


def parse_value(text: str) -> Any:
    """Parse an override value: ints, floats (also `3e-4`), booleans, null, lists, strings."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        return safe_load_yaml(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with `a.b=value` overrides applied."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if node is out and part == "model" and isinstance(child, str):
                child = node["model"] = {"preset": child}  # `model: mpt-125m` plus fields
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
            node = child
        node[parts[-1]] = parse_value(text)
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping (no object construction)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def preset_names() -> list[str]:
    """Model presets in experiments/models/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_model_config(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> ModelConfig:
    """A ModelConfig from a preset name, a YAML file or a mapping, plus `key=value` overrides."""
    if isinstance(source, Mapping):
        data, where = dict(source), "model"
    else:
        path = Path(source)
        if not path.suffix and (PRESET_DIR / f"{source}.yaml").is_file():
            path = PRESET_DIR / f"{source}.yaml"
        elif not path.is_file():
            raise ConfigError(
                f"model: {source!r} is neither a YAML file nor a preset "
                f"({', '.join(preset_names())})"
            )
        data, where = load_yaml(path), str(path)
    return ModelConfig.from_dict(apply_overrides(data, overrides), where=where)


# ---------------------------------------------------------------------------------------------
# Parameter shapes and counts, in llm-foundry's state-dict names and torch layout.


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """llm-foundry / transformers state-dict names -> shapes (torch Linear layout: (out, in))."""
    d, hd, ffn = cfg.d_model, cfg.head_dim, cfg.ffn_hidden
    h, kv = cfg.n_heads, cfg.num_kv_heads
    bias = not cfg.no_bias
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (cfg.vocab_size, d)}
    if cfg.learned_pos_emb:
        shapes["transformer.wpe.weight"] = (cfg.max_seq_len, d)

    def norm(prefix: str, width: int) -> None:
        shapes[f"{prefix}.weight"] = (width,)
        if bias and cfg.norm_type.endswith("layernorm"):
            shapes[f"{prefix}.bias"] = (width,)

    def linear(prefix: str, n_out: int, n_in: int) -> None:
        shapes[f"{prefix}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{prefix}.bias"] = (n_out,)

    for i in range(cfg.n_layers):
        p = f"transformer.blocks.{i}"
        norm(f"{p}.norm_1", d)
        linear(f"{p}.attn.Wqkv", (h + 2 * kv) * hd, d)
        if cfg.qk_ln:
            norm(f"{p}.attn.q_ln", h * hd)
            norm(f"{p}.attn.k_ln", kv * hd)
        linear(f"{p}.attn.out_proj", d, h * hd)
        norm(f"{p}.norm_2", d)
        linear(f"{p}.ffn.up_proj", ffn, d)
        if cfg.ffn_type == "mptglu":
            linear(f"{p}.ffn.gate_proj", ffn, d)
        linear(f"{p}.ffn.down_proj", d, ffn)
    norm("transformer.norm_f", d)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def count_params(cfg: ModelConfig) -> int:
    """Parameters as llm-foundry counts them (tied embeddings once), without allocating."""
    return sum(math.prod(shape) for shape in param_shapes(cfg).values())
