"""Typed, validated model config with llm-foundry's MPT field names; YAML and dotted overrides."""

from __future__ import annotations

import dataclasses
import math
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
AttnImpl = Literal["auto", "xla", "cudnn"]
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
        return from_dict(cls, flat, where=where)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON friendly)."""
        return to_dict(self)


# ---------------------------------------------------------------------------------------------
# Generic typed loading: unknown keys and wrong types are errors naming the dotted field.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
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
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        raise ConfigError(f"{where}: must be one of {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value if isinstance(value, int) else float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error in a config class
        raise TypeError(f"unsupported annotation {tp!r} at {where}")
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Mapping[str, Any], *, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(fields))}"
        )
    kwargs = {key: _convert(hints[key], value, f"{where}.{key}") for key, value in data.items()}
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


def parse_value(text: str) -> Any:
    """Parse an override value: ints, floats (also `3e-4`), booleans, null, lists, strings."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
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
    try:
        data = yaml.safe_load(text)
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
