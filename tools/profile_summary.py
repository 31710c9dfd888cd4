"""Where the time goes in a jax.profiler trace: category and top-kernel tables as Markdown.

    python tools/profile_summary.py TRACE_DIR [--steps N] [--top K]
    python tools/profile_summary.py --ncu REPORT.csv

TRACE_DIR is a folder holding (at any depth) a `perfetto_trace.json.gz` written with
`create_perfetto_trace=True`: a `tools/bench_train.py --profile DIR` row folder, a run's
`RUN_DIR/profile` (train.profile) or any `jax.profiler.trace(dir, create_perfetto_trace=True)`
folder; the newest trace is read (without a Perfetto file, the newest `<host>.trace.json.gz`,
which every jax.profiler trace writes). `--steps N` divides the figures into per-step ones (the
number of steps the trace holds). See mpt_jax/profiling.py for which events count. Exit status 2
with one line on stderr when the folder holds no trace or the trace cannot be read.

`--ncu REPORT.csv` reads what `ncu --csv --page details` printed instead (Nsight Compute's
hardware counters per kernel launch; tools/gpu/kernel_profile.sh) and prints one row per kernel:
duration, SM and memory throughput, registers, shared memory, occupancy, issue stalls.
"""

from __future__ import annotations

import argparse
import sys
import typing

from mpt_jax.profiling import format_summary, summarize_ncu_csv, summarize_trace


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", metavar="TRACE_DIR", nargs="?")
    parser.add_argument("--steps", type=int, help="steps in the trace: per-step figures")
    parser.add_argument("--top", type=int, default=20, help="names in the top table (20)")
    parser.add_argument("--ncu", metavar="FILE", help="summarize an ncu --csv report instead")
    args = parser.parse_args(argv)
    if (args.trace_dir is None) == (args.ncu is None):
        parser.error("give TRACE_DIR or --ncu FILE")
    if args.steps is not None and args.steps < 1:
        parser.error(f"argument --steps: must be >= 1, got {args.steps}")
    if args.top < 0:
        parser.error(f"argument --top: must be >= 0, got {args.top}")
    try:
        if args.ncu is not None:
            with open(args.ncu, errors="replace") as f:
                print(summarize_ncu_csv(f.read()), end="")
            return 0
        summary = summarize_trace(args.trace_dir, steps=args.steps, top=args.top)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_summary(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
