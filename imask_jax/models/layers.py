"""Layers shared by the backbones and heads.

`Conv` is Flax's `nn.Conv` (same parameters, values and gradients) whose kernel gradient is
computed as a matrix product (`ops.conv`): XLA:CPU's own rule for it took most of a training
step. Every convolution of the model is built with it, and every 2x upsampling transposed
convolution with `UpConv2x2` for the same reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imask_jax.ops import conv as conv_ops

Array = jax.Array

Conv = functools.partial(nn.Conv, conv_general_dilated=conv_ops.conv_general_dilated)


class UpConv2x2(nn.Module):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2))` as one matrix product and a pixel
  shuffle: at stride 2 the 2x2 taps do not overlap, so each input pixel's channels map to its
  2x2 output block by a [C, 2 * 2 * O] matrix. The same parameters (kernel [2, 2, C, O], bias
  [O]) and values as Flax's; its gradients are plain matrix products, where XLA:CPU's
  transposed-convolution kernel gradient is slow (see `ops.conv`; the measured speed-up is in
  benchmarks/README.md, "Convolution gradients"), so unlike `Conv` it has no width rule.

  Call: `[N, H, W, C]` -> `[N, 2H, 2W, O]`.
  """

  features: int
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Array] = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
      'kernel', self.kernel_init, (2, 2, x.shape[-1], self.features), self.param_dtype
    )
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    n, h, w, _ = x.shape
    # Flax's transposed convolution applies the kernel flipped in both spatial axes.
    y = jnp.einsum('nhwc,abco->nhawbo', x, kernel[::-1, ::-1])
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias
