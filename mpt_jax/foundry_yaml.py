"""llm-foundry training YAMLs (scripts/train/train.py's) in mpt_jax's run-config keys.

`translate` maps what has a counterpart (model, batch, duration, optimizer, scheduler, gradient
clipping, precision and FSDP settings, evaluation, checkpoints, ICL tasks, loggers, the loss-spike
callback), drops with a note what changes nothing here (monitors, loader workers, timeouts), and
refuses in one line what would train differently (epochs, fp16, other algorithms, composer
checkpoints). The data is not translated: StreamingDataset (MDS) shards are not read here, so the
caller names a prepared dataset.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from mpt_jax.config import ConfigError, ModelConfig, run_config_from_dict, split_time

# model keys llm-foundry has and mpt_jax does not, with the value that leaves them off
MODEL_FEATURES_OFF = {
    "prefix_lm": False,
    "qk_gn": False,
    "rope": False,
    "sliding_window_size": -1,
    "attn_logit_softcapping": None,
    "kv_dim": None,
    "fused_qkv": True,
    "final_logit_softcapping": None,
    "head_dim": None,
    "block_overrides": None,
    "z_loss": 0.0,
}
# model keys that change nothing here: why
MODEL_KEYS_DROPPED = {
    "name": "mpt_causal_lm is the model",
    "init_device": "parameters are created sharded on the devices",
    "attn_impl": "the attention kernel is model.attn_impl: auto (the same math)",
    "loss_fn": "the cross-entropy is the same math",
    "fc_type": "dense layers are XLA's",
    "use_cache": "generation uses a KV cache anyway",
    "verbose": "logging",
    "use_train_metrics": "the training loss is logged at every logged step",
    "use_pad_tok_in_ffn": "rows are packed without padding",
}
# top-level keys that change nothing here: why
TOP_KEYS_DROPPED = {
    "python_log_level": "logging",
    "device_eval_batch_size": "evaluation batches are the global batch (docs/training.md)",
    "eval_loader": "the validation split is the prepared dataset's (data.eval adds more)",
    "dist_timeout": "collective hangs are the watchdog's (train.watchdog_minutes)",
    "autoresume": "always on: a run folder with checkpoints resumes",
    "spin_dataloaders": "the loader resumes at its position",
    "save_overwrite": "mpt-jax train --overwrite",
    "save_weights_only": "checkpoints hold the whole state",
    "code_paths": "no plugins",
    "metadata": "not recorded",
}
FSDP_KEYS_DROPPED = (
    "limit_all_gathers",
    "activation_checkpointing_reentrant",
    "use_orig_params",
    "forward_prefetch",
    "backward_prefetch",
    "sync_module_states",
    "state_dict_type",
    "verbose",
    "load_monolith_rank0_only",
)
# composer / llm-foundry callbacks whose figures the trainer logs itself
CALLBACKS_BUILT_IN = {
    "speed_monitor": "tokens_per_s, mfu",
    "lr_monitor": "lr",
    "memory_monitor": "memory_gib on GPUs",
    "runtime_estimator": "remaining_s",
    "optimizer_monitor": "grad_norm",
    "scheduled_gc": "no Python garbage in the step",
    "run_timeout": "the watchdog",
}
_REFERENCE = re.compile(r"\$\{([^{}]+)\}")


@dataclasses.dataclass
class Translation:
    """The run config (as YAML would hold it) and a note per key dropped or approximated."""

    config: dict[str, Any]
    notes: list[str]


def resolve_references(data: Any, root: Mapping[str, Any] | None = None) -> Any:
    """OmegaConf's `${a.b}` references (llm-foundry's `${variables.x}`) replaced by their values:
    a whole-string reference keeps the value's type, one inside text becomes text."""
    root = data if root is None else root

    def lookup(path: str, where: str, depth: int) -> Any:
        if depth > 20:
            raise ConfigError(f"{where}: ${{{path}}} refers to itself")
        node: Any = root
        for part in path.strip().split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"{where}: ${{{path}}} names nothing in the YAML")
            node = node[part]
        return resolve(node, where, depth + 1)

    def resolve(node: Any, where: str, depth: int = 0) -> Any:
        if isinstance(node, Mapping):
            return {
                k: resolve(v, f"{where}.{k}" if where else str(k), depth) for k, v in node.items()
            }
        if isinstance(node, list):
            return [resolve(v, f"{where}[{i}]", depth) for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        whole = _REFERENCE.fullmatch(node)
        if whole:
            return lookup(whole.group(1), where, depth)
        return _REFERENCE.sub(lambda m: str(lookup(m.group(1), where, depth)), node)

    return resolve(data, "")


def translate(
    foundry: Mapping[str, Any],
    *,
    data: str,
    tokenizer: str = "byte",
    run_dir: str | None = None,
    devices: int | None = None,
) -> Translation:
    """An llm-foundry training YAML (already loaded) as an mpt_jax run config.

    `data` is a prepared dataset (or builtin:NAME) and `tokenizer` the one it was prepared with;
    `devices` turns the per-device `device_train_microbatch_size` into a global microbatch
    (without it: `auto`). Raises ConfigError naming the first key it cannot translate.
    """
    if not isinstance(foundry, Mapping):
        raise ConfigError("foundry YAML: expected a mapping at the top level")
    src = dict(resolve_references(dict(foundry)))
    src.pop("variables", None)
    notes: list[str] = []
    out: dict[str, Any] = {}

    def take(key: str, default: Any = None) -> Any:
        return src.pop(key, default)

    out["model"] = _model(take("model"), notes)
    seq = out["model"].get("max_seq_len", ModelConfig.max_seq_len)
    top_seq = take("max_seq_len")
    if top_seq is not None and top_seq != seq:
        raise ConfigError(f"max_seq_len: {top_seq} differs from model.max_seq_len {seq}")

    out["data"] = {"path": data, "tokenizer": tokenizer}
    out["data"].update(_train_loader(take("train_loader"), seq, notes))
    tok = take("tokenizer")
    if tok is not None:
        name = tok.get("name") if isinstance(tok, Mapping) else tok
        notes.append(
            f"tokenizer: {name} is the one the dataset was prepared with (data.tokenizer: "
            f"{tokenizer}); prepare it with tools/prepare_data.py --tokenizer TOKENIZER.json"
        )

    train: dict[str, Any] = {}
    batch = take("global_train_batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ConfigError(f"global_train_batch_size: expected a positive integer, got {batch!r}")
    train["global_batch"] = batch
    train.update(_duration(take("max_duration"), batch, seq))
    steps = train.get("steps")
    micro = take("device_train_microbatch_size", "auto")
    train["microbatch"] = _microbatch(micro, batch, devices, notes)
    seed = take("seed")
    if seed is not None:
        train["seed"] = seed
    precision = take("precision", "amp_bf16")
    if precision not in ("amp_bf16", "fp32"):
        raise ConfigError(f"precision: {precision!r} is not supported (amp_bf16 or fp32)")
    train["precision"] = precision
    mesh, fsdp_train = _fsdp(take("fsdp_config"), notes)
    train.update(fsdp_train)
    for key, ours in (("eval_interval", "eval_every"), ("console_log_interval", "log_every")):
        value = take(key)
        if value is not None:
            train[ours] = _interval(value, key, steps)
    if "eval_first" in src:
        train["eval_first"] = bool(take("eval_first"))
    subset = take("eval_subset_num_batches")
    if subset is not None:
        train["eval_batches"] = None if subset == -1 else subset
    for key in ("icl_tasks", "eval_gauntlet"):
        value = take(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(
                f"{key}: given inline; write it to a YAML file and name that file here"
            )
        train[key] = value
    if (subset := take("icl_subset_num_batches")) is not None:
        train["icl_subset_num_batches"] = subset
    train.update(_callbacks(take("callbacks"), notes))
    train.update(_loggers(take("loggers"), notes))
    progress_bar, log_to_console = take("progress_bar"), take("log_to_console")
    if progress_bar is False or log_to_console is True:
        train["progress"] = False  # a line per logged step, as composer's console logger
    if take("accumulate_train_batch_on_tokens", True) is not True:
        raise ConfigError(
            "accumulate_train_batch_on_tokens: false weighs microbatches by samples; mpt_jax "
            "takes the mean over the batch's tokens (llm-foundry's default, true)"
        )

    out["optim"] = _optimizer(take("optimizer"), notes)
    clipping = _clipping(take("algorithms"))
    out["optim"]["clipping_threshold"] = clipping
    if clipping is None:
        notes.append(
            "algorithms.gradient_clipping: absent, so no clipping (optim's default is 1.0)"
        )
    schedule = take("scheduler")
    if schedule is not None:
        if not isinstance(schedule, Mapping):
            raise ConfigError(f"scheduler: expected a mapping, got {schedule!r}")
        schedule = dict(schedule)
        if schedule.pop("scale_warmup", False):
            raise ConfigError("scheduler.scale_warmup: true is not supported")
        out["schedule"] = schedule
    out["mesh"] = mesh
    out["train"] = train
    checkpoint = _checkpoints(src, notes)
    if checkpoint:
        out["checkpoint"] = checkpoint
    load_path = take("load_path")
    if load_path is not None:
        raise ConfigError(
            f"load_path: {load_path} is a composer checkpoint, which mpt_jax cannot read; convert "
            "it to an HF folder with llm-foundry's convert_composer_to_hf.py and set init_from"
        )
    name = take("run_name")
    out["run_dir"] = run_dir or f"runs/{name or 'foundry-run'}"
    for key, why in TOP_KEYS_DROPPED.items():
        if key in src:
            notes.append(f"{key}: dropped ({why})")
            src.pop(key)
    if src:
        raise ConfigError(f"{sorted(src)[0]}: not an llm-foundry key the translation knows")
    run_config_from_dict(out, where="the translated config")  # whole, or the error names the key
    return Translation(out, notes)


def _model(model: Any, notes: list[str]) -> dict[str, Any]:
    if not isinstance(model, Mapping):
        raise ConfigError(f"model: expected a mapping, got {model!r}")
    model = dict(model)
    name = model.get("name", "mpt_causal_lm")
    if name != "mpt_causal_lm":
        raise ConfigError(f"model.name: {name!r} is not supported (mpt_causal_lm)")
    if "pretrained_model_name_or_path" in model or model.get("pretrained"):
        raise ConfigError(
            "model.pretrained_model_name_or_path: an HF model to start from is init_from here "
            "(a local HF MPT folder)"
        )
    flat: dict[str, Any] = {}
    for key, value in model.items():
        if key in ("attn_config", "ffn_config"):
            if not isinstance(value, Mapping):
                raise ConfigError(f"model.{key}: expected a mapping, got {value!r}")
            for sub, sub_value in value.items():
                _model_key(f"model.{key}.{sub}", sub, sub_value, flat, notes)
        else:
            _model_key(f"model.{key}", key, value, flat, notes)
    if flat.get("alibi") and flat.get("learned_pos_emb", True):
        if flat.get("learned_pos_emb"):
            notes.append("model.learned_pos_emb: true set to false with alibi, as llm-foundry does")
        flat["learned_pos_emb"] = False  # llm-foundry turns learned positions off under ALiBi
    ModelConfig.from_dict(flat, where="model")  # the error names the field
    return flat


def _model_key(where: str, key: str, value: Any, flat: dict[str, Any], notes: list[str]) -> None:
    if key in MODEL_KEYS_DROPPED:
        notes.append(f"{where}: {value!r} dropped ({MODEL_KEYS_DROPPED[key]})")
    elif key in MODEL_FEATURES_OFF:
        if value != MODEL_FEATURES_OFF[key] and value is not None:
            raise ConfigError(f"{where}: {value!r} is not supported by mpt_jax")
    elif key == "attn_temperature_tuning":
        if isinstance(value, Mapping) and value.get("attn_scale", 0.0):
            raise ConfigError(f"{where}: {value!r} is not supported by mpt_jax")
    elif key == "layer_norm_epsilon":
        flat["norm_eps"] = value
    else:
        flat[key] = value


def _train_loader(loader: Any, seq: int, notes: list[str]) -> dict[str, Any]:
    if loader is None:
        return {}
    if not isinstance(loader, Mapping):
        raise ConfigError(f"train_loader: expected a mapping, got {loader!r}")
    kind = loader.get("name", "text")
    if kind != "text":
        raise ConfigError(f"train_loader.name: {kind!r} is not supported (text: pretraining)")
    dataset = loader.get("dataset") or {}
    out = {}
    if "shuffle" in dataset:
        out["shuffle"] = bool(dataset["shuffle"])
    dataset_seq = dataset.get("max_seq_len")
    if dataset_seq is not None and dataset_seq != seq:
        raise ConfigError(
            f"train_loader.dataset.max_seq_len: {dataset_seq} differs from model.max_seq_len {seq}"
        )
    where = dataset.get("remote") or dataset.get("local")
    notes.append(
        f"train_loader: the StreamingDataset at {where} is not read here; data.path names a "
        "prepared dataset (tools/prepare_data.py); the order comes from train.seed"
    )
    return out


def _duration(value: Any, batch: int, seq: int) -> dict[str, int]:
    if not isinstance(value, str):
        raise ConfigError(
            f"max_duration: expected a time such as 4800ba or 2.5e9tok, got {value!r} "
            "(a bare number is epochs)"
        )
    if value.endswith("ep"):
        raise ConfigError(f"max_duration: {value} is in epochs; give batches (ba) or tokens (tok)")
    number, unit = split_time(value, "max_duration", allow_dur=False)
    if not number.is_integer() or number <= 0:
        raise ConfigError(f"max_duration: {value} is not a whole positive count")
    if unit == "ba":
        return {"steps": int(number)}
    if unit == "tok":
        return {"tokens": int(number)}
    if number % batch:
        raise ConfigError(f"max_duration: {value} is not a whole number of batches of {batch}")
    return {"steps": int(number) // batch}


def _interval(value: Any, key: str, steps: int | None) -> int:
    if isinstance(value, str) and value.endswith("ba"):
        number, _ = split_time(value, key)
    elif isinstance(value, str) and value.endswith("dur") and steps is not None:
        number, _ = split_time(value, key)
        number = math.floor(number * steps)
    else:
        raise ConfigError(
            f"{key}: {value!r} cannot be translated; give batches (e.g. 500ba)"
            + (" or a fraction of max_duration in ba (0.1dur)" if steps is not None else "")
        )
    if not float(number).is_integer() or number <= 0:
        raise ConfigError(f"{key}: {value!r} is not a whole positive number of batches")
    return int(number)


def _microbatch(micro: Any, batch: int, devices: int | None, notes: list[str]) -> int | str:
    if micro == "auto":
        return "auto"
    if not isinstance(micro, int) or isinstance(micro, bool) or micro <= 0:
        raise ConfigError(
            f"device_train_microbatch_size: expected a positive integer or auto, got {micro!r}"
        )
    if devices is None:
        notes.append(
            f"device_train_microbatch_size: {micro} per device; train.microbatch counts all "
            f"devices, so it is auto here (or {micro} x the device count: --devices)"
        )
        return "auto"
    total = micro * devices
    if total >= batch:
        return batch
    if batch % total:
        raise ConfigError(
            f"device_train_microbatch_size: {micro} x {devices} devices does not divide "
            f"global_train_batch_size {batch}"
        )
    return total


def _fsdp(fsdp: Any, notes: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
    if fsdp is None:  # DDP: every device holds the whole model
        return {"data": -1, "fsdp": 1, "tensor": 1}, {}
    if not isinstance(fsdp, Mapping):
        raise ConfigError(f"fsdp_config: expected a mapping, got {fsdp!r}")
    fsdp = dict(fsdp)
    train: dict[str, Any] = {}
    strategy = fsdp.pop("sharding_strategy", "FULL_SHARD")
    if strategy == "NO_SHARD":
        mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    elif strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        mesh = {"data": 1, "fsdp": -1, "tensor": 1}
        if strategy != "FULL_SHARD":
            notes.append(
                f"fsdp_config.sharding_strategy: {strategy} is FULL_SHARD here (parameters, "
                "gradients and optimizer state sharded); across hosts, see mesh.dcn_* "
                "(docs/multihost.md)"
            )
    else:
        raise ConfigError(f"fsdp_config.sharding_strategy: {strategy!r} is not an FSDP strategy")
    mixed = fsdp.pop("mixed_precision", "DEFAULT")
    if mixed not in ("FULL", "DEFAULT", "PURE"):
        raise ConfigError(f"fsdp_config.mixed_precision: {mixed!r} is not FULL, DEFAULT or PURE")
    train["mixed_precision"] = mixed
    if fsdp.pop("activation_checkpointing", False):
        train["remat"] = "full"
    for key in ("activation_cpu_offload", "cpu_offload"):
        if fsdp.pop(key, False):
            raise ConfigError(f"fsdp_config.{key}: offloading to the CPU is not supported")
    for key in FSDP_KEYS_DROPPED:
        if key in fsdp:
            notes.append(f"fsdp_config.{key}: dropped (XLA schedules the collectives)")
            fsdp.pop(key)
    if fsdp:
        raise ConfigError(f"fsdp_config.{sorted(fsdp)[0]}: not a key the translation knows")
    return mesh, train


def _optimizer(optimizer: Any, notes: list[str]) -> dict[str, Any]:
    if not isinstance(optimizer, Mapping):
        raise ConfigError(f"optimizer: expected a mapping, got {optimizer!r}")
    optimizer = dict(optimizer)
    name = optimizer.get("name")
    if name not in ("decoupled_adamw", "decoupled_lionw", "adamw"):
        raise ConfigError(
            f"optimizer.name: {name!r} is not supported (decoupled_adamw, decoupled_lionw, adamw)"
        )
    known = {"name", "lr", "betas", "eps", "weight_decay"}
    extra = sorted(set(optimizer) - known)
    if extra:
        raise ConfigError(f"optimizer.{extra[0]}: not supported by mpt_jax's {name}")
    return {k: list(v) if k == "betas" else v for k, v in optimizer.items()}


def _clipping(algorithms: Any) -> float | None:
    if algorithms is None:
        return None
    if not isinstance(algorithms, Mapping):
        raise ConfigError(f"algorithms: expected a mapping, got {algorithms!r}")
    others = sorted(set(algorithms) - {"gradient_clipping"})
    if others:
        raise ConfigError(f"algorithms.{others[0]}: not supported (it would change the training)")
    clipping = algorithms.get("gradient_clipping")
    if clipping is None:
        return None
    kind = clipping.get("clipping_type", "norm")
    if kind != "norm":
        raise ConfigError(
            f"algorithms.gradient_clipping.clipping_type: {kind!r} is not supported (norm)"
        )
    return clipping.get("clipping_threshold")


def _callbacks(callbacks: Any, notes: list[str]) -> dict[str, Any]:
    train: dict[str, Any] = {}
    for name, options in (callbacks or {}).items():
        options = options or {}
        if name == "kill_loss_spike":
            spike: dict[str, Any] = {"action": "log" if options.get("log_only", True) else "stop"}
            for theirs, ours in (
                ("patience", "patience"),
                ("outlier_multiplier", "outlier_multiplier"),
                ("loss_cap", "loss_cap"),
            ):
                if theirs in options:
                    spike[ours] = options[theirs]
            if options.get("window_size", 100) != 100:  # 100 is llm-foundry's "not set"
                spike["window"] = options["window_size"]
            train["loss_spike"] = spike
        elif name == "hf_checkpointer":
            train["export_hf"] = True
            notes.append(
                "callbacks.hf_checkpointer: the HF folder is written at the end (RUN_DIR/hf); "
                "any checkpoint converts with tools/convert_hf.py"
            )
        elif name in CALLBACKS_BUILT_IN:
            notes.append(f"callbacks.{name}: built in ({CALLBACKS_BUILT_IN[name]})")
        else:
            notes.append(f"callbacks.{name}: dropped (no counterpart; callbacks leave the math)")
    return train


def _loggers(loggers: Any, notes: list[str]) -> dict[str, Any]:
    train: dict[str, Any] = {}
    for name, options in (loggers or {}).items():
        options = options or {}
        if name == "wandb":
            train["wandb_project"] = options.get("project") or "mpt-jax"
            train["wandb_mode"] = "online"
        elif name == "tensorboard":
            notes.append("loggers.tensorboard: always written (RUN_DIR/tensorboard)")
        else:
            notes.append(f"loggers.{name}: dropped (metrics.jsonl, TensorBoard and W&B only)")
    return train


def _checkpoints(src: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    folder = src.pop("save_folder", None)
    interval = src.pop("save_interval", None)
    keep = src.pop("save_num_checkpoints_to_keep", None)
    if folder is None:
        notes.append(
            "save_folder: absent, so llm-foundry would save nothing; checkpoints go to "
            "RUN_DIR/checkpoints at checkpoint's defaults"
        )
    if interval is not None:
        out["every"] = _interval(interval, "save_interval", None)
    if keep is not None:
        if keep == -1:  # every checkpoint
            out["keep_every"] = out.get("every", 1000)
        elif isinstance(keep, int) and keep > 0:
            out["keep"] = keep
        else:
            raise ConfigError(f"save_num_checkpoints_to_keep: expected -1 or > 0, got {keep!r}")
    return out
