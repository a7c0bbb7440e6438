"""
Training schedules shared by base_train, mid_train and chat_sft: the learning-rate multiplier and
Muon's momentum ramp. Pure functions of the step, so a resumed run gets the same values.

- LR multiplier (applied to every param group's `initial_lr`): linear warmup over
  warmup_ratio·T steps, then 1.0, then a linear warmdown over the last warmdown_ratio·T steps to
  `final_lr_frac` at step T. base_train uses warmup 0, warmdown 0.2, final 0; mid_train the same;
  chat_sft's "linear to zero" is warmdown_ratio=1.
- Muon momentum: (1 − f)·0.85 + f·0.95 with f = min(step/300, 1). A lower momentum early lets the
  fast-moving first updates average over fewer steps (from the modded-nanogpt speedruns).
"""

from __future__ import annotations


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """The LR multiplier at `step` of a `num_iterations`-step run."""
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, ramp_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum at `step`: linear from `start` to `end` over `ramp_steps`, then constant."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end
