"""Loss spikes and persistently high losses, watched on the host (llm-foundry's kill_loss_spike).

The trainer reads every step's loss anyway; the monitor keeps a window of the recent finite ones.
A loss at least `outlier_multiplier` times the window's mean is an outlier, and `patience + 1`
outliers in a row are a spike. Once `2 x window` steps have run, half the window above the loss
cap is a high-loss stretch. The window and streak go into each checkpoint, so a resumed or
rolled-back run decides as the uninterrupted one would.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Literal

from mpt_jax.config import LossSpikeConfig

MIN_WINDOW = 100  # llm-foundry's floor on the window
WINDOW_FRACTION = 0.05  # of the run's steps, when that is more
MAX_LOSS_CAP = 10.0  # llm-foundry's ceiling on the derived loss cap
# `mpt-jax train`'s exit status after a stop for a loss spike: not retried, since a restart
# resumes from the same state and data and would repeat it
LOSS_SPIKE_EXIT_CODE = 3


class LossSpikeError(RuntimeError):
    """The loss spiked or stayed high, and the run was told to stop (or has no rollback left)."""


@dataclasses.dataclass(frozen=True)
class LossEvent:
    """A spike (`first_step`..`step` outliers) or the start of a high-loss stretch at `step`."""

    kind: Literal["loss_spike", "high_loss"]
    step: int  # 1-based, as in metrics.jsonl
    first_step: int
    loss: float
    running_mean: float  # the window's mean before `first_step`
    threshold: float  # multiplier x running_mean (spike), the loss cap (high loss)
    count: int  # outliers in a row (spike); window losses above the cap (high loss)
    window: int
    multiplier: float

    def describe(self) -> str:
        if self.kind == "loss_spike":
            losses = "loss" if self.count == 1 else f"{self.count} losses in a row"
            return (
                f"steps {self.first_step}..{self.step} were a loss spike: {losses} at least "
                f"{self.multiplier:g} x the mean of the {self.window} before (the last "
                f"{self.loss:.4g}, against a mean of {self.running_mean:.4g} before the first)"
            )
        return (
            f"step {self.step}: {self.count} of the last {self.window} losses are above the loss "
            f"cap {self.threshold:.4g} (the window's mean {self.running_mean:.4g})"
        )

    def metrics(self) -> dict[str, float]:
        """What metrics.jsonl records at the detecting step."""
        if self.kind == "loss_spike":
            return {"loss_spike_from_step": self.first_step, "loss_spike_mean": self.running_mean}
        return {"high_loss_cap": self.threshold, "high_loss_count": self.count}


def window_size(cfg: LossSpikeConfig, total_steps: int) -> int:
    """`window`, else max(100, 5% of the run's steps)."""
    if cfg.window is not None:
        return cfg.window
    return max(MIN_WINDOW, round(WINDOW_FRACTION * total_steps))


class LossSpikeMonitor:
    """Feed each step's loss in order to `observe`, which returns a `LossEvent` when one starts."""

    def __init__(self, cfg: LossSpikeConfig, total_steps: int):
        self.cfg = cfg
        self.size = window_size(cfg, total_steps)
        self.losses: collections.deque[float] = collections.deque(maxlen=self.size)
        self.derived_cap: float | None = None  # from the first full window, without loss_cap
        self.streak = 0  # outliers in a row
        self.streak_from: int | None = None  # the step of the streak's first outlier
        self.streak_mean: float | None = None  # the window's mean before that outlier
        self.reported = False  # this streak has been reported as a spike
        self.high = False  # inside a high-loss stretch

    @property
    def loss_cap(self) -> float | None:
        return self.cfg.loss_cap if self.cfg.loss_cap is not None else self.derived_cap

    def observe(self, step: int, loss: float) -> LossEvent | None:
        """Take step `step`'s loss (1-based); a spike or a high-loss stretch that starts here.

        Give only the losses of applied updates: a skipped one (non-finite loss or gradient)
        is the non-finite guard's business and neither enters the window nor breaks a streak.
        """
        if not math.isfinite(loss):
            return None
        event = None
        if len(self.losses) == self.size:
            mean = math.fsum(self.losses) / self.size
            if loss >= self.cfg.outlier_multiplier * mean:
                if self.streak == 0:
                    self.streak_from, self.streak_mean = step, mean
                self.streak += 1
            else:
                self.streak, self.streak_from, self.streak_mean = 0, None, None
                self.reported = False
            # `>=`: a patience lowered on resume still catches a streak already past it
            if self.streak > self.cfg.patience and not self.reported:
                self.reported = True
                event = LossEvent(
                    "loss_spike",
                    step,
                    self.streak_from,
                    loss,
                    self.streak_mean,
                    self.cfg.outlier_multiplier * self.streak_mean,
                    self.streak,
                    self.size,
                    self.cfg.outlier_multiplier,
                )
            elif not self.reported:
                event = self._high_losses(step, loss, mean)
        self.losses.append(loss)
        if self.derived_cap is None and len(self.losses) == self.size:
            self.derived_cap = min(MAX_LOSS_CAP, max(self.losses))
        return event

    def _high_losses(self, step: int, loss: float, mean: float) -> LossEvent | None:
        cap = self.loss_cap
        above = sum(x > cap for x in self.losses)
        high = step >= 2 * self.size and above >= self.size / 2
        started = high and not self.high
        self.high = high
        if not started:
            return None
        return LossEvent(
            "high_loss", step, step, loss, mean, cap, above, self.size, self.cfg.outlier_multiplier
        )

    def state(self) -> dict[str, Any]:
        """JSON-ready; floats round-trip exactly."""
        return {
            "losses": list(self.losses),
            "derived_cap": self.derived_cap,
            "streak": self.streak,
            "streak_from": self.streak_from,
            "streak_mean": self.streak_mean,
            "reported": self.reported,
            "high": self.high,
        }

    def restore(self, state: dict[str, Any] | None, step: int) -> None:
        """Back to a `state()` saved at `step`. A window of another size keeps the newest
        losses. None (a checkpoint from before the monitor) starts an empty window; past step 0
        the run's first window is gone, so the cap is llm-foundry's ceiling, not a later
        window's highest loss (which would sit just above the mean of a late plateau)."""
        if state is None:
            state = {"derived_cap": MAX_LOSS_CAP if step > 0 else None}
        self.losses = collections.deque(state.get("losses", ()), maxlen=self.size)
        self.derived_cap = state.get("derived_cap")
        if self.derived_cap is None and len(self.losses) == self.size:
            self.derived_cap = min(MAX_LOSS_CAP, max(self.losses))
        self.streak = int(state.get("streak", 0))
        self.streak_from = state.get("streak_from")
        self.streak_mean = state.get("streak_mean")
        self.reported = bool(state.get("reported", False))
        self.high = bool(state.get("high", False))
