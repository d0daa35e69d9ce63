"""The training guard: tells the loop when a run has gone wrong and which checkpoint predates it.

A step goes wrong when its loss or gradient norm is not finite (unless `skip_nonfinite_steps`, and then when
`max_skipped_steps` steps in a row are skipped), or, once `divergence_warmup_steps` healthy steps are seen, when it
diverges: its gradient norm (or, for the pretraining losses, its loss) exceeds `divergence_factor` times the median of
the recent healthy steps, or its gradient norm is exactly 0 after non-zero ones while its loss is not (a dead model:
saturated or overflowed activations give no gradient).

Step s's loss is computed on the params that the checkpoint of step s - 1 holds, so when step b is the first bad one
the checkpoint of step b - 1 is already diverged: the last good checkpoint is the newest one at step b - 2 or before.
"""

from __future__ import annotations

import collections
import math
from typing import Optional

import numpy as np

from jaxopd.training.config import ObjectiveConfig

WINDOW = 100  # healthy steps the running medians cover


class Guard:
    def __init__(self, config: ObjectiveConfig):
        self._config = config
        self._losses: collections.deque = collections.deque(maxlen=WINDOW)
        self._grad_norms: collections.deque = collections.deque(maxlen=WINDOW)
        self._skipped_in_a_row = 0

    def check(self, step: int, loss: float, grad_norm: float) -> Optional[tuple[str, int]]:
        """None while the run is healthy; else (what went wrong, the first bad step)."""
        config = self._config
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if not config.skip_nonfinite_steps:
                return f"loss is {loss} (grad norm {grad_norm}) at step {step}", step
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row >= config.max_skipped_steps:
                first = step - self._skipped_in_a_row + 1
                return (f"{self._skipped_in_a_row} steps in a row ({first} to {step}) had a non-finite loss or grad "
                        f"norm and were skipped (max_skipped_steps={config.max_skipped_steps}); the run is not "
                        "recovering"), first
            return None
        self._skipped_in_a_row = 0
        problem = self._divergence(step, loss, grad_norm)
        if problem is not None:
            return problem, step
        self._losses.append(loss)
        self._grad_norms.append(grad_norm)
        return None

    def _divergence(self, step: int, loss: float, grad_norm: float) -> Optional[str]:
        factor = self._config.divergence_factor
        if factor <= 0:
            return None
        # A loss of exactly 0 with it is no dead model: a policy-gradient step whose advantages are all 0 (GRPO when
        # every group's samples score alike, as all wrong at a hard start) has neither loss nor gradient.
        if grad_norm == 0 and loss != 0 and any(self._grad_norms):
            return f"the grad norm is exactly 0 at step {step} after non-zero ones (the model no longer learns)"
        if len(self._grad_norms) < self._config.divergence_warmup_steps:
            return None
        median_grad_norm = float(np.median(self._grad_norms))
        if median_grad_norm > 0 and grad_norm > factor * median_grad_norm:
            return (f"the grad norm {grad_norm:.4g} at step {step} is over {factor:g} times its running median "
                    f"{median_grad_norm:.4g} (divergence_factor)")
        median_loss = float(np.median(self._losses))
        if not self._config.is_distillation and median_loss > 0 and loss > factor * median_loss:
            return (f"the loss {loss:.4g} at step {step} is over {factor:g} times its running median "
                    f"{median_loss:.4g} (divergence_factor)")
        return None


def last_good_checkpoint(saved_steps: list[int], first_bad_step: int) -> Optional[int]:
    """The newest of `saved_steps` whose params predate the first bad step (see the module docstring)."""
    good = [step for step in saved_steps if step <= first_bad_step - 2]
    return max(good) if good else None
