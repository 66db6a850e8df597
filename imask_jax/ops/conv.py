"""2D convolution with a weight gradient that XLA:CPU computes fast.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature (so that Flax's `nn.Conv`
takes it as its `conv_general_dilated`) and the same values and gradients. What differs is how
the kernel's gradient is computed for the common case (NHWC input, HWIO kernel, no dilation, one
group): XLA:CPU lowers jax's own rule, a convolution whose "kernel" is the output gradient
over the whole image, to a slow path that takes several times the forward's time; here it is
one matrix product per kernel tap, of that tap's window of the input with the output
gradient. The forward and the input's gradient are XLA's own convolutions, which run
at full speed. benchmarks/README.md ("Convolution gradients") has the measurements. Any other
case, and narrow convolutions wider than 1 x 1 (`prefers_product`), are passed to lax
unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

NHWC = ('NHWC', 'HWIO', 'NHWC')
# Narrow convolutions with a kernel wider than 1 x 1 (in x out channels below this) keep lax's
# rule, which is the faster one for them: a 3x3 conv of 32 -> 16 channels took twice lax's
# time on the product path. A 1 x 1 conv always takes the product, whose one window is the input
# itself (no copy). benchmarks/README.md, "Convolution gradients".
MIN_CHANNEL_PRODUCT = 64 * 128


def prefers_product(kernel_shape: Sequence[int]) -> bool:
  """Whether the kernel gradient of an HWIO kernel of this shape is taken as a matrix
  product (else lax's rule)."""
  kh, kw, in_channels, out_channels = kernel_shape
  return (kh, kw) == (1, 1) or in_channels * out_channels >= MIN_CHANNEL_PRODUCT


def conv_general_dilated(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> Array:
  """`lax.conv_general_dilated`, with the fast kernel gradient where it applies (module doc)."""
  plain = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  if not (
    lhs.ndim == rhs.ndim == 4
    and undilated
    and feature_group_count == batch_group_count == 1
    and _is_nhwc(dimension_numbers, lhs.shape, rhs.shape)
    and prefers_product(rhs.shape)
  ):
    return plain(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _conv_nhwc(lhs, rhs, strides, pads, precision, preferred_element_type)


def _is_nhwc(
  dimension_numbers: Any, lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...]
) -> bool:
  if dimension_numbers is None:  # lax's default is NCHW / OIHW
    return False
  wanted = lax.conv_dimension_numbers(lhs_shape, rhs_shape, NHWC)
  given = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  return given == wanted


def _forward(
  lhs: Array, rhs: Array, strides: tuple[int, int], pads: Pads, precision: Any, out_type: Any
) -> Array:
  return lax.conv_general_dilated(
    lhs,
    rhs,
    strides,
    pads,
    dimension_numbers=NHWC,
    precision=precision,
    preferred_element_type=out_type,
  )


_conv_nhwc = jax.custom_vjp(_forward, nondiff_argnums=(2, 3, 4, 5))


def _conv_nhwc_fwd(lhs, rhs, strides, pads, precision, out_type):
  return _forward(lhs, rhs, strides, pads, precision, out_type), (lhs, rhs)


def _conv_nhwc_bwd(strides, pads, precision, out_type, residuals, grad):
  lhs, rhs = residuals
  # The input's gradient: XLA's transposed convolution (as fast as the forward).
  _, input_vjp = jax.vjp(lambda x: _forward(x, rhs, strides, pads, precision, out_type), lhs)
  (input_grad,) = input_vjp(grad)
  return input_grad, kernel_gradient(lhs, grad, rhs.shape, strides, pads).astype(rhs.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def kernel_gradient(
  inputs: Array,
  grad: Array,
  kernel_shape: tuple[int, int, int, int],
  strides: tuple[int, int],
  pads: Pads,
) -> Array:
  """d(sum(conv(inputs, w) * grad)) / dw of an NHWC / HWIO convolution.

  dw[i, j, c, o] = sum over n, y, x of padded[n, y * sy + i, x * sx + j, c] * grad[n, y, x, o]:
  for each kernel tap (i, j) a strided window of the padded input, contracted with the output
  gradient over all output pixels, one tap after the other.

  Args:
    inputs: [N, H, W, C]; grad: [N, Ho, Wo, O] (the convolution's output shape);
    kernel_shape: (kh, kw, C, O); strides: (sy, sx); pads: ((top, bottom), (left, right)).
  Returns:
    float32 [kh, kw, C, O].
  """
  kh, kw, c, o = kernel_shape
  n, ho, wo, _ = grad.shape
  sy, sx = strides
  padded = lax.pad(
    inputs, jnp.zeros((), inputs.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0))
  )
  flat_grad = grad.reshape(n * ho * wo, o)
  span = ((ho - 1) * sy + 1, (wo - 1) * sx + 1)

  def tap(carry: None, index: Array) -> tuple[None, Array]:  # one tap's [C, O]
    window = lax.dynamic_slice(padded, (0, index // kw, index % kw, 0), (n, *span, c))
    window = window[:, ::sy, ::sx, :]  # [N, Ho, Wo, C]
    product = lax.dot_general(
      window.reshape(n * ho * wo, c),
      flat_grad,
      (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
    )
    return carry, product

  # A scan, not a Python loop: it makes the taps run one after the other, so one window copy
  # is alive at a time. Unrolled, XLA:CPU kept many alive and ran slower (benchmarks/README.md
  # has both measurements).
  _, taps = lax.scan(tap, None, jnp.arange(kh * kw))
  return taps.reshape(kh, kw, c, o)
