"""Optimiser and learning-rate schedule from the `train` config (optax)."""

from __future__ import annotations

from typing import Any

import optax


def learning_rate_schedule(train: Any) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine, step (x0.1 at 2/3 and 8/9) or constant."""
  lr = float(train.learning_rate)
  steps = int(train.steps)
  warmup = min(int(train.warmup_steps), max(steps - 1, 0))
  if train.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), alpha=0.01)
  elif train.schedule == 'step':
    rest = max(steps - warmup, 1)
    main = optax.piecewise_constant_schedule(
        lr, {int(rest * 2 / 3): 0.1, int(rest * 8 / 9): 0.1})
  elif train.schedule == 'constant':
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"train.schedule must be 'cosine', 'step' or 'constant', got "
                     f"{train.schedule!r}")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(lr * 0.01, lr, warmup), main], [warmup])


def make_optimizer(train: Any) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then Adam(W) or SGD with momentum."""
  schedule = learning_rate_schedule(train)
  parts = []
  if float(train.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(train.grad_clip_norm)))
  wd = float(train.weight_decay)
  if train.optimizer == 'adam':
    parts.append(optax.adamw(schedule, weight_decay=wd) if wd > 0 else optax.adam(schedule))
  elif train.optimizer == 'sgd':
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd))
    parts.append(optax.sgd(schedule, momentum=float(train.momentum)))
  else:
    raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {train.optimizer!r}")
  return optax.chain(*parts)
