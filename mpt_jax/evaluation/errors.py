"""The one error type of `mpt-jax eval`: a bad task file, task list, gauntlet or option."""

from __future__ import annotations

from mpt_jax.config import ConfigError


class EvalError(ConfigError):
    """Bad evaluation input; the message names the file (and line) or the option."""
