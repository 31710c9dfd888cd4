"""EleutherAI's lm-evaluation-harness model "mpt_jax": loglikelihood, rolling, generation.

`python -m mpt_jax.lm_eval --model mpt_jax --model_args path=MODEL[,step=N,tokenizer=T] ...`
imports this module, then runs lm-eval's own command line: lm-eval 0.4.13 resolves --model only
among the models of its source tree. Releases with entry-point plugins (group `lm_eval.models`,
declared in pyproject.toml) find it from the plain `lm_eval` command too.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  lm-eval imports its built-ins only into an empty registry
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text

from mpt_jax.generate import GenerationError, generate
from mpt_jax.loading import load_model_and_tokenizer

logger = logging.getLogger(__name__)

LENGTH_BUCKET = 32  # scored sequences are right-padded to multiples of this


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, ids_BS, targets_BS):
    """Log-probability of each target token and whether it is the argmax, both (B, S)."""
    logits_BSV = nnx.merge(graphdef, state)(ids_BS).astype(jnp.float32)
    target_BS = jnp.take_along_axis(logits_BSV, targets_BS[:, :, None], axis=-1)[:, :, 0]
    target_logp_BS = target_BS - jax.nn.logsumexp(logits_BSV, axis=-1)
    return target_logp_BS, jnp.argmax(logits_BSV, axis=-1) == targets_BS


def _batch_size(value: Any) -> int:
    """lm-eval passes '1', 8 or 'auto[:N]'; auto means a fixed default here."""
    if isinstance(value, str) and value.startswith("auto"):
        return 8
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {value}")
    return size


@register_model("mpt_jax")
class MPTJaxLM(TemplateLM):
    """An mpt_jax model (HF MPT folder or run folder) behind lm-eval's LM interface."""

    def __init__(
        self,
        path: str | None = None,
        step: int | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int | None = None,
        seed: int = 0,
        max_batch_size: Any = None,
        device: Any = None,
    ):
        super().__init__()
        if path is None:
            raise ValueError("mpt_jax: give the model as --model_args path=RUN_DIR|HF_FOLDER")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"mpt_jax: dtype must be float32 or bfloat16, got {dtype!r}")
        self.model, self.tok = load_model_and_tokenizer(
            path,
            step=None if step is None else int(step),
            tokenizer=tokenizer,
            dtype=jnp.dtype(dtype),
        )
        self.graphdef, self.state = nnx.split(self.model)
        limit = self.model.config.max_seq_len
        self.max_length = limit if max_length is None else int(max_length)
        if not 1 < self.max_length <= limit:
            raise ValueError(f"mpt_jax: max_length must be in [2, {limit}], got {max_length}")
        self.batch_size = _batch_size(batch_size)
        # lm-eval's HFLM default of 256, but at most half the window, so that a small model's
        # generation tasks keep room for their prompts
        default = min(256, self.max_length // 2)
        self.max_gen_toks = default if max_gen_toks is None else int(max_gen_toks)
        if not 1 <= self.max_gen_toks < self.max_length:
            raise ValueError(
                f"mpt_jax: max_gen_toks must be in [1, {self.max_length - 1}] (below max_length "
                f"{self.max_length}), got {max_gen_toks}"
            )
        self.seed = int(seed)
        self._generate_calls = 0  # each batch samples with its own key: (seed, this count)
        self._name = f"{path}" + ("" if step is None else f"@{step}")

    # -- tokenization ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "sha256", self.tok.kind)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        return np.asarray(self.tok.encode(string)).tolist()

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tok.decode(tokens)

    # -- scoring --------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of continuation log-probs, all greedy) per (key, context ids, continuation ids)."""
        L = self.max_length
        rows = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"mpt_jax: request {i} has an empty continuation")
            if len(continuation) > L:
                raise ValueError(
                    f"mpt_jax: a continuation of {len(continuation)} tokens exceeds max_length {L}"
                )
            # keep the continuation and as much context as fits in L inputs
            whole = (list(context) + list(continuation))[-(L + 1) :]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        # longest first, so each batch pads little; results go back in request order
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        B = self.batch_size
        for start in range(0, len(order), B):
            chunk = order[start : start + B]
            S = min(-(-len(rows[chunk[0]][0]) // LENGTH_BUCKET) * LENGTH_BUCKET, L)
            ids_BS = np.zeros((B, S), np.int32)
            targets_BS = np.zeros((B, S), np.int32)
            for b, i in enumerate(chunk):
                inputs, targets, _ = rows[i]
                ids_BS[b, : len(inputs)] = inputs
                targets_BS[b, : len(targets)] = targets
            logp_BS, greedy_BS = jax.device_get(
                _score(self.graphdef, self.state, jnp.asarray(ids_BS), jnp.asarray(targets_BS))
            )
            for b, i in enumerate(chunk):
                n_in, n = len(rows[i][0]), rows[i][2]
                span = slice(n_in - n, n_in)
                results[i] = (float(logp_BS[b, span].sum()), bool(greedy_BS[b, span].all()))
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods over disjoint windows of max_length tokens."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                context, continuation = lm_utils.make_disjoint_window(window)
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logp
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations (KV-cache sampling), cut at the first of the request's `until` strings."""
        groups: dict[str, list[int]] = {}
        settings = []
        for i, request in enumerate(requests):
            _, gen_kwargs = request.args
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            settings.append(kwargs)
            groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            kwargs = settings[members[0]]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                texts = self._generate_batch([requests[i].args[0] for i in chunk], kwargs)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate_batch(self, contexts: list[str], kwargs: dict[str, Any]) -> list[str]:
        max_new = int(kwargs["max_gen_toks"])
        room = self.max_length - max_new
        if room < 1:
            raise GenerationError(
                f"mpt_jax: max_gen_toks {max_new} leaves no room for a prompt in "
                f"max_length {self.max_length}"
            )
        unused = set(kwargs) - {"until", "max_gen_toks", "do_sample", "temperature"}
        unused -= {"top_k", "top_p"}
        if unused:
            logger.warning("mpt_jax: ignoring generation arguments %s", sorted(unused))
        sample = bool(kwargs.get("do_sample"))
        # the prompt keeps its last tokens, as lm-eval's HF model does; empty ones get EOS
        prompts = [self.tok_encode(c)[-room:] or [self.eot_token_id] for c in contexts]
        n_real = len(prompts)
        # a full batch keeps the compiled shapes of earlier batches
        prompts += [prompts[0]] * (self.batch_size - n_real)
        tokens = generate(
            self.model,
            prompts,
            max_new_tokens=max_new,
            # sampling without a temperature samples at 1.0, as lm-eval's HF and vLLM models do
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_k=kwargs.get("top_k") if sample else None,
            top_p=kwargs.get("top_p") if sample else None,
            seed=self._next_batch_seed(),
            eos_id=self.eot_token_id,
        )[:n_real]
        return [
            postprocess_generated_text(self.tok_decode(t), kwargs["until"], None) for t in tokens
        ]

    def _next_batch_seed(self) -> int:
        """A seed of its own for each generation batch, (seed, batches so far): with one seed,
        row b of every batch drew the same sample (HF's RNG advances between batches)."""
        seed = int(np.random.SeedSequence([self.seed, self._generate_calls]).generate_state(1)[0])
        self._generate_calls += 1
        return seed

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self._name, "max_length": self.max_length}
