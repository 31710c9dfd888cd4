"""`mpt-jax` command line: `mpt-jax train CONFIG.yaml [key=value ...] [--overwrite]`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpt-jax", description="MPT pretraining in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a YAML run config")
    train.add_argument("config", help="run config YAML (see experiments/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a run folder that holds another config"
    )
    args = parser.parse_args(argv)

    from mpt_jax.config import ConfigError
    from mpt_jax.data import DataError
    from mpt_jax.train import NonFiniteLossError, load_and_run

    try:
        final = load_and_run(args.config, args.overrides, overwrite=args.overwrite)
    except (ConfigError, DataError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = ", ".join(
        f"{k} {final[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if k in final
    )
    print(f"done: {summary}")
    print(f"run folder: {final['run_dir']}")
    if "hf_dir" in final:
        print(f"exported model (transformers MptForCausalLM): {final['hf_dir']}")
    return 0
