"""`python -m mpt_jax.lm_eval ARGS`: lm-eval's own command line with model "mpt_jax" registered."""

from lm_eval.__main__ import cli_evaluate

import mpt_jax.lm_eval  # noqa: F401  registers the model before lm-eval resolves --model

if __name__ == "__main__":
    cli_evaluate()
