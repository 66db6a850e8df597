"""The iMask head's layers the paper does not name (`reduce`, `skip_projection`, `fuse_convs`)
switch off to the paper's text: trunk, one transposed conv, the 56x56 ROIAlign of P2
concatenated, 1x1 logits.

Checked against what each switch must do, not against a stored output:
* the parameters: with all three off only the trunk, `decoder1` (reading the trunk's D
  channels) and `logits` (reading D + the pyramid's channels) exist;
* linearity in the pyramid: with the projection's ReLU gone the logits are affine in the
  pyramid's values, so out(P) + out(-P) = 2 out(0) (to float32 rounding); with the defaults (a
  ReLU after the skip's ROIAlign) the same identity fails by far more;
* the defaults are untouched: the default head's parameter names are those it always had.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imask_jax.models import heads

IMAGE = 64
DIM = 8  # the trunk's width D
LEVEL_CHANNELS = 6
ROIS = np.array([[12.0, 16.0, 40.0, 44.0], [20.0, 8.0, 52.0, 30.0]], np.float32)
PAPER = dict(reduce=False, skip_projection=False, fuse_convs=0)


def pyramid(scale: float = 1.0):
  rng = np.random.default_rng(2)
  return {
    f'P{k}': jnp.asarray(
      scale * rng.normal(size=(1, IMAGE // 2**k, IMAGE // 2**k, LEVEL_CHANNELS)), jnp.float32
    )
    for k in range(2, 7)
  }


def run(head, levels):
  feats = jnp.asarray(np.random.default_rng(0).normal(size=(len(ROIS), 14, 14, DIM)), jnp.float32)
  index = jnp.zeros(len(ROIS), jnp.int32)
  params = head.init(jax.random.PRNGKey(0), feats, pyramid(), ROIS, index)
  return params['params'], np.asarray(head.apply(params, feats, levels, ROIS, index))


def make_head(**switches):
  return heads.IMaskHead(num_classes=2, dim=DIM, fine_dim=DIM, skip_sampling_ratio=1, **switches)


@pytest.mark.slow
def test_the_papers_head_has_only_the_named_layers():
  params, out = run(make_head(**PAPER), pyramid())
  assert sorted(params) == ['decoder1', 'logits', 'trunk']
  assert params['decoder1']['kernel'].shape[-2:] == (DIM, DIM)  # reads the trunk directly
  assert params['logits']['kernel'].shape == (1, 1, DIM + LEVEL_CHANNELS, 2)
  assert out.shape == (len(ROIS), 56, 56, 2)
  default_params, _ = run(make_head(), pyramid())
  assert sorted(default_params) == ['decoder1', 'fuse1', 'logits', 'reduce', 'skip_proj', 'trunk']


@pytest.mark.slow
def test_without_the_projection_the_logits_are_affine_in_the_skip_features():
  def affine_gap(head):
    _, plus = run(head, pyramid(1.0))
    _, minus = run(head, pyramid(-1.0))
    _, zero = run(head, pyramid(0.0))
    return np.abs(plus + minus - 2 * zero).max(), np.abs(plus - zero).max()

  gap, effect = affine_gap(make_head(**PAPER))
  assert effect > 0.1  # the skip does reach the logits
  assert gap < 1e-4 * effect
  gap, effect = affine_gap(make_head())  # the default's ReLU after the skip
  assert gap > 0.05 * effect
