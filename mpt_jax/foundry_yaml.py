"""llm-foundry training YAMLs (scripts/train/train.py's) in mpt_jax's run-config keys.

`load_foundry_yaml` reads one as llm-foundry does (OmegaConf, `${...}` references resolved,
`variables` set aside); `translate` maps what has a counterpart (model, batch, duration,
optimizer, scheduler, gradient clipping, precision and FSDP settings, evaluation, checkpoints,
ICL tasks, loggers, the loss-spike callback), with llm-foundry's defaults where a key is absent;
drops with a note what changes nothing here (monitors, loader workers, timeouts, file names);
and refuses in one line what would train differently (epochs, fp16, other algorithms, callbacks
that change the training, composer checkpoints). The caller names the prepared datasets
(tools/prepare_data.py reads the MDS folders): one, or one per StreamingDataset stream, which
become a weighted data.mixture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpt_jax.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    run_config_from_dict,
    split_time,
)
from mpt_jax.hf_checkpoint import UNSUPPORTED_FEATURES

# model keys llm-foundry has and mpt_jax does not, with the value that leaves them off
MODEL_FEATURES_OFF = {
    **UNSUPPORTED_FEATURES["attn_config"],
    **UNSUPPORTED_FEATURES["top"],
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
# train_loader keys (torch DataLoader settings) that change nothing here: why
LOADER_KEYS_DROPPED = {
    "drop_last": "batches run on across epochs: the order repeats endlessly, reshuffled each pass",
    "num_workers": "grain reads with data.num_threads",
    "pin_memory": "no torch DataLoader",
    "prefetch_factor": "data.prefetch",
    "persistent_workers": "no torch DataLoader",
    "timeout": "no torch DataLoader",
}
# StreamingDataset keys that change nothing here: why ("" where the data note says it)
DATASET_KEYS_DROPPED = {
    "shuffle_seed": "",
    "shuffle_algo": "the order is the loader's seeded permutation per pass",
    "shuffle_block_size": "the order is the loader's seeded permutation per pass",
    "num_canonical_nodes": "the order does not depend on the device count here",
    "partition_algo": "the order does not depend on the device count here",
    "sampling_method": "mixture weights draw every batch's rows",
    "sampling_granularity": "mixture weights draw every batch's rows",
    "epoch_size": "a pass is over the prepared rows",
    "predownload": "the data is local",
    "download_retry": "the data is local",
    "download_timeout": "the data is local",
    "cache_limit": "the data is local",
    "keep_zip": "the data is local",
    "validate_hash": "prepare_data.py checks the index's hashes",
    "allow_unsafe_types": "prepare_data.py reads no pickled column",
}
# a stream's keys that change nothing here (its folder, split and amount are read): why
STREAM_KEYS_DROPPED = {
    key: DATASET_KEYS_DROPPED[key]
    for key in ("download_retry", "download_timeout", "validate_hash", "keep_zip")
}
# top-level keys of llm-foundry's TrainConfig that change nothing here: why
TOP_KEYS_DROPPED = {
    "python_log_level": "logging",
    "log_config": "the resolved config is RUN_DIR/config.yaml",
    "device_eval_batch_size": "evaluation batches are the global batch (docs/training.md)",
    "device_eval_microbatch_size": "evaluation batches are the global batch",
    "eval_loader": "the validation split is the prepared dataset's (data.eval adds more)",
    "eval_loaders": "the validation split is the prepared dataset's (data.eval adds more)",
    "dist_timeout": "collective hangs are the watchdog's (train.watchdog_minutes)",
    "autoresume": "always on: a run folder with checkpoints resumes",
    "spin_dataloaders": "the loader resumes at its position",
    "save_overwrite": "mpt-jax train --overwrite",
    "save_weights_only": "checkpoints hold the whole state",
    "save_filename": "checkpoints are RUN_DIR/checkpoints/<step>",
    "save_latest_filename": "checkpoints are RUN_DIR/checkpoints/<step>",
    "load_weights_only": "only with load_path",
    "code_paths": "no plugins",
    "metadata": "not recorded",
    "max_split_size_mb": "a PyTorch allocator setting",
    "expandable_segments": "a PyTorch allocator setting",
    "compile_config": "torch.compile: XLA compiles the step",
    "icl_seq_len": "ICL prompts are cut to model.max_seq_len",
    "tp_config": "tensor parallelism is mesh.tensor",
    "eval_gauntlet_callback": "train.eval_gauntlet",
    "device_train_batch_size": "llm-foundry derives it from global_train_batch_size",
    "device_train_grad_accum": "llm-foundry derives it from the microbatch",
    "n_gpus": "llm-foundry derives it from the world size",
    "load_strict_model_weights": "only with load_path",
    "load_ignore_keys": "only with load_path",
    "save_ignore_keys": "checkpoints hold the whole state",
    "only_hf_checkpoint": "checkpoints hold the whole state; HF exports are train.export_hf",
    "only_composer_checkpoint": "checkpoints hold the whole state",
    "profiler": "composer's profiler: train.profile traces steps with jax.profiler",
    "cuda_load_lazy": "a CUDA setting",
}
FSDP_KEYS_DROPPED = {
    "limit_all_gathers": "XLA schedules the collectives",
    "activation_checkpointing_reentrant": "torch's checkpoint variant: remat is JAX's",
    "use_orig_params": "a torch FSDP detail",
    "forward_prefetch": "XLA schedules the collectives",
    "backward_prefetch": "XLA schedules the collectives",
    "sync_module_states": "parameters are created sharded on the devices",
    "state_dict_type": "checkpoints are Orbax's, sharded",
    "verbose": "logging",
    "load_monolith_rank0_only": "checkpoints are Orbax's, sharded",
}
# callbacks that leave the training as it is: what stands for them here
CALLBACKS_HARMLESS = {
    "speed_monitor": "built in: tokens_per_s, mfu",
    "lr_monitor": "built in: lr",
    "memory_monitor": "built in: memory_gib on GPUs",
    "runtime_estimator": "built in: remaining_s",
    "optimizer_monitor": "built in: grad_norm",
    "scheduled_gc": "no Python garbage in the step",
    "run_timeout": "the watchdog",
    "nan_monitor": "non-finite losses are skipped and rolled back (train.nonfinite_patience)",
    "generate": "samples: mpt-jax generate on a checkpoint",
    "mono_checkpoint_saver": "checkpoints convert with tools/convert_hf.py",
    "memory_snapshot": "a PyTorch memory tool",
    "oom_observer": "a PyTorch memory tool",
    "eval_output_logging": "mpt-jax eval --details",
    "system_metrics_monitor": "logging",
    "env_logging": "logging",
    "loss_perp_v_len": "logging",
    "fdiff": "logging",
    "log_mbmoe_tok_per_expert": "logging",
    "async_eval": "mpt-jax eval on the checkpoints",
}
# callbacks that change the training: refused
CALLBACKS_CHANGING = {
    "layer_freezing": "freezes layers",
    "global_lr_scaling": "rescales the learning rate and weight decay",
    "early_stopper": "stops early",
    "load_checkpoint": "loads weights",
    "curriculum_learning": "changes the data",
    "dataset_swap": "changes the data",
}
OPTIMIZER_DEFAULTS = {  # composer's DecoupledAdamW, llm-foundry's DecoupledLionW, torch's AdamW
    "decoupled_adamw": {"lr": 1.0e-3, "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 1.0e-5},
    "decoupled_lionw": {"lr": 1.0e-4, "betas": [0.9, 0.99], "weight_decay": 0.0},
    "adamw": {"lr": 1.0e-3, "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 1.0e-2},
}
# composer's scheduler arguments (llm-foundry's for inv_sqrt_with_warmup), and those required
SCHEDULER_ARGUMENTS = {
    "constant_with_warmup": {"t_warmup", "alpha", "t_max", "scale_warmup"},
    "cosine_with_warmup": {"t_warmup", "t_max", "alpha_f", "scale_warmup"},
    "linear_decay_with_warmup": {"t_warmup", "alpha_i", "alpha_f", "t_max", "scale_warmup"},
    "inv_sqrt_with_warmup": {
        "t_warmup",
        "t_scale",
        "t_cooldown",
        "t_max",
        "alpha_f_decay",
        "alpha_f_cooldown",
    },
}
SCHEDULER_REQUIRED = {"inv_sqrt_with_warmup": ("t_warmup", "t_scale", "t_cooldown")}
# the keyword arguments of the callbacks and algorithm translated
KILL_LOSS_SPIKE_ARGUMENTS = {
    "log_only",
    "patience",
    "outlier_multiplier",
    "window_size",
    "loss_cap",
}
HF_CHECKPOINTER_DROPPED = {  # llm-foundry's HuggingFaceCheckpointer's other arguments
    "save_folder",
    "huggingface_folder_name",
    "precision",
    "overwrite",
    "mlflow_registered_model_name",
    "mlflow_logging_config",
    "flatten_imports",
    "final_register_only",
    "register_wait_seconds",
}
LOSS_SPIKE_UNSET = {"window_size": 100, "loss_cap": 10}  # llm-foundry's "not set" values
_REFERENCE_ROOT = re.compile(r"\$\{\s*([A-Za-z_][\w-]*)")
_ENV_REFERENCE = re.compile(r"\$\{\s*oc\.env\s*:")


@dataclasses.dataclass
class Translation:
    """The run config (as YAML would hold it, and validated) and a note per key dropped or
    approximated."""

    config: dict[str, Any]
    notes: list[str]
    run_config: RunConfig


def load_foundry_yaml(path: str | Path) -> dict[str, Any]:
    """A training YAML read as llm-foundry's train.py reads it: OmegaConf, references resolved
    (its `oc.env` resolver is cleared there, so refused here). Top-level entries that only
    references use (older YAMLs' `data_local`, `global_seed`, ...) move under `variables`."""
    try:
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:
        raise ConfigError(
            "omegaconf is not installed: pip install -e '.[foundry]' (llm-foundry reads its "
            "YAMLs with it)"
        ) from None
    import yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read ({e})") from None
    if _ENV_REFERENCE.search(text):
        raise ConfigError("${oc.env:...}: llm-foundry clears that resolver; write the value")
    try:
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
        raise ConfigError(" ".join(str(e).split("\n")[0].split())) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping at the top level")
    referenced = set(_REFERENCE_ROOT.findall(text))
    variables = dict(_mapping(data.get("variables"), "variables", none_ok=True))
    for key in sorted(referenced - KNOWN_TOP_KEYS):
        if key in data:
            variables[key] = data.pop(key)
    data["variables"] = variables
    return data


def translate(
    foundry: Mapping[str, Any],
    *,
    data: str | Mapping[str, str],
    tokenizer: str = "byte",
    run_dir: str | None = None,
    devices: int | None = None,
) -> Translation:
    """An llm-foundry training YAML (as `load_foundry_yaml` gives it) as an mpt_jax run config.

    `data` is a prepared dataset (or builtin:NAME) and `tokenizer` the one it was prepared with;
    `devices` turns the per-device `device_train_microbatch_size` into a global microbatch
    (without it: `auto`); on one device, llm-foundry drops `fsdp_config`, and so does this.
    Raises ConfigError naming the first key it cannot translate.
    """
    src = dict(_mapping(foundry, "the YAML's top level"))
    src.pop("variables", None)
    notes: list[str] = []
    out: dict[str, Any] = {}

    def take(key: str, default: Any = None) -> Any:
        return src.pop(key, default)

    out["model"] = _model(take("model"), notes)
    seq = out["model"].get("max_seq_len", ModelConfig.max_seq_len)
    top_seq = take("max_seq_len")
    if top_seq is not None and top_seq != seq:
        raise ConfigError(f"max_seq_len: {top_seq!r} differs from model.max_seq_len {seq}")

    loader = take("train_loader")
    out["data"] = _train_loader(loader, data, seq, out["model"], src.get("eval_loader"), notes)
    out["data"]["tokenizer"] = tokenizer
    tok = take("tokenizer")
    if tok is not None:
        name = tok.get("name") if isinstance(tok, Mapping) else tok
        if tokenizer == "byte":
            notes.append(
                f"tokenizer: {name} dropped: the dataset was prepared with the byte tokenizer, so "
                f"the run trains on bytes, not {name}'s tokens; for those, prepare the data with "
                "tools/prepare_data.py --tokenizer TOKENIZER.json"
            )
        else:
            notes.append(
                f"tokenizer: {name} dropped: data.tokenizer is the dataset's, {tokenizer}, which "
                f"must be {name}'s tokenizer.json"
            )

    train: dict[str, Any] = {}
    batch = take("global_train_batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ConfigError(f"global_train_batch_size: expected a positive integer, got {batch!r}")
    train["global_batch"] = batch
    max_duration = take("max_duration")
    train.update(_duration(max_duration, batch, seq))
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
    fsdp = take("fsdp_config")
    if fsdp is not None and devices == 1:
        notes.append("fsdp_config: dropped on one device, as llm-foundry does (DDP)")
        fsdp = None
    elif fsdp is not None and devices is None:
        notes.append(
            "fsdp_config: kept (mesh.fsdp over every device); on one device llm-foundry drops it "
            "and trains with FULL autocast: --devices 1 does the same"
        )
    mesh, fsdp_train = _fsdp(fsdp, notes)
    train.update(fsdp_train)
    # llm-foundry's TrainConfig defaults: every eval batch, a console line per batch
    intervals = (
        ("eval_interval", "eval_every", None),
        ("console_log_interval", "log_every", "1ba"),
    )
    for key, ours, default in intervals:
        value = take(key, default)
        if value is not None:
            train[ours] = _interval(value, key, steps, batch, seq)
    if "eval_first" in src:
        train["eval_first"] = _bool(take("eval_first"), "eval_first")
    subset = take("eval_subset_num_batches", -1)
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
    train.update(
        _callbacks(take("callbacks"), notes, lambda v, key: _interval(v, key, steps, batch, seq))
    )
    train.update(_loggers(take("loggers"), notes))
    progress_bar = _bool(take("progress_bar", False), "progress_bar")
    log_to_console = _bool(take("log_to_console", True), "log_to_console")
    train["progress"] = progress_bar and not log_to_console
    on_tokens = take("accumulate_train_batch_on_tokens", True)
    if not _bool(on_tokens, "accumulate_train_batch_on_tokens"):
        raise ConfigError(
            "accumulate_train_batch_on_tokens: false weighs microbatches by samples; mpt_jax "
            "takes the mean over the batch's tokens (llm-foundry's default, true)"
        )

    out["optim"] = _optimizer(take("optimizer"), notes)
    out["optim"]["clipping_threshold"] = _clipping(take("algorithms"), notes)
    # composer takes a scheduler's Xdur in max_duration's unit, rounded down: samples for a run
    # given in samples, which train.steps does not keep (0.1dur of 96sp is 9sp, not 1 step)
    number, unit = split_time(max_duration, "max_duration", allow_dur=False)  # _duration's
    samples = int(number) if unit == "sp" else None
    out["schedule"] = _scheduler(take("scheduler"), unit, samples)
    out["mesh"] = mesh
    out["train"] = train
    out["checkpoint"] = _checkpoints(src, steps, batch, seq, notes)
    load_path = take("load_path")
    if load_path is not None:
        raise ConfigError(
            f"load_path: {load_path} is a composer checkpoint, which mpt_jax cannot read; convert "
            "it to an HF folder with llm-foundry's convert_composer_to_hf.py and set init_from"
        )
    name = take("run_name")
    out["run_dir"] = run_dir or f"runs/{name or 'foundry-run'}"
    for key, why in TOP_KEYS_DROPPED.items():
        if key in src and src.pop(key) is not None:
            notes.append(f"{key}: dropped ({why})")
    # llm-foundry sets any other top-level key aside as a variable (a DeprecationWarning)
    for key in sorted(src):
        notes.append(
            f"{key}: not a key of llm-foundry's TrainConfig, so a variable, as llm-foundry takes "
            "it (with a DeprecationWarning); it changes nothing"
        )
    # whole, or the error names the key
    return Translation(out, notes, run_config_from_dict(out, where="the translated config"))


def _bool(value: Any, where: str) -> bool:
    """A YAML boolean, or the strings true / false (llm-foundry's structured config reads them)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _mapping(value: Any, where: str, *, none_ok: bool = False) -> Mapping[str, Any]:
    if value is None and none_ok:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


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


def _mds_folder(dataset: Any, default_split: Any = None) -> str | None:
    """The MDS folder a StreamingDataset (or one of its streams) reads: local, else remote, plus
    split; a stream without a split takes its dataset's, as streaming's Stream.apply_default."""
    if not isinstance(dataset, Mapping):
        return None
    root = dataset.get("local") or dataset.get("remote")
    if not isinstance(root, str):
        return None
    split = dataset.get("split") or default_split
    return f"{root.rstrip('/')}/{split}" if isinstance(split, str) and split else root


def _train_loader(
    loader: Any,
    data: str | Mapping[str, str],
    seq: int,
    model: Mapping[str, Any],
    eval_loader: Any,
    notes: list[str],
) -> dict[str, Any]:
    """data.path (data.mixture for `streams`) and data.shuffle, with notes."""
    if loader is None:
        if not isinstance(data, str):
            raise ConfigError("--data NAME=DIR: the YAML has no train_loader streams")
        return {"path": data}
    loader = dict(_mapping(loader, "train_loader"))
    kind = loader.pop("name", "text")
    if kind != "text":
        raise ConfigError(f"train_loader.name: {kind!r} is not supported (text: pretraining)")
    dataset = dict(_mapping(loader.pop("dataset", None), "train_loader.dataset", none_ok=True))
    _drop_keys(loader, LOADER_KEYS_DROPPED, "train_loader", notes)
    out: dict[str, Any] = {}
    # StreamingTextDataset's default: in order
    out["shuffle"] = _bool(dataset.pop("shuffle", False), "train_loader.dataset.shuffle")
    dataset_seq = dataset.pop("max_seq_len", None)
    if dataset_seq is not None and dataset_seq != seq:
        raise ConfigError(
            f"train_loader.dataset.max_seq_len: {dataset_seq!r} differs from model.max_seq_len "
            f"{seq}"
        )
    if "batch_size" in dataset:
        raise ConfigError(
            "train_loader.dataset.batch_size: llm-foundry passes StreamingDataset its batch size "
            "itself and fails on this key"
        )
    replication = dataset.pop("replication", None)
    if replication not in (None, 1):
        raise ConfigError(
            f"train_loader.dataset.replication: {replication!r} ranks share each sample, so a "
            f"step sees global_train_batch_size / {replication} distinct samples; give "
            "global_train_batch_size that count and drop replication (tensor parallelism "
            "shares rows here by itself)"
        )
    eos, bos = dataset.pop("eos_token_id", None), dataset.pop("bos_token_id", None)
    encoding = dataset.pop("token_encoding_type", None)
    batching = dataset.pop("batching_method", None)
    streams = dataset.pop("streams", None)
    where = {key: dataset.pop(key) for key in ("local", "remote", "split") if key in dataset}
    if streams is not None and (where.get("local") or where.get("remote")):
        raise ConfigError(
            "train_loader.dataset: streams beside the dataset's own local or remote, which "
            "streaming refuses; give each stream its folder"
        )
    if batching not in (None, "random"):
        if streams is not None:
            raise ConfigError(
                f"train_loader.dataset.batching_method: {batching!r} composes each batch by "
                "stream; mpt_jax draws every row by the mixture weights (random)"
            )
        notes.append(f"train_loader.dataset.batching_method: dropped (one stream: {batching!r})")
    epoch_size = dataset.get("epoch_size")
    _drop_keys(dataset, DATASET_KEYS_DROPPED, "train_loader.dataset", notes)
    options = f" --tokenizer TOKENIZER --seq-len {seq} --out DIR"
    if encoding not in (None, "int64"):
        options += f" (and --token-encoding-type {encoding} for a bytes tokens column)"
    order = (
        "a remote folder copied to a local one first; the order comes from train.seed, not "
        "shuffle_seed, and documents end at the dataset's EOS"
    )
    if streams is not None:
        out["mixture"] = _streams(streams, where.get("split"), data, epoch_size, options, notes)
        notes.append(f"train_loader.dataset.streams: {order}")
    else:
        if not isinstance(data, str):
            raise ConfigError(
                f"--data NAME=DIR: the YAML's train_loader has no streams, so give one --data "
                f"DIR (not {', '.join(sorted(data))})"
            )
        out["path"] = data
        command = f"python tools/prepare_data.py {_mds_folder(where) or 'MDS_FOLDER'}"
        if isinstance(eval_loader, Mapping) and (val := _mds_folder(eval_loader.get("dataset"))):
            command += f" --val-input {val}"
        notes.append(
            f"train_loader: data.path names a dataset prepared from the StreamingDataset's MDS "
            f"folders: {command}{options}; {order}"
        )
    paths = [out["path"]] if "path" in out else [source["path"] for source in out["mixture"]]
    _sequence_ids(model, eos, bos, paths, notes)
    return out


def _sequence_ids(
    model: Mapping[str, Any], eos: Any, bos: Any, paths: list[str], notes: list[str]
) -> None:
    """eos_token_id / bos_token_id: what llm-foundry tells documents apart by."""
    if not model.get("attn_uses_sequence_id"):
        for key, value in (("eos_token_id", eos), ("bos_token_id", bos)):
            if value is not None:
                notes.append(
                    f"train_loader.dataset.{key}: dropped (only attn_uses_sequence_id reads it)"
                )
        return
    if bos is not None:
        raise ConfigError(
            "train_loader.dataset.bos_token_id: with attn_uses_sequence_id llm-foundry starts "
            "documents at it; mpt_jax ends them at the dataset's EOS (prepare the data with EOS "
            "after each document and drop bos_token_id)"
        )
    for path in paths:
        dataset_eos = _dataset_eos(path)
        if eos is not None and dataset_eos is not None and eos != dataset_eos:
            raise ConfigError(
                f"train_loader.dataset.eos_token_id: {eos!r} differs from the EOS of {path} "
                f"({dataset_eos}), which ends documents here"
            )
    notes.append(
        "model.attn_config.attn_uses_sequence_id: documents are told apart by the dataset's "
        "EOS (llm-foundry needs train_loader.dataset.eos_token_id for it)"
    )


def _dataset_eos(path: str) -> int | None:
    """A prepared dataset's EOS id; None for a built-in corpus (prepared at training time)."""
    if path.startswith("builtin:"):
        return None
    from mpt_jax.data import DataError, open_dataset

    try:
        return open_dataset(path).eos_id
    except DataError as e:
        raise ConfigError(f"--data {path}: {e}") from None


def _drop_keys(section: dict, dropped: Mapping[str, str], where: str, notes: list[str]) -> None:
    """Takes from `section` the keys that change nothing here, each with a note of why (none
    where the why is ""), and refuses the first key left: every other key was read already."""
    for key in [key for key in section if key in dropped]:
        section.pop(key)
        if dropped[key]:
            notes.append(f"{where}.{key}: dropped ({dropped[key]})")
    if section:
        raise ConfigError(f"{where}.{sorted(section)[0]}: a key this translation does not know")


def _streams(
    streams: Any,
    default_split: Any,
    data: str | Mapping[str, str],
    epoch_size: Any,
    options: str,
    notes: list[str],
) -> list[dict[str, Any]]:
    """StreamingDataset streams as a weighted mixture of prepared datasets, one per stream;
    the weights follow streaming's Stream.apply_weights."""
    streams = _mapping(streams, "train_loader.dataset.streams")
    names = [str(name) for name in streams]
    if not names:
        raise ConfigError("train_loader.dataset.streams: empty")
    if isinstance(data, str):
        raise ConfigError(
            f"train_loader.dataset.streams: the data mixes {len(names)} streams "
            f"({', '.join(names)}); give --data NAME=DIR for each"
        )
    missing = [n for n in names if n not in data]
    extra = sorted(set(data) - set(names))
    if missing or extra:
        fault = f"missing {', '.join(missing)}" if missing else f"no stream is named {extra[0]}"
        raise ConfigError(f"--data: streams {', '.join(names)} need one NAME=DIR each ({fault})")
    parsed = {}
    for name, raw in zip(names, streams.values(), strict=True):
        where = f"train_loader.dataset.streams.{name}"
        stream = dict(_mapping(raw, where))
        amount = {k: stream.pop(k) for k in ("proportion", "repeat", "choose") if k in stream}
        if not (stream.get("local") or stream.get("remote")):
            raise ConfigError(f"{where}: no local or remote (streaming needs one)")
        folder = _mds_folder(stream, default_split)
        for key in ("local", "remote", "split"):
            stream.pop(key, None)
        _drop_keys(stream, STREAM_KEYS_DROPPED, where, notes)
        if len(amount) > 1:
            raise ConfigError(f"{where}: give one of proportion, repeat and choose")
        for key, value in amount.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{where}.{key}: expected a number >= 0, got {value!r}")
        parsed[name] = (amount, folder)
    relative = [n for n, (amount, _) in parsed.items() if "proportion" in amount]
    if relative and len(relative) != len(names):
        absolute = next(n for n in names if n not in relative)
        raise ConfigError(
            f"train_loader.dataset.streams.{absolute}: every stream needs a proportion when one "
            f"has one ({relative[0]}), as in streaming"
        )
    if epoch_size and any("repeat" in a or "choose" in a for a, _ in parsed.values()):
        raise ConfigError(
            "train_loader.dataset.epoch_size: only with proportions or no weights; streaming "
            "refuses it beside repeat and choose"
        )
    mixture = []
    for name in names:
        amount, folder = parsed[name]
        if relative:
            weight, how = float(amount["proportion"]), "its proportion"
        elif "choose" in amount:
            weight, how = float(amount["choose"]), "the samples it chooses per pass"
        else:
            weight = float(amount.get("repeat", 1)) * _stream_samples(name, data[name])
            how = "repeat x its samples, the prepared dataset's documents"
        if weight == 0:
            notes.append(f"train_loader.dataset.streams.{name}: left out (weight 0)")
            continue
        mixture.append({"path": data[name], "weight": weight})
        notes.append(
            f"train_loader.dataset.streams.{name}: data.mixture weight {weight:g} ({how}); "
            f"prepare it with python tools/prepare_data.py {folder}{options}"
        )
    if not mixture:
        raise ConfigError("train_loader.dataset.streams: every stream weighs 0")
    return mixture


def _stream_samples(name: str, path: str) -> int:
    """A stream's samples as streaming counts them: one per document of its MDS folder, which
    prepare_data keeps as the documents of the training split, plus validation's when drawn
    from the same input."""
    if path.startswith("builtin:"):
        raise ConfigError(
            f"--data {name}={path}: a built-in corpus has no sample count to weigh it by; give "
            "the streams proportions, or a prepared folder"
        )
    from mpt_jax.data import DataError, open_dataset

    try:
        meta = open_dataset(path)
        val = json.loads((Path(path) / "meta.json").read_text()).get("val", {})
    except (DataError, OSError, ValueError) as e:
        raise ConfigError(f"--data {name}={path}: {e}") from None
    samples = int(meta.splits["train"]["documents"])
    if "fraction" in val and "val" in meta.splits:
        samples += int(meta.splits["val"]["documents"])
    return samples


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


def _interval(value: Any, key: str, steps: int | None, batch: int, seq: int) -> int:
    """A composer interval in batches: `ba`, `sp` and `tok` that make whole batches, or `dur`
    of a run given in batches (composer's ceil(max_duration x fraction))."""
    if not isinstance(value, str) or value.endswith("ep"):
        raise ConfigError(
            f"{key}: {value!r} cannot be translated (a bare number or ep is epochs); give "
            "batches (500ba), samples or tokens that make whole batches, or 0.1dur"
        )
    number, unit = split_time(value, key)
    if unit == "dur":
        if steps is None:
            raise ConfigError(f"{key}: {value} needs max_duration in batches or samples")
        number = math.ceil(number * steps)
    elif unit in ("sp", "tok"):
        per_batch = batch if unit == "sp" else batch * seq
        if number % per_batch:
            raise ConfigError(f"{key}: {value} is not a whole number of batches")
        number //= per_batch
    if not float(number).is_integer() or number <= 0:
        raise ConfigError(f"{key}: {value!r} is not a whole positive number of batches")
    return int(number)


def _microbatch(micro: Any, batch: int, devices: int | None, notes: list[str]) -> int | str:
    if devices is not None and devices < 1:
        raise ConfigError(f"--devices: must be >= 1, got {devices}")
    if devices is not None and batch % devices:
        raise ConfigError(
            f"global_train_batch_size: {batch} is not divisible by --devices {devices}, which "
            "llm-foundry refuses"
        )
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
    if batch % total:  # composer runs a shorter last microbatch; here they divide the batch
        notes.append(
            f"device_train_microbatch_size: {micro} x {devices} devices does not divide "
            f"global_train_batch_size {batch}; train.microbatch is auto"
        )
        return "auto"
    return total


def _fsdp(fsdp: Any, notes: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
    if fsdp is None:  # DDP: every device holds the whole model, autocast only
        return {"data": -1, "fsdp": 1, "tensor": 1}, {"mixed_precision": "FULL"}
    fsdp = dict(_mapping(fsdp, "fsdp_config"))
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
    if not isinstance(mixed, str) or mixed.upper() not in ("FULL", "DEFAULT", "PURE"):
        raise ConfigError(
            f"fsdp_config.mixed_precision: {mixed!r} is not FULL, DEFAULT or PURE (a per-dtype "
            "mapping has no counterpart)"
        )
    train["mixed_precision"] = mixed.upper()
    if fsdp.pop("activation_checkpointing", False):
        train["remat"] = "full"
    for key in ("activation_cpu_offload", "cpu_offload"):
        if fsdp.pop(key, False):
            raise ConfigError(f"fsdp_config.{key}: offloading to the CPU is not supported")
    for key, why in FSDP_KEYS_DROPPED.items():
        if key in fsdp:
            notes.append(f"fsdp_config.{key}: dropped ({why})")
            fsdp.pop(key)
    if fsdp:
        raise ConfigError(f"fsdp_config.{sorted(fsdp)[0]}: a key this translation does not handle")
    return mesh, train


def _optimizer(optimizer: Any, notes: list[str]) -> dict[str, Any]:
    optimizer = dict(_mapping(optimizer, "optimizer"))
    name = optimizer.pop("name", None)
    if name not in OPTIMIZER_DEFAULTS:
        raise ConfigError(
            f"optimizer.name: {name!r} is not supported ({', '.join(OPTIMIZER_DEFAULTS)})"
        )
    defaults = OPTIMIZER_DEFAULTS[name]
    if name != "decoupled_lionw" and optimizer.pop("amsgrad", False) is not False:
        raise ConfigError("optimizer.amsgrad: true is not supported (it changes the update)")
    extra = sorted(set(optimizer) - set(defaults))
    if extra:
        raise ConfigError(f"optimizer.{extra[0]}: not an argument of llm-foundry's {name}")
    out = {"name": name, **defaults, **optimizer}
    betas = out["betas"]
    if not (isinstance(betas, list | tuple) and len(betas) == 2):
        raise ConfigError(f"optimizer.betas: expected two numbers, got {betas!r}")
    out["betas"] = list(betas)
    absent = [k for k in defaults if k not in optimizer]
    if absent:
        notes.append(
            f"optimizer: {', '.join(absent)} absent: {name}'s defaults "
            f"({', '.join(f'{k} {defaults[k]}' for k in absent)})"
        )
    return out


def _clipping(algorithms: Any, notes: list[str]) -> float | None:
    algorithms = _mapping(algorithms, "algorithms", none_ok=True)
    others = sorted(set(algorithms) - {"gradient_clipping"})
    if others:
        raise ConfigError(f"algorithms.{others[0]}: not supported (it would change the training)")
    if "gradient_clipping" not in algorithms:
        notes.append("algorithms.gradient_clipping: absent, so no clipping (as llm-foundry)")
        return None
    clipping = _mapping(algorithms["gradient_clipping"], "algorithms.gradient_clipping")
    extra = sorted(set(clipping) - {"clipping_type", "clipping_threshold"})
    if extra:
        raise ConfigError(
            f"algorithms.gradient_clipping.{extra[0]}: not an argument of composer's "
            "GradientClipping (clipping_type, clipping_threshold)"
        )
    if "clipping_type" not in clipping:
        raise ConfigError("algorithms.gradient_clipping.clipping_type: required (norm)")
    kind = clipping["clipping_type"]
    if kind != "norm":
        raise ConfigError(
            f"algorithms.gradient_clipping.clipping_type: {kind!r} is not supported (norm)"
        )
    if clipping.get("clipping_threshold") is None:
        raise ConfigError("algorithms.gradient_clipping.clipping_threshold: required")
    return clipping["clipping_threshold"]


def _scheduler(scheduler: Any, run_unit: str, samples: int | None) -> dict[str, Any]:
    """`run_unit`: max_duration's unit (ba, tok or sp); `samples`: its count for sp."""
    scheduler = dict(_mapping(scheduler, "scheduler"))
    name = scheduler.get("name")
    if name is None:
        raise ConfigError("scheduler.name: required (cosine_with_warmup, ...)")
    if name not in SCHEDULER_ARGUMENTS:
        raise ConfigError(
            f"scheduler.name: {name!r} is not supported ({', '.join(SCHEDULER_ARGUMENTS)})"
        )
    extra = sorted(set(scheduler) - SCHEDULER_ARGUMENTS[name] - {"name"})
    if extra:
        raise ConfigError(f"scheduler.{extra[0]}: not an argument of {name}")
    for key in SCHEDULER_REQUIRED.get(name, ("t_warmup",)):
        if key not in scheduler:
            raise ConfigError(f"scheduler.{key}: required by {name}")
    if scheduler.pop("scale_warmup", False):
        raise ConfigError("scheduler.scale_warmup: true is not supported")
    times = {k: split_time(v, f"scheduler.{k}") for k, v in scheduler.items() if k.startswith("t_")}
    if name == "inv_sqrt_with_warmup":
        for key, (_, unit) in times.items():
            if unit == "dur" and key != "t_max":
                raise ConfigError(f"scheduler.{key}: in dur, which {name} refuses")
    # composer takes dur in max_duration's unit, then wants warmup and t_max in one unit
    warmup_unit = times["t_warmup"][1].replace("dur", run_unit)
    t_max_unit = times.get("t_max", (1, "dur"))[1].replace("dur", run_unit)
    if warmup_unit != t_max_unit:
        raise ConfigError(
            f"scheduler.t_warmup: {scheduler['t_warmup']} is in {warmup_unit} and t_max in "
            f"{t_max_unit} (max_duration's unit unless given), which composer refuses"
        )
    if samples is not None:
        for key, (number, unit) in times.items():
            if unit == "dur":
                scheduler[key] = f"{int(number * samples)}sp"
        t_max, unit = split_time(scheduler.get("t_max", f"{samples}sp"), "scheduler.t_max")
        if unit == "sp" and t_max < samples:  # composer checks what the run cannot
            raise ConfigError(
                f"scheduler.t_max: {scheduler['t_max']} ends before max_duration "
                f"({samples}sp), which composer refuses"
            )
    return scheduler


def _callbacks(callbacks: Any, notes: list[str], interval: Any) -> dict[str, Any]:
    train: dict[str, Any] = {}
    for name, options in _mapping(callbacks, "callbacks", none_ok=True).items():
        options = _mapping(options, f"callbacks.{name}", none_ok=True)
        if name == "kill_loss_spike":
            extra = sorted(set(options) - KILL_LOSS_SPIKE_ARGUMENTS)
            if extra:
                raise ConfigError(
                    f"callbacks.kill_loss_spike.{extra[0]}: not an argument of llm-foundry's "
                    f"KillLossSpike ({', '.join(sorted(KILL_LOSS_SPIKE_ARGUMENTS))})"
                )
            log_only = _bool(options.get("log_only", True), "callbacks.kill_loss_spike.log_only")
            spike: dict[str, Any] = {"action": "log" if log_only else "stop"}
            for theirs, ours in (
                ("patience", "patience"),
                ("outlier_multiplier", "outlier_multiplier"),
                ("window_size", "window"),
                ("loss_cap", "loss_cap"),
            ):
                # llm-foundry takes its defaults of window and cap as "derive it"
                if options.get(theirs, LOSS_SPIKE_UNSET.get(theirs)) != LOSS_SPIKE_UNSET.get(
                    theirs
                ):
                    spike[ours] = options[theirs]
            train["loss_spike"] = spike
        elif name == "hf_checkpointer":
            extra = sorted(set(options) - HF_CHECKPOINTER_DROPPED - {"save_interval"})
            if extra:
                raise ConfigError(
                    f"callbacks.hf_checkpointer.{extra[0]}: not an argument of llm-foundry's "
                    "HuggingFaceCheckpointer"
                )
            train["export_hf"] = True
            if options.get("save_interval") is not None:
                where = "callbacks.hf_checkpointer.save_interval"
                train["export_hf_every"] = interval(options["save_interval"], where)
            notes.append(
                "callbacks.hf_checkpointer: RUN_DIR/hf-steps/ba<step> every save_interval and "
                "RUN_DIR/hf at the end, in the parameters' dtype (its other arguments dropped: "
                f"{', '.join(sorted(set(options) & HF_CHECKPOINTER_DROPPED)) or 'none given'})"
            )
        elif name in CALLBACKS_HARMLESS:
            notes.append(f"callbacks.{name}: dropped ({CALLBACKS_HARMLESS[name]})")
        elif name in CALLBACKS_CHANGING:
            raise ConfigError(f"callbacks.{name}: not supported (it {CALLBACKS_CHANGING[name]})")
        else:
            raise ConfigError(
                f"callbacks.{name}: unknown to the translation; remove it if it only logs"
            )
    return train


def _loggers(loggers: Any, notes: list[str]) -> dict[str, Any]:
    train: dict[str, Any] = {}
    for name, options in _mapping(loggers, "loggers", none_ok=True).items():
        options = _mapping(options, f"loggers.{name}", none_ok=True)
        if name == "wandb":
            train["wandb_project"] = options.get("project") or "mpt-jax"
            train["wandb_mode"] = "online"
            others = sorted(set(options) - {"project"})
            if others:
                notes.append(f"loggers.wandb: {', '.join(others)} dropped (the project only)")
        elif name == "tensorboard":
            notes.append("loggers.tensorboard: always written (RUN_DIR/tensorboard)")
        else:
            notes.append(f"loggers.{name}: dropped (metrics.jsonl, TensorBoard and W&B only)")
    return train


def _checkpoints(
    src: dict[str, Any], steps: int | None, batch: int, seq: int, notes: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    folder = src.pop("save_folder", None)
    # llm-foundry's defaults: every 1000 batches, every checkpoint kept
    interval = src.pop("save_interval", "1000ba")
    keep = src.pop("save_num_checkpoints_to_keep", None)
    if folder is None:
        notes.append(
            "save_folder: absent, so llm-foundry would save nothing; checkpoints go to "
            "RUN_DIR/checkpoints all the same, the latest checkpoint.keep (3) kept"
        )
    else:
        notes.append(f"save_folder: {folder} dropped (checkpoints go to RUN_DIR/checkpoints)")
        keep = -1 if keep is None else keep
    out["every"] = _interval(interval, "save_interval", steps, batch, seq)
    if keep is None:
        pass
    elif keep == -1:  # every checkpoint
        out["keep_every"] = out["every"]
    elif isinstance(keep, int) and not isinstance(keep, bool) and keep > 0:
        out["keep"] = keep
    else:
        raise ConfigError(f"save_num_checkpoints_to_keep: expected -1 or > 0, got {keep!r}")
    return out


# every top-level key translate() reads or drops
KNOWN_TOP_KEYS = {
    "variables",
    "model",
    "max_seq_len",
    "train_loader",
    "tokenizer",
    "global_train_batch_size",
    "max_duration",
    "device_train_microbatch_size",
    "seed",
    "precision",
    "fsdp_config",
    "eval_interval",
    "console_log_interval",
    "eval_first",
    "eval_subset_num_batches",
    "icl_tasks",
    "eval_gauntlet",
    "icl_subset_num_batches",
    "callbacks",
    "loggers",
    "progress_bar",
    "log_to_console",
    "accumulate_train_batch_on_tokens",
    "optimizer",
    "algorithms",
    "scheduler",
    "save_folder",
    "save_interval",
    "save_num_checkpoints_to_keep",
    "load_path",
    "run_name",
    *TOP_KEYS_DROPPED,
}
