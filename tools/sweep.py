"""Ablation sweeps: train every member of a sweep file, then tabulate and plot the results.

    python tools/sweep.py SWEEP.yaml                   # members one after another on this machine
    python tools/sweep.py SWEEP.yaml --parallel 4      # 4 at once on disjoint GPUs (or CPU cores)
    python tools/sweep.py SWEEP.yaml --slurm           # write a SLURM job array + commands.txt
    python tools/sweep.py SWEEP.yaml --report-only     # results.csv, results.md, plots
    python tools/sweep.py SWEEP.yaml --list            # members, run folders and status

Finished members are skipped, so running the same command again resumes an interrupted sweep.
The sweep file format is in docs/training.md ("Sweeps").
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep YAML (see experiments/sweeps/)")
    parser.add_argument("--out-dir", help="sweep folder (default: the file's out_dir)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="write a SLURM array, do not run")
    mode.add_argument("--report-only", action="store_true", help="only collect and plot")
    mode.add_argument("--list", action="store_true", help="print the members and stop")
    parser.add_argument("--parallel", type=int, default=1, metavar="K", help="members at once")
    parser.add_argument("--gpus", metavar="0,1,..", help="GPU ids to share out (default: all)")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    slurm = parser.add_argument_group("--slurm")
    slurm.add_argument("--gpus-per-member", type=int, default=1)
    slurm.add_argument("--cpus-per-member", type=int, default=8)
    slurm.add_argument("--time", default="24:00:00", help="per array task")
    slurm.add_argument("--max-concurrent", type=int, default=None, help="array throttle %%N")
    slurm.add_argument("--partition", default=None)
    args = parser.parse_args(argv)

    from mpt_jax.atomic_write import unwritable_reason
    from mpt_jax.config import ConfigError
    from mpt_jax.sweep import report, runner
    from mpt_jax.sweep.spec import load_sweep

    def log(message: str) -> None:
        print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)

    try:
        sweep = load_sweep(args.sweep, args.out_dir)
        # every mode but --list writes there: refused now, not by a traceback at the first file
        if not args.list and (reason := unwritable_reason(sweep.out_dir)):
            given = "--out-dir" if args.out_dir else f"{args.sweep}: out_dir"
            raise ConfigError(f"{given}: {reason}")
        gpus = _ints(args.gpus, "--gpus")
        if args.slurm and (args.parallel != 1 or gpus is not None):
            # SLURM places the array tasks; a throttle is --max-concurrent
            flag = "--parallel" if args.parallel != 1 else "--gpus"
            raise ConfigError(f"{flag}: only for a local run; with --slurm use --max-concurrent")
        groups = (
            None
            if args.list or args.slurm or args.report_only
            else (runner.device_groups(args.parallel, gpus))
        )
        slurm_options = (
            runner.SlurmOptions(
                gpus_per_member=args.gpus_per_member,
                cpus_per_member=args.cpus_per_member,
                time=args.time,
                max_concurrent=args.max_concurrent,
                partition=args.partition,
            )
            if args.slurm
            else None
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    finished = [m for m in sweep.members if runner.is_finished(sweep, m)]
    todo = [m for m in sweep.members if m not in finished]
    if args.list:
        for m in sweep.members:
            state = "finished" if m in finished else "to run"
            print(f"{m.name}\t{state}\t{m.run_dir}")
        return 0
    if args.slurm:
        commands, sbatch, indices = runner.write_slurm(sweep, slurm_options)
        print(f"{len(sweep.members)} members, {len(indices)} to run; launch commands: {commands}")
        print(f"submit with: sbatch {sbatch}")
        print(f"then collect: {runner.report_command(sweep)}")
        return 0

    status: dict[str, str] = {m.name: "finished" for m in finished}
    if not args.report_only:
        log(
            f"{sweep.name}: {len(sweep.members)} members, {len(finished)} finished (skipped), "
            f"{len(todo)} to run, {len(groups)} at once; folder {sweep.out_dir}"
        )
        status.update(runner.LocalRunner(sweep, groups, log).run(todo))
    rows, table = report.write_report(sweep, status, plots=args.plots, log=log)
    print()
    print(table)
    print(f"results: {sweep.out_dir / 'results.csv'}, {sweep.out_dir / 'results.md'}")
    failed = [r["member"] for r in rows if r["status"].startswith("failed")]
    unfinished = [
        r["member"] for r in rows if r["status"] != "finished" and r["member"] not in failed
    ]
    if failed:
        log(f"{len(failed)} failed: {', '.join(failed)} (logs in {sweep.out_dir / 'logs'})")
        return 1
    if unfinished and not args.report_only:
        log(f"{len(unfinished)} unfinished: run the same command again to resume them")
        return 1
    return 0


def _ints(text: str | None, option: str) -> list[int] | None:
    from mpt_jax.config import ConfigError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated integers, got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
