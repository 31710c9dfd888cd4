"""`mpt-jax eval`: perplexity and bits per byte, llm-foundry ICL tasks and its eval gauntlet."""

from mpt_jax.evaluation.errors import EvalError
from mpt_jax.evaluation.gauntlet import GauntletConfig, compute_gauntlet, load_gauntlet
from mpt_jax.evaluation.loading import load_for_eval
from mpt_jax.evaluation.runner import evaluate, format_results
from mpt_jax.evaluation.tasks import TaskConfig, load_task_list

__all__ = [
    "EvalError",
    "GauntletConfig",
    "TaskConfig",
    "compute_gauntlet",
    "evaluate",
    "format_results",
    "load_for_eval",
    "load_gauntlet",
    "load_task_list",
]
