"""`python -m mpt_jax.lm_eval ARGS`: lm-eval's own command line with model "mpt_jax" registered."""

import sys

from lm_eval.__main__ import cli_evaluate

import mpt_jax.lm_eval  # noqa: F401  registers the model before lm-eval resolves --model
from mpt_jax.checkpoint import CheckpointError


def main() -> int:
    """lm-eval's command line; bad input (a model argument, a task name) is one line, exit 2."""
    try:
        cli_evaluate()
    except (ValueError, CheckpointError, OSError) as e:  # ours are ValueErrors, as lm-eval's
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
