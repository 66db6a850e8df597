"""Feature pyramid network (Lin et al. 2017) over C2-C5, giving P2-P6 as in Mask R-CNN.

* A 1x1 lateral conv brings each Ck to `features` channels.
* Top-down: starting from C5's lateral, each coarser map is upsampled x2 by nearest
  neighbour and added to the next finer lateral.
* A 3x3 output conv on each sum gives P2-P5.
* P6 is P5 subsampled with stride 2 (a 1x1 max pool with stride 2, as in Mask R-CNN): it only
  serves the RPN's largest anchors.

Bodies give Ck with spatial size ceil(H / stride), so a level is either exactly twice its
coarser neighbour or one pixel less; the upsampled map is cropped at the high end to the finer
lateral's size, which is what nearest-neighbour resizing to that size gives. Any input size is
accepted; a multiple of 32 keeps every level exactly H / stride.

Convs have biases (no norm follows) and Kaiming-uniform init with a = 1
(U(-sqrt(3 / fan_in), sqrt(3 / fan_in))), the usual FPN choice; biases start at zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imask_jax.models import layers

Array = jax.Array
Dtype = Any

C_LEVELS = ('C2', 'C3', 'C4', 'C5')
P_LEVELS = ('P2', 'P3', 'P4', 'P5', 'P6')
PYRAMID_STRIDES = {'P2': 4, 'P3': 8, 'P4': 16, 'P5': 32, 'P6': 64}

KAIMING_UNIFORM_A1 = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def pyramid_strides() -> dict[str, int]:
  """Stride in input pixels of each pyramid level: {'P2': 4, ..., 'P6': 64}."""
  return dict(PYRAMID_STRIDES)


def upsample_nearest_to(x: Array, height: int, width: int) -> Array:
  """Nearest-neighbour x2 upsampling of [N, h, w, C] cropped to [N, height, width, C].

  Requires h == ceil(height / 2) and w == ceil(width / 2) (the bodies' size rule).
  """
  h, w = x.shape[1], x.shape[2]
  if h != -(-height // 2) or w != -(-width // 2):
    raise ValueError(
      f'FPN top-down: coarser map {h}x{w} is not the ceil-half of the finer map '
      f'{height}x{width}; expected {-(-height // 2)}x{-(-width // 2)}'
    )
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, :height, :width, :]


class FPN(nn.Module):
  """FPN: {'C2'..'C5'} -> {'P2'..'P6'}.

  Input levels Ck are [N, ceil(H / s), ceil(W / s), c_k] for strides s = 4, 8, 16, 32 (any
  channel counts); outputs Pk are [N, ceil(H / s), ceil(W / s), features] for s = 4 ... 64.

  Attributes:
    features: channels of every output level (256 in Mask R-CNN).
    dtype: activation/compute dtype; param_dtype: parameter dtype.
  """

  features: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, levels: Mapping[str, Array]) -> dict[str, Array]:
    missing = [name for name in C_LEVELS if name not in levels]
    if missing:
      raise ValueError(
        f'FPN needs inputs {C_LEVELS}; missing {missing} (got keys {sorted(levels)})'
      )
    if self.features < 1:
      raise ValueError(f'FPN features must be >= 1, got {self.features}')
    kw = dict(
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=KAIMING_UNIFORM_A1,
      bias_init=nn.initializers.zeros,
    )

    outputs = {}
    top_down = None
    for c_name in reversed(C_LEVELS):
      level = c_name[1]
      lateral = layers.Conv(self.features, (1, 1), name=f'lateral{level}', **kw)(levels[c_name])
      if top_down is not None:
        lateral = lateral + upsample_nearest_to(top_down, lateral.shape[1], lateral.shape[2])
      top_down = lateral
      outputs[f'P{level}'] = layers.Conv(
        self.features, (3, 3), padding=((1, 1), (1, 1)), name=f'output{level}', **kw
      )(lateral)
    # Max pool with a 1x1 window and stride 2 is plain subsampling.
    outputs['P6'] = outputs['P5'][:, ::2, ::2, :]
    return {name: outputs[name] for name in P_LEVELS}
