"""Checkpoint cost: how long an async save blocks the training loop against the whole save.

    python tools/bench_checkpoint.py [--model mpt-125m] [--precision amp_bf16] [--saves 3]
                                     [--workdir DIR]

Builds the full train state (params and optimizer moments) of a preset on this machine's
devices, saves it `--saves` times with mpt_jax's Checkpointer (asynchronous, as in training)
and prints a Markdown table: seconds the caller was blocked, seconds until the step is on
disk, and their ratio (the target is under 10%).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mpt-125m", help="a preset in experiments/models")
    parser.add_argument(
        "--precision", default="amp_bf16", choices=["fp32", "amp_bf16", "pure_bf16"]
    )
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument(
        "--workdir", default=None, help="where its temporary folder goes (default: the system's)"
    )
    args = parser.parse_args(argv)
    if args.saves < 1:
        parser.error(f"--saves: must be >= 1, got {args.saves}")
    from mpt_jax.atomic_write import unwritable_reason

    if args.workdir is not None and (reason := unwritable_reason(args.workdir)):
        print(f"error: --workdir: {reason}", file=sys.stderr)
        return 2

    import jax

    from mpt_jax.checkpoint import Checkpointer
    from mpt_jax.config import CheckpointConfig, ConfigError, count_params, run_config_from_dict
    from mpt_jax.sharding import make_mesh
    from mpt_jax.train import init_state

    try:
        cfg = run_config_from_dict(
            {
                "model": args.model,
                "data": {"path": "unused"},
                "train": {
                    "global_batch": jax.device_count(),
                    "steps": 1,
                    "precision": args.precision,
                },
                "run_dir": "unused",
            }
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, state, _ = init_state(cfg, make_mesh(cfg.mesh))
    jax.block_until_ready(state)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    # a folder of its own, also inside --workdir: only that is removed afterwards
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint-", dir=args.workdir))
    try:
        checkpointer = Checkpointer(work / "checkpoints", CheckpointConfig(keep=2))
        rows = []
        for step in range(1, args.saves + 1):
            start = time.perf_counter()
            checkpointer.save(
                step,
                params=state.params,
                opt_state=state.opt_state,
                counters=state.counters(),
                meta={"step": step, "config": {}},
            )
            returned = time.perf_counter() - start
            checkpointer.wait()
            done = checkpointer.completed.pop()
            rows.append((step, returned, done["checkpoint_save_s"]))
        checkpointer.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    device = jax.devices()[0]
    print(
        f"{args.model} ({count_params(cfg.model):,} parameters, {args.precision}): "
        f"{n_bytes / 1e9:.2f} GB of params and optimizer state; {device.platform} "
        f"{device.device_kind} x{jax.device_count()}, jax {jax.__version__}"
    )
    print("| save | loop blocked (s) | on disk after (s) | blocked / total |")
    print("|---|---|---|---|")
    for step, blocked, total in rows:
        print(f"| {step} | {blocked:.3f} | {total:.3f} | {blocked / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
