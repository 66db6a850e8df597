"""Mask losses against plain NumPy references (per ROI, then the mean over positive ROIs)."""

from __future__ import annotations

import numpy as np
import pytest

from imask_jax.models import losses


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _reference_per_image(per_roi, positive):
  out = []
  for values, keep in zip(per_roi, positive):
    out.append(values[keep].mean() if keep.any() else 0.0)
  return np.mean(out)


def _case(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (2, 3, 6, 6)).astype(np.float32)
  targets = np.zeros((2, 3, 6, 6), np.float32)
  targets[..., 2:4, :] = 1.0  # a thin band, as cartilage in its box
  targets[1, 2] = 0.0  # an empty target (a padded slot)
  positive = np.array([[True, True, False], [True, False, False]])
  return logits, targets, positive


def test_mask_bce_is_the_pixel_mean_over_positive_rois():
  logits, targets, positive = _case()
  p = _sigmoid(logits.astype(np.float64))
  bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
  want = _reference_per_image(bce.mean(axis=(-2, -1)), positive)
  np.testing.assert_allclose(float(losses.mask_bce(logits, targets, positive)), want, rtol=1e-5)


def test_mask_dice_matches_the_soft_dice_definition():
  logits, targets, positive = _case(1)
  p = _sigmoid(logits.astype(np.float64))
  per_roi = 1 - (2 * (p * targets).sum((-2, -1)) + 1) / (
    p.sum((-2, -1)) + targets.sum((-2, -1)) + 1
  )
  want = _reference_per_image(per_roi, positive)
  got = float(losses.mask_dice(logits, targets, positive))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # A perfect prediction has (almost) no Dice loss; predicting nothing on a band costs ~1.
  perfect = np.where(targets > 0, 30.0, -30.0).astype(np.float32)
  assert float(losses.mask_dice(perfect, targets, positive)) < 1e-3
  nothing = np.full_like(logits, -30.0)
  assert float(losses.mask_dice(nothing, targets, positive)) == pytest.approx(1 - 1 / 13, 1e-4)
  # No positive ROI anywhere: zero, not NaN.
  assert float(losses.mask_dice(logits, targets, np.zeros_like(positive))) == 0.0
