"""models.layers: the fast layers equal Flax's in parameters, values and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imask_jax.models import layers


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_up_conv_2x2_is_flax_conv_transpose(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 7, 6))
  init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  theirs = nn.ConvTranspose(4, (2, 2), strides=(2, 2), kernel_init=init, dtype=dtype)
  ours = layers.UpConv2x2(4, kernel_init=init, dtype=dtype)
  params = theirs.init(jax.random.PRNGKey(1), x)
  mine = ours.init(jax.random.PRNGKey(1), x)
  # Same parameter names, shapes and initial values (the checkpoints stay interchangeable).
  assert jax.tree.structure(mine) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  got, want = ours.apply(params, x), theirs.apply(params, x)
  assert got.shape == want.shape == (3, 10, 14, 4) and got.dtype == want.dtype
  np.testing.assert_allclose(
    np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
  )
  cot = jax.random.normal(jax.random.PRNGKey(2), want.shape)

  def grads(module):
    loss = lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * cot)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(theirs))):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=10 * tol
    )
