"""Normalisation layers chosen by name: 'batch', 'frozen_batch' or 'group'.

The backbones never construct a normalisation layer directly; they receive a `NormFactory`
(from `make_norm`) and call it once per layer. That keeps the choice of normalisation, the
train/eval switch, the data-parallel axis and the dtypes in one place.

* 'batch': `flax.linen.BatchNorm`. Batch statistics are reduced over N, H, W in float32 and,
  when `axis_name` is set, averaged over that named axis with `lax.pmean` (so a data-parallel
  step inside `shard_map`/`pmap` normalises with the statistics of the global batch). Running
  averages live in the `batch_stats` collection and are only updated when `train=True` and the
  caller passes `mutable=['batch_stats']`. Momentum 0.9 and epsilon 1e-5 match PyTorch's
  defaults (momentum 0.1 there means the same thing).
* 'frozen_batch': a constant per-channel affine `y = (x - mean) / sqrt(var + eps) * scale + bias`.
  All four arrays live in the `batch_stats` collection, not in `params`, so an optimiser never
  sees them (no gradient, and no weight decay shrinking them), and they never change in
  training. It is only meaningful with loaded (pretrained) values: freshly initialised it is
  the identity.
* 'group': group normalisation with `num_groups` groups (32 by default). When the channel
  count is not a multiple of it, the number of groups becomes `gcd(num_groups, channels)`, so
  tiny test widths (8, 16, 24 channels) still work. No running statistics; `train` is ignored.
  A group must hold more than one value per sample: a one-channel group on a 1x1 map (tiny
  widths on tiny images) normalises to zero and passes no gradient.

All three compute their statistics in float32 whatever the activation dtype, and return the
activation dtype (`dtype`, or the input's dtype when `dtype` is None).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

NORM_KINDS = ('batch', 'frozen_batch', 'group')


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine: a constant per-channel affine map.

  Input: `[..., C]` activations. Output: same shape, in `dtype` (or the input's dtype).
  Variables (all in `batch_stats`, shape `[C]`, float32): `scale`, `bias`, `mean`, `var`.
  """

  epsilon: float = 1e-5
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    scale = self.variable('batch_stats', 'scale', jnp.ones, (channels,), jnp.float32)
    bias = self.variable('batch_stats', 'bias', jnp.zeros, (channels,), jnp.float32)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    # stop_gradient makes the layer frozen even when a caller differentiates with respect to
    # the whole variable tree (batch_stats included).
    multiplier = jax.lax.stop_gradient(scale.value * jax.lax.rsqrt(var.value + self.epsilon))
    offset = jax.lax.stop_gradient(bias.value - mean.value * multiplier)
    y = x.astype(jnp.float32) * multiplier + offset
    return y.astype(self.dtype or x.dtype)


class GroupNorm(nn.Module):
  """Group normalisation over H, W and the channels of each group, per sample.

  Input: `[N, ..., C]`. Output: same shape, in `dtype` (or the input's dtype).
  Uses `gcd(num_groups, C)` groups, so any channel count is accepted.
  Params: `scale` `[C]` (ones, or zeros with `scale_init`), `bias` `[C]` (zeros).
  """

  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim < 2:
      raise ValueError(f'GroupNorm expects [N, ..., C] input, got shape {x.shape}')
    channels = x.shape[-1]
    groups = math.gcd(self.num_groups, channels)
    grouped = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, channels // groups))
    # Reduce over every axis except the batch axis and the group axis.
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    mean = grouped.mean(axes, keepdims=True)
    # Two-pass variance: no cancellation when the mean is large compared with the spread.
    var = jnp.square(grouped - mean).mean(axes, keepdims=True)
    normalised = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    scale = self.param('scale', self.scale_init, (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    y = normalised * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


@dataclasses.dataclass(frozen=True)
class NormFactory:
  """Makes normalisation layers of one kind with shared settings.

  Call it inside a compact module: `norm(name='bn1')(x)`; `zero_scale=True` initialises the
  learnable scale to zero (used on the last norm of each residual branch so that every block
  starts as the identity). `zero_scale` is ignored by 'frozen_batch', whose scale is fixed:
  a zero there would switch the branch off for good.
  """

  kind: str
  train: bool
  axis_name: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  num_groups: int = 32
  momentum: float = 0.9
  epsilon: float = 1e-5

  def __post_init__(self):
    if self.kind not in NORM_KINDS:
      raise ValueError(f'norm kind {self.kind!r} is not one of {NORM_KINDS}')
    if self.num_groups < 1:
      raise ValueError(f'num_groups must be >= 1, got {self.num_groups}')

  def __call__(self, *, name: str | None = None, zero_scale: bool = False) -> nn.Module:
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    if self.kind == 'batch':
      return nn.BatchNorm(
        use_running_average=not self.train,
        axis_name=self.axis_name,
        momentum=self.momentum,
        epsilon=self.epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        scale_init=scale_init,
        # Two-pass variance (E[(x - mean)^2]) avoids cancellation in float32.
        use_fast_variance=False,
        name=name,
      )
    if self.kind == 'frozen_batch':
      return FrozenBatchNorm(epsilon=self.epsilon, dtype=self.dtype, name=name)
    return GroupNorm(
      num_groups=self.num_groups,
      epsilon=self.epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      scale_init=scale_init,
      name=name,
    )


def make_norm(
  kind: str,
  *,
  train: bool,
  axis_name: str | None = None,
  dtype: Dtype | None = None,
  param_dtype: Dtype = jnp.float32,
  num_groups: int = 32,
  momentum: float = 0.9,
  epsilon: float = 1e-5,
) -> NormFactory:
  """Returns a `NormFactory` for `kind` in `NORM_KINDS` (see the module docstring).

  Args:
    kind: 'batch', 'frozen_batch' or 'group'.
    train: batch norm uses (and, with `mutable=['batch_stats']`, updates) batch statistics
      when True and the running averages when False. Ignored by the other kinds.
    axis_name: named axis (data-parallel) over which batch statistics are averaged; None for
      a single device. Only 'batch' uses it.
    dtype: activation dtype of the outputs (None: the input's dtype).
    param_dtype: dtype of learnable scale and bias.
    num_groups: groups of 'group' (reduced to gcd(num_groups, channels)).
    momentum: running-average decay of 'batch' (new = momentum * old + (1 - momentum) * batch).
    epsilon: added to the variance before the square root.
  """
  return NormFactory(
    kind=kind,
    train=train,
    axis_name=axis_name,
    dtype=dtype,
    param_dtype=param_dtype,
    num_groups=num_groups,
    momentum=momentum,
    epsilon=epsilon,
  )


def freeze_batch_norm_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Converts the variables of a 'batch' model into those of the same model with 'frozen_batch'.

  Every batch-norm layer (a `batch_stats` entry with `mean` and `var`) has its `scale` and
  `bias` moved from `params` into `batch_stats`, where `FrozenBatchNorm` reads them; the
  running statistics become the frozen ones. Other collections are passed through. Use it to
  fine-tune with frozen statistics after training (or loading weights) with batch norm.
  """
  if 'params' not in variables or 'batch_stats' not in variables:
    raise ValueError(
      'freeze_batch_norm_variables expects variables with "params" and '
      f'"batch_stats" collections, got {sorted(variables)}'
    )
  params = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables['params']))
  stats = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables['batch_stats']))
  layers = {path[:-1] for path in stats if path[-1] == 'mean'}
  for layer in sorted(layers):
    for name in ('scale', 'bias'):
      if layer + (name,) not in params:
        raise ValueError(
          f'batch-norm layer {"/".join(layer)} has no params {name!r}; '
          'expected a flax BatchNorm with scale and bias'
        )
      stats[layer + (name,)] = params.pop(layer + (name,))
  converted = dict(variables)
  converted['params'] = flax.traverse_util.unflatten_dict(params)
  converted['batch_stats'] = flax.traverse_util.unflatten_dict(stats)
  return converted
