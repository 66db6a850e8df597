"""Optimiser and learning-rate schedule from the `train` config (optax)."""

from __future__ import annotations

from typing import Any

import jax
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
    main = optax.piecewise_constant_schedule(lr, {int(rest * 2 / 3): 0.1, int(rest * 8 / 9): 0.1})
  elif train.schedule == 'constant':
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(
      f"train.schedule must be 'cosine', 'step' or 'constant', got {train.schedule!r}"
    )
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(lr * 0.01, lr, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
  """True for the weights weight decay applies to: kernels (ndim > 1), not biases or the
  scales and offsets of normalisation layers."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train: Any) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then Adam(W) or SGD with momentum; weight decay (if
  any) on kernels only (`decay_mask`)."""
  schedule = learning_rate_schedule(train)
  lr, clip, wd = float(train.learning_rate), float(train.grad_clip_norm), float(train.weight_decay)
  if not lr > 0 or clip < 0 or wd < 0:
    raise ValueError(
      f'config train.learning_rate={lr}, train.grad_clip_norm={clip}, '
      f'train.weight_decay={wd}; expected learning_rate > 0 and the others >= 0'
    )
  parts = []
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  if train.optimizer == 'adam':
    parts.append(
      optax.adamw(schedule, weight_decay=wd, mask=decay_mask) if wd > 0 else optax.adam(schedule)
    )
  elif train.optimizer == 'sgd':
    if not 0 <= float(train.momentum) < 1:
      raise ValueError(f'config train.momentum={train.momentum}; expected 0 <= momentum < 1')
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=float(train.momentum)))
  else:
    raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {train.optimizer!r}")
  return optax.chain(*parts)
