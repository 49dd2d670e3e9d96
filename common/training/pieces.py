"""What a training piece may do around one DP-SGD step, and the order it happens in.

One step of `client/dp_training.py` is:

  1. `before_forward(step)`   every piece (a rank schedule sets its rank mask here: data-independent);
  2. forward, backward        Opacus records per-sample gradients (of the run's `loss`: a mean of
                              per-example terms, `losses.py`);
  3. privatize                Opacus' `DPOptimizer.pre_step`: per-sample clipping, sum, Gaussian noise,
                              division by the expected batch size; `p.grad` is now the private gradient;
  4. `before_update()`        every piece, on the private gradient (DyLoRA zeroes its masked ranks; LoRA-Pro
                              corrects each LoRA pair's gradients, last);
  5. the update rule's step   (`update_rules.py`: Adam, SGD, GaLore, FRUGAL) on the private gradient;
  6. `after_update()`         every piece (SoRA's proximal step, DyLoRA restoring its masked ranks).

Steps 4 to 6 read only the private gradient, the parameters and data-independent state, so they are
post-processing of DP-SGD's output and cost no privacy (`tests/test_training_pieces.py` checks the update
equals the rule applied to the hand-computed clipped and noised gradient). Without DP, step 3 is skipped.
"""

from __future__ import annotations

from typing import Sequence

import torch


class StepPiece:
    """Hooks of one piece around each optimizer step; each does nothing unless overridden."""

    def before_forward(self, step: int) -> None:
        """Before the forward of step `step` (0-based within the round); nothing data-dependent."""

    def before_update(self) -> None:
        """`p.grad` holds the privatized (clipped, noised, averaged) gradient."""

    def after_update(self) -> None:
        """After the update rule moved the parameters."""

    def close(self) -> None:
        """After the last step: leave the model as a plain adapter again (masks off, scales restored)."""


def privatize_then_update(optimizer: torch.optim.Optimizer, pieces: Sequence[StepPiece] = ()) -> None:
    """Steps 3 to 6 above. With Opacus' `DPOptimizer` this is exactly its `step()` (pre_step, then the
    wrapped optimizer's step) with the pieces' hooks between the privatization and the update."""
    if hasattr(optimizer, "pre_step") and hasattr(optimizer, "original_optimizer"):
        if not optimizer.pre_step():
            return  # Opacus skips the update (virtual steps; fedlora never asks for them)
        optimizer = optimizer.original_optimizer
    for piece in pieces:
        piece.before_update()
    optimizer.step()
    for piece in pieces:
        piece.after_update()
