"""`mpt-jax` command line: `mpt-jax train CONFIG.yaml [key=value ...] [--overwrite]
[--max-restarts N]`."""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)

    from mpt_jax.config import ConfigError
    from mpt_jax.data import DataError

    if args.max_restarts is not None:
        return _supervise(args)

    from mpt_jax.checkpoint import CheckpointError
    from mpt_jax.train import NonFiniteLossError, load_and_run

    try:
        final = load_and_run(args.config, args.overrides, overwrite=args.overwrite)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if final.get("preempted"):
        print(
            f"stopped by {final['preempted']} at step {final['step']}: checkpoint saved; "
            "run the same command to resume"
        )
        print(f"run folder: {final['run_dir']}")
        return 0
    summary = ", ".join(
        f"{k} {final[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if k in final
    )
    print(f"done: {summary}")
    print(f"run folder: {final['run_dir']}")
    if "hf_dir" in final:
        print(f"exported model (transformers MptForCausalLM): {final['hf_dir']}")
    return 0


def _supervise(args: argparse.Namespace) -> int:
    from mpt_jax.config import ConfigError, load_run_config
    from mpt_jax.supervisor import supervise

    if args.max_restarts < 0:
        print("error: --max-restarts: must be >= 0", file=sys.stderr)
        return 2
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return supervise(
        ["train", args.config, *args.overrides],
        run_dir=cfg.run_dir,
        max_restarts=args.max_restarts,
        backoff_s=args.restart_backoff,
        first_extra=["--overwrite"] if args.overwrite else [],
    )
