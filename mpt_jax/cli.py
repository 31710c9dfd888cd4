"""`mpt-jax` command line: `mpt-jax train CONFIG.yaml [key=value ...] [--overwrite]
[--max-restarts N]`."""

from __future__ import annotations

import argparse
import gc
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpt-jax", description="MPT pretraining in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a YAML run config (resumes a run folder)")
    train.add_argument("config", help="run config YAML (see experiments/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a run folder that holds another config"
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        metavar="N",
        help="supervise the trainer in a child process; restart it after a crash up to N times",
    )
    train.add_argument(
        "--restart-backoff",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds before the first restart, doubled after each failure without progress",
    )
    train.add_argument(
        "--print-run-dir",
        action="store_true",
        help="print the run folder the config and overrides give, and exit (for launch scripts)",
    )
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        # overrides may also follow the flags: `train C.yaml --overwrite train.steps=10`
        stray = [x for x in extra if x.startswith("-") or "=" not in x]
        args.overrides += [x for x in extra if x not in stray]
        extra = stray
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "eval":
        return _eval(args)
    if args.command == "generate":
        return _generate(args)

    if args.print_run_dir:
        return _print_run_dir(args)
    if args.max_restarts is not None:
        return _supervise(args)

    from mpt_jax.run_log import captured_output

    # the run log (RUN_DIR/logs/) gets this command's own last lines too
    with captured_output():
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from mpt_jax.checkpoint import CheckpointError, quiet_abandoned_writes
    from mpt_jax.config import ConfigError
    from mpt_jax.data import DataError
    from mpt_jax.distributed import JoinError
    from mpt_jax.loss_spikes import LOSS_SPIKE_EXIT_CODE, LossSpikeError
    from mpt_jax.safetensors_io import CheckpointError as HFFolderError
    from mpt_jax.train import NonFiniteLossError, load_and_run

    # the modules just imported live as long as the process: out of the collector's full
    # passes, which otherwise walk them again and again (about 1 s of a tiny run's start)
    gc.freeze()
    try:
        final = load_and_run(args.config, args.overrides, overwrite=args.overwrite)
    except (ConfigError, DataError, HFFolderError) as e:  # HF folders: init_from
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LossSpikeError as e:  # the data and state are as before: a restart would repeat it
        print(f"error: {e}", file=sys.stderr)
        return LOSS_SPIKE_EXIT_CODE
    except (CheckpointError, NonFiniteLossError, JoinError) as e:
        quiet_abandoned_writes()
        print(f"error: {e}", file=sys.stderr)
        return 1
    if final.get("preempted"):
        saved = (
            "checkpoint saved; run the same command to resume"
            if final.get("checkpoint_saved")
            else f"nothing saved ({final.get('not_saved', 'checkpoint.enabled is false')})"
        )
        print(f"stopped by {final['preempted']} at step {final['step']}: {saved}")
        print(f"run folder: {final['run_dir']}")
        return 0
    # a start whose only step was its first knows no rate (null, as its metrics line)
    summary = ", ".join(
        f"{k} {final[k]:.4g}"
        for k in ("loss", "val_loss", "tokens_per_s")
        if final.get(k) is not None
    )
    print(f"done: {summary}")
    print(f"run folder: {final['run_dir']}")
    if "hf_dir" in final:
        print(f"exported model (transformers MptForCausalLM): {final['hf_dir']}")
    return 0


def _print_run_dir(args: argparse.Namespace) -> int:
    from mpt_jax.config import ConfigError, load_run_config

    try:
        print(load_run_config(args.config, args.overrides).run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _supervise(args: argparse.Namespace) -> int:
    from mpt_jax.config import ConfigError, load_run_config
    from mpt_jax.distributed import is_process_zero
    from mpt_jax.supervisor import supervise

    if args.max_restarts < 0:
        print("error: --max-restarts: must be >= 0", file=sys.stderr)
        return 2
    try:
        cfg = load_run_config(args.config, args.overrides)
        # every process of a multi-process run has a supervisor; process 0's keeps the record
        keep_record = is_process_zero(cfg.distributed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return supervise(
        ["train", args.config, *args.overrides],
        run_dir=cfg.run_dir,
        max_restarts=args.max_restarts,
        backoff_s=args.restart_backoff,
        first_extra=["--overwrite"] if args.overwrite else [],
        keep_record=keep_record,
    )


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="perplexity, llm-foundry ICL tasks and gauntlet (docs/eval.md)"
    )
    ev.add_argument("model", help="run folder (latest or --step checkpoint) or HF MPT folder")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder")
    ev.add_argument("--tasks", metavar="TASKS.yaml", help="llm-foundry icl_tasks list")
    ev.add_argument("--gauntlet", metavar="GAUNTLET.yaml", help="llm-foundry eval_gauntlet")
    ev.add_argument(
        "--data",
        metavar="PREPARED_DIR",
        help="prepared dataset for perplexity, or builtin:NAME (prepared in the model's tokens)",
    )
    ev.add_argument("--split", default="val", help="dataset split (default val)")
    ev.add_argument("--seq-lens", metavar="L1,L2", help="window lengths (default max_seq_len)")
    ev.add_argument("--max-tokens", type=int, default=None, help="perplexity token budget")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ev.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the model's)")
    ev.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    ev.add_argument("--mesh", metavar="data=1,fsdp=-1,tensor=1", help="device mesh sizes")
    ev.add_argument("--out", metavar="results.json", help="write all results as JSON")
    ev.add_argument("--no-progress", dest="progress", action="store_false", help="no bars")


def _eval(args: argparse.Namespace) -> int:
    from mpt_jax.checkpoint import CheckpointError, quiet_abandoned_writes
    from mpt_jax.config import ConfigError
    from mpt_jax.data import DataError
    from mpt_jax.evaluation.runner import run_cli
    from mpt_jax.safetensors_io import CheckpointError as HFFolderError

    try:
        run_cli(args)
    except (ConfigError, DataError, HFFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        quiet_abandoned_writes()
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample continuations with a KV cache")
    gen.add_argument("model", help="run folder (latest or --step checkpoint) or HF MPT folder")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int, default=None, metavar="K")
    gen.add_argument("--top-p", type=float, default=None, metavar="P")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder")
    gen.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the model's)")
    gen.add_argument("--eos-token", help="the tokenizer's end-of-text token, where none says it")
    gen.add_argument("--max-seq-len", type=int, default=None, help="ALiBi: a longer context")
    gen.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")


def _generate(args: argparse.Namespace) -> int:
    from mpt_jax.checkpoint import CheckpointError, quiet_abandoned_writes
    from mpt_jax.config import ConfigError
    from mpt_jax.data import DataError
    from mpt_jax.generate import GenerationError, run_cli
    from mpt_jax.safetensors_io import CheckpointError as HFFolderError

    try:
        run_cli(args)
    except (ConfigError, DataError, GenerationError, HFFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # an unreadable run folder, as for train and eval
        quiet_abandoned_writes()
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
