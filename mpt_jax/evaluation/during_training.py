"""llm-foundry's `icl_tasks` and `eval_gauntlet` run at each evaluation of a training run."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mpt_jax.evaluation.errors import EvalError
from mpt_jax.evaluation.gauntlet import load_gauntlet, parse_gauntlet
from mpt_jax.evaluation.icl import gauntlet_scores, prepare_tasks, run_prepared
from mpt_jax.evaluation.scoring import Scorer
from mpt_jax.evaluation.tasks import load_task_list
from mpt_jax.evaluation.tokens import IclTokenizer


class IclDuringTraining:
    """Task files read and tokenized once at the start; scored with each evaluation's params.

    Errors (EvalError) start with the option at fault: `icl_tasks:` or `eval_gauntlet:`.

    The scorer (its compiled programs included) is built at the first evaluation and reused,
    so later evaluations compile nothing. Generation tasks decode greedily by full forward
    passes (Scorer.greedy), not with `mpt-jax eval`'s KV cache.
    """

    def __init__(
        self,
        tasks_path: str,
        gauntlet_path: str | None,
        tokenizer: Any,
        *,
        max_seq_len: int,
        batch_size: int,
        row_multiple: int = 1,
        subset_num_batches: int | None = None,
        loss_chunk: int | None = None,
    ):
        self.gauntlet = None
        try:
            tasks, inline = load_task_list(tasks_path)
            self.tokenizer = IclTokenizer(tokenizer)
            self.jobs = prepare_tasks(
                tasks,
                self.tokenizer,
                max_seq_len,
                subset_num_batches=subset_num_batches,
                batch_size=batch_size,
                row_multiple=row_multiple,
            )
            if gauntlet_path is None and inline is not None:
                self.gauntlet = parse_gauntlet(inline, where=f"{tasks_path} eval_gauntlet")
        except EvalError as e:
            raise EvalError(f"icl_tasks: {e}") from None
        if gauntlet_path is not None:
            try:
                self.gauntlet = load_gauntlet(gauntlet_path)
            except EvalError as e:
                raise EvalError(f"eval_gauntlet: {e}") from None
        if self.gauntlet is not None:
            # llm-foundry only warns; a gauntlet over tasks that are not run would log zeros
            evaluated = {f"{job.task.label}/{job.k}-shot" for job in self.jobs}
            for category in self.gauntlet.categories:
                for bench in category.benchmarks:
                    if bench.key not in evaluated:
                        option = "eval_gauntlet" if gauntlet_path else "icl_tasks"
                        raise EvalError(
                            f"{option}: {gauntlet_path or tasks_path}: the gauntlet's "
                            f"{category.name} benchmark {bench.key} is not among the tasks "
                            f"({', '.join(sorted(evaluated))})"
                        )
        self.batch_size = batch_size
        self.loss_chunk = loss_chunk
        self.scorer: Scorer | None = None

    def digest(self) -> str:
        """SHA-256 of the tasks, prompts and tokens: equal on processes that read equal files."""
        h = hashlib.sha256()
        for job in self.jobs:
            # the task's settings and answers too: they decide how many programs run
            h.update(repr((job.task, job.k, job.group, job.counts, job.max_new)).encode())
            h.update(repr(job.prompts).encode())
            for tokens, start in job.sequences:
                h.update(np.asarray(tokens, np.int64).tobytes() + start.to_bytes(8, "little"))
        return h.hexdigest()

    def evaluate(
        self, graphdef: Any, params: Any, mesh: Mesh, on_batch: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """`icl/LABEL/N-shot[/CATEGORY]` accuracies and `gauntlet/NAME` scores."""
        if self.scorer is None:
            self.scorer = Scorer(
                nnx.merge(graphdef, params),
                mesh,
                batch_size=self.batch_size,
                loss_chunk=self.loss_chunk,
            )
        else:
            self.scorer.use_params(params)
        try:
            results = run_prepared(self.jobs, self.scorer, self.tokenizer, on_batch=on_batch)
        finally:  # training goes on without this copy (a cast) of the parameters
            self.scorer.use_params(None)
        values = {}
        for r in results:
            values[f"icl/{r['key']}"] = r["accuracy"]
            for name, part in r.get("categories", {}).items():
                values[f"icl/{r['key']}/{name}"] = part["accuracy"]
        if self.gauntlet is not None:
            scores = gauntlet_scores(self.gauntlet, results)
            for name, score in {**scores["categories"], **scores["averages"]}.items():
                values[f"gauntlet/{name}"] = score
        return values
