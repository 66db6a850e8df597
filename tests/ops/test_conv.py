"""ops.conv: values and gradients equal lax.conv_general_dilated's, on the fast path and off it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from imask_jax.ops import conv as conv_ops

NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(autouse=True)
def every_width_on_the_product_path(monkeypatch):
  """The shapes here are narrow; the product path is what is under test."""
  monkeypatch.setattr(conv_ops, 'MIN_CHANNEL_PRODUCT', 0)


def both(x, w, **kwargs):
  """(ours, lax's) value and gradients of sum(conv * cotangent) w.r.t. input and kernel."""
  results = []
  for fn in (conv_ops.conv_general_dilated, lax.conv_general_dilated):
    out = fn(x, w, **kwargs)
    cot = jax.random.normal(jax.random.PRNGKey(9), out.shape, out.dtype)
    grads = jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w, **kwargs) * cot), argnums=(0, 1))(x, w)
    results.append((out, *grads))
  return results


def takes_fast_path(x, w, **kwargs) -> bool:
  """Whether ours runs its own gradient rule (a custom_vjp) rather than handing over to lax."""
  jaxpr = jax.make_jaxpr(lambda x, w: conv_ops.conv_general_dilated(x, w, **kwargs))(x, w)
  return 'custom_vjp_call' in str(jaxpr)


@pytest.mark.parametrize(
  'shape, kernel, strides, padding',
  [
    ((2, 9, 11, 5), (3, 3, 5, 7), (1, 1), 'SAME'),
    ((2, 9, 11, 5), (3, 3, 5, 7), (2, 2), 'SAME'),  # odd sizes: uneven SAME padding
    ((1, 16, 16, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),  # a ResNet stem
    ((2, 8, 6, 6), (1, 1, 6, 5), (2, 2), 'VALID'),  # a strided 1x1 shortcut
    ((2, 7, 7, 4), (3, 2, 4, 3), (1, 2), ((0, 2), (1, 0))),  # asymmetric everything
  ],
)
def test_fast_path_matches_lax_in_value_and_gradients(shape, kernel, strides, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), kernel)
  kwargs = dict(window_strides=strides, padding=padding, dimension_numbers=NHWC)
  assert takes_fast_path(x, w, **kwargs)
  ours, theirs = both(x, w, **kwargs)
  for a, b, name in zip(ours, theirs, ('value', 'input grad', 'kernel grad')):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_kernel_gradient_is_the_sum_over_output_pixels_of_window_times_gradient():
  """kernel_gradient against the definition, written as NumPy loops (uneven strides and
  asymmetric padding)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 9, 3)).astype(np.float32)
  strides, pads = (2, 1), ((1, 2), (0, 1))
  kh, kw, out = 3, 2, 4
  padded = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (padded.shape[1] - kh) // strides[0] + 1
  wo = (padded.shape[2] - kw) // strides[1] + 1
  grad = rng.normal(size=(2, ho, wo, out)).astype(np.float32)
  want = np.zeros((kh, kw, 3, out))
  for i in range(kh):
    for j in range(kw):
      for y in range(ho):
        for xx in range(wo):
          pixel = padded[:, y * strides[0] + i, xx * strides[1] + j, :]  # [N, C]
          want[i, j] += pixel.T.astype(np.float64) @ grad[:, y, xx, :]
  got = conv_ops.kernel_gradient(jnp.asarray(x), jnp.asarray(grad), (kh, kw, 3, out), strides, pads)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(rhs_dilation=(2, 2)),
    dict(feature_group_count=2),
    dict(dimension_numbers=None),  # lax's default NCHW / OIHW layout
  ],
)
def test_other_convolutions_are_lax_unchanged(kwargs):
  kwargs = {'dimension_numbers': NHWC, **kwargs}
  layout_nchw = kwargs['dimension_numbers'] is None
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 9, 9) if layout_nchw else (2, 9, 9, 4))
  groups = kwargs.get('feature_group_count', 1)
  w_shape = (6, 4, 3, 3) if layout_nchw else (3, 3, 4 // groups, 6)
  w = jax.random.normal(jax.random.PRNGKey(1), w_shape)
  assert not takes_fast_path(x, w, window_strides=(1, 1), padding='SAME', **kwargs)
  ours, theirs = both(x, w, window_strides=(1, 1), padding='SAME', **kwargs)
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)


def test_flax_conv_with_it_keeps_parameters_and_gradients():
  """nn.Conv(conv_general_dilated=ours): same parameter tree, values and gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 12, 3))
  plain = nn.Conv(8, (3, 3), strides=(2, 2), padding='SAME')
  fast = nn.Conv(
    8, (3, 3), strides=(2, 2), padding='SAME', conv_general_dilated=conv_ops.conv_general_dilated
  )
  params = plain.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(fast.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
  loss = lambda module: lambda p: jnp.sum(jnp.sin(module.apply(p, x)))
  np.testing.assert_allclose(fast.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-5)
  got, want = jax.grad(loss(fast))(params), jax.grad(loss(plain))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_narrow_convolutions_keep_lax_rule():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 16))
  kwargs = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=NHWC)
  conv_ops.MIN_CHANNEL_PRODUCT = 64 * 128  # the module's own value (restored by the fixture)
  assert not takes_fast_path(x, jnp.ones((3, 3, 16, 32)), **kwargs)
  assert takes_fast_path(jnp.ones((1, 6, 6, 64)), jnp.ones((3, 3, 64, 128)), **kwargs)
  # A 1 x 1 kernel's patches are the input itself: it always takes the product.
  assert takes_fast_path(x, jnp.ones((1, 1, 16, 4)), **kwargs)
