"""HF MPT folders: config.json in transformers' or llm-foundry's keys, tensor checks, writes."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpt_jax.atomic_write import replace_folder, temporary_sibling
from mpt_jax.config import ConfigError, InitConfig, ModelConfig, from_dict, param_shapes
from mpt_jax.safetensors_io import CheckpointError, CheckpointReader, write_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "check_tensors",
    "config_from_hf",
    "config_to_hf",
    "read_config",
    "transformers_incompatibilities",
    "write_folder",
]

TRANSFORMERS_ARCH = "MptForCausalLM"  # transformers' built-in class
FOUNDRY_ARCH = "MPTForCausalLM"  # llm-foundry's class (trust_remote_code)

_TOP_LEVEL_FIELDS = (
    "d_model",
    "n_heads",
    "n_layers",
    "expansion_ratio",
    "max_seq_len",
    "vocab_size",
    "resid_pdrop",
    "emb_pdrop",
    "learned_pos_emb",
    "no_bias",
    "norm_type",
    "logit_scale",
    "embedding_fraction",
    "tie_word_embeddings",
)
_ATTN_FIELDS = (
    "attn_type",
    "kv_n_heads",
    "attn_pdrop",
    "qk_ln",
    "clip_qkv",
    "softmax_scale",
    "alibi",
    "alibi_bias_max",
    "attn_uses_sequence_id",
)
# attn_config / top-level features llm-foundry has and mpt_jax does not: (key, value when off)
UNSUPPORTED_FEATURES = {
    "attn_config": {
        "prefix_lm": False,
        "qk_gn": False,
        "rope": False,
        "sliding_window_size": -1,
        "attn_logit_softcapping": None,
        "kv_dim": None,
        "fused_qkv": True,
    },
    "top": {"final_logit_softcapping": None, "head_dim": None, "block_overrides": None},
}


# ---------------------------------------------------------------------------------------------
# Config


def read_config(folder: str | Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of an HF MPT folder; `overrides` set mpt_jax fields such as attn_impl."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected an HF MPT folder)")
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (an HF MPT folder needs config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config_from_hf(data, source=str(path), **overrides)


def _is_transformers_format(data: Mapping[str, Any]) -> bool:
    archs = data.get("architectures") or []
    return FOUNDRY_ARCH not in archs and "auto_map" not in data


def config_from_hf(
    data: Mapping[str, Any], *, source: str = "config.json", **overrides
) -> ModelConfig:
    """Translate an HF config dict (transformers' MptConfig or llm-foundry's MPTConfig)."""
    model_type = data.get("model_type")
    if model_type != "mpt":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, expected 'mpt'")
    attn = data.get("attn_config") or {}
    ffn = data.get("ffn_config") or {}
    init = data.get("init_config") or {}
    for name, sub in (("attn_config", attn), ("ffn_config", ffn), ("init_config", init)):
        if not isinstance(sub, Mapping):
            raise CheckpointError(f"{source}: {name} must be an object, got {sub!r}")
    for key, off in UNSUPPORTED_FEATURES["attn_config"].items():
        if attn.get(key, off) != off:
            raise CheckpointError(
                f"{source}: attn_config.{key}={attn[key]!r} is not supported by mpt_jax"
            )
    tuning = attn.get("attn_temperature_tuning") or {}
    if not isinstance(tuning, Mapping) or tuning.get("attn_scale", 0.0):
        raise CheckpointError(
            f"{source}: attn_config.attn_temperature_tuning={tuning!r} is not supported by mpt_jax"
        )
    for key, off in UNSUPPORTED_FEATURES["top"].items():
        if data.get(key, off) not in (off, None):
            raise CheckpointError(f"{source}: {key}={data[key]!r} is not supported by mpt_jax")

    fields: dict[str, Any] = {k: data[k] for k in _TOP_LEVEL_FIELDS if k in data}
    fields.update({k: attn[k] for k in _ATTN_FIELDS if k in attn})
    eps = data.get("norm_eps", data.get("layer_norm_epsilon"))
    if eps is not None:
        fields["norm_eps"] = eps
    if "ffn_type" in ffn:
        fields["ffn_type"] = ffn["ffn_type"]
    if "ffn_act_fn" in ffn:
        try:
            fields["ffn_act_fn"] = _act_from_hf(ffn["ffn_act_fn"], source)
        except CheckpointError:
            if not _is_transformers_format(data):
                raise
            fields["ffn_act_fn"] = repr(ffn["ffn_act_fn"])  # transformers ignores it: a warning
    known_init = {f for f in InitConfig.__dataclass_fields__}
    init_fields = {k: v for k, v in init.items() if k in known_init}
    try:
        from_dict(InitConfig, init_fields, where="init_config")
    except ConfigError as e:
        # how llm-foundry initialized the weights does not change the weights loaded here
        warnings.warn(
            f"{source}: {e}: init_config left at mpt_jax's defaults (the weights are loaded, not "
            "initialized; an export writes those defaults)",
            stacklevel=2,
        )
        init_fields = {}
    if init_fields:
        fields["init_config"] = init_fields
    # llm-foundry's attention_bias (None: not no_bias) gives Wqkv a bias of its own choosing
    attention_bias = data.get("attention_bias")
    no_bias = fields.get("no_bias", False)
    if not _is_transformers_format(data) and attention_bias not in (None, not no_bias):
        raise CheckpointError(
            f"{source}: attention_bias={attention_bias!r} with no_bias={no_bias!r} (a Wqkv bias "
            "unlike the other layers') is not supported by mpt_jax"
        )

    if _is_transformers_format(data):
        # transformers' MptForCausalLM always uses ALiBi with max 8, no positions, no biases,
        # MHA, a 4x GELU MLP, LayerNorm, no qk_ln and no logit scale, whatever the config
        # says: load what transformers would compute.
        forced = {
            "alibi": True,
            "alibi_bias_max": 8,
            "learned_pos_emb": False,
            "expansion_ratio": 4,
            "attn_type": "multihead_attention",
            "no_bias": True,
            "qk_ln": False,
            "logit_scale": None,
            "ffn_type": "mptmlp",
            "ffn_act_fn": "gelu",
        }
        if str(fields.get("norm_type", "")).endswith("rmsnorm"):
            forced["norm_type"] = "low_precision_layernorm"
        for key, value in forced.items():
            if key in fields and fields[key] != value and key != "learned_pos_emb":
                warnings.warn(
                    f"{source}: {key}={fields[key]!r} is ignored by transformers' MptForCausalLM; "
                    f"loading with {key}={value!r}",
                    stacklevel=2,
                )
            fields[key] = value
    elif fields.get("alibi"):
        fields["learned_pos_emb"] = False  # llm-foundry forces this too

    fields.update(overrides)
    try:
        return ModelConfig.from_dict(fields, where=source)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def _act_from_hf(act: Any, source: str) -> str:
    if isinstance(act, Mapping):
        name = act.get("name")
        if name == "gelu" and act.get("approximate", "none") != "none":
            raise CheckpointError(
                f"{source}: ffn_config.ffn_act_fn tanh-approximate gelu is not supported"
            )
        if name in ("gelu", "silu", "relu"):
            return name
    raise CheckpointError(f"{source}: ffn_config.ffn_act_fn={act!r} is not supported")


def transformers_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Features of `cfg` that transformers' MptForCausalLM cannot express (empty: it can)."""
    problems = []
    if not cfg.no_bias:
        problems.append("biases (no_bias: false)")
    if cfg.learned_pos_emb:
        problems.append("learned positions (learned_pos_emb: true)")
    if not cfg.alibi:
        problems.append("no ALiBi (alibi: false)")
    elif cfg.alibi_bias_max != 8:
        problems.append(f"alibi_bias_max {cfg.alibi_bias_max} (transformers hard-codes 8)")
    if cfg.attn_type != "multihead_attention":
        problems.append(f"attn_type {cfg.attn_type}")
    if cfg.qk_ln:
        problems.append("qk_ln")
    if cfg.expansion_ratio != 4:
        problems.append(f"expansion_ratio {cfg.expansion_ratio}")
    if cfg.logit_scale is not None:
        problems.append("logit_scale")
    if cfg.ffn_type != "mptmlp" or cfg.ffn_act_fn != "gelu":
        problems.append(f"ffn {cfg.ffn_type}/{cfg.ffn_act_fn}")
    if cfg.norm_type.endswith("rmsnorm"):
        problems.append(f"norm_type {cfg.norm_type}")
    if cfg.attn_pdrop != 0:  # transformers 5.x types attn_pdrop as an int
        problems.append(f"attn_pdrop {cfg.attn_pdrop}")
    return problems


# transformers' generic special-token ids: generate() stops at eos_token_id
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_token_ids(folder: str | Path) -> dict[str, int]:
    """The special-token ids an HF folder's config.json records (none where it has no file)."""
    try:
        data = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in TOKEN_ID_KEYS if type(data.get(k)) is int}


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json for transformers' MptForCausalLM, or llm-foundry's keys where it cannot load."""
    # transformers 5.x rejects a float attn_pdrop (its dataclass field is an int)
    attn_pdrop = 0 if cfg.attn_pdrop == 0 else cfg.attn_pdrop
    attn = {
        "attn_type": cfg.attn_type,
        "attn_pdrop": attn_pdrop,
        "attn_impl": "torch",
        "qk_ln": cfg.qk_ln,
        "clip_qkv": cfg.clip_qkv,
        "softmax_scale": cfg.softmax_scale,
        "prefix_lm": False,
        "alibi": cfg.alibi,
        "alibi_bias_max": cfg.alibi_bias_max,
        "attn_uses_sequence_id": cfg.attn_uses_sequence_id,
    }
    incompatible = transformers_incompatibilities(cfg)
    if cfg.kv_n_heads is not None:
        attn["kv_n_heads"] = cfg.kv_n_heads
    out: dict[str, Any] = {
        "architectures": [FOUNDRY_ARCH if incompatible else TRANSFORMERS_ARCH],
        "model_type": "mpt",
        **{k: getattr(cfg, k) for k in _TOP_LEVEL_FIELDS},
        "norm_eps": cfg.norm_eps,
        "layer_norm_epsilon": cfg.norm_eps,
        "attn_config": attn,
        "ffn_config": {"ffn_type": cfg.ffn_type, "ffn_act_fn": _act_to_hf(cfg.ffn_act_fn)},
        "init_config": _plain(cfg.init_config),
        "init_device": "cpu",
        "use_cache": False,
        "torch_dtype": dtype,
    }
    if incompatible:
        out["mpt_jax_note"] = (
            "needs llm-foundry's MPT model code to load (transformers' MptForCausalLM lacks: "
            + ", ".join(incompatible)
            + ")"
        )
    return out


def _act_to_hf(act: str) -> dict[str, str]:
    return {"name": "gelu", "approximate": "none"} if act == "gelu" else {"name": act}


def _plain(init: InitConfig) -> dict[str, Any]:
    out = dict(init.__dict__)
    if isinstance(out["emb_init_uniform_lim"], tuple):
        out["emb_init_uniform_lim"] = list(out["emb_init_uniform_lim"])
    return out


# ---------------------------------------------------------------------------------------------
# Tensors


def check_tensors(cfg: ModelConfig, reader: CheckpointReader) -> None:
    """Every expected tensor present with the right shape, nothing unexpected."""
    expected = param_shapes(cfg)
    names = set(reader.names())
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")  # some exporters also store the tied copy
    for name, shape in expected.items():
        if name not in names:
            raise CheckpointError(f"{reader.folder}: tensor {name} is missing (expected {shape})")
        got = tuple(reader.shape(name))
        if got != shape:
            raise CheckpointError(
                f"{reader.file_of(name)}: tensor {name} has shape {got}, expected {shape}"
            )
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{reader.file_of(unexpected[0])}: unexpected tensor {unexpected[0]} "
            f"for this config ({len(unexpected)} unexpected in all)"
        )


def write_folder(
    cfg: ModelConfig,
    entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    fetch: Callable[[str], np.ndarray],
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    token_ids: Mapping[str, int] | None = None,
) -> Path:
    """Write config.json and safetensors into a temporary folder, then rename it to out_dir.

    `token_ids`: any of TOKEN_ID_KEYS, written into config.json for transformers' generate().
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: is a file; the model is written as a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"{out_dir}: already exists and is not empty (overwrite=True; --overwrite in "
                "tools/convert_hf.py)"
            )
        if (out_dir / "checkpoints").is_dir() or (out_dir / "config.yaml").is_file():
            # overwrite replaces an exported folder, never a training run's
            raise CheckpointError(f"{out_dir}: holds an mpt_jax run; export to another folder")
        if not (out_dir / "config.json").is_file():  # a dataset, say, or anything else
            raise CheckpointError(
                f"{out_dir}: holds no HF model (no config.json); overwrite replaces HF model "
                "folders only: export to another folder"
            )
    unknown = set(token_ids or {}) - set(TOKEN_ID_KEYS)
    if unknown:
        raise ValueError(f"token_ids: {', '.join(sorted(unknown))} not in {TOKEN_ID_KEYS}")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: must be float32, bfloat16 or float16, got {dtype!r}")
    stored = dtype if dtype is not None else str(np.dtype(entries[0][2]))
    incompatible = transformers_incompatibilities(cfg)
    if incompatible:
        warnings.warn(
            f"{out_dir}: transformers' MptForCausalLM cannot express this config "
            f"({', '.join(incompatible)}); it is written with llm-foundry's keys and needs "
            "llm-foundry's MPT code (trust_remote_code) to load",
            stacklevel=3,
        )
    tmp = temporary_sibling(out_dir)
    try:
        write_checkpoint(tmp, list(entries), fetch, dtype=dtype, max_shard_size=max_shard_size)
        config = {**config_to_hf(cfg, dtype=stored), **(token_ids or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
