"""Mask targets and mask pasting against NumPy loops and analytic shapes."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imask_jax.ops import masks as mask_ops


# ------------------------------------------------------------------------ NumPy references
def reference_sample(mask, y, x):
  """Bilinear sample of a 2-D mask with detectron2's ROIAlign border rules."""
  height, width = mask.shape
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return 0.0
  y = min(max(y, 0.0), height - 1.0)
  x = min(max(x, 0.0), width - 1.0)
  y0, x0 = min(int(y), height - 1), min(int(x), width - 1)
  y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
  ly, lx = y - y0, x - x0
  return (
    (1 - ly) * (1 - lx) * mask[y0, x0]
    + (1 - ly) * lx * mask[y0, x1]
    + ly * (1 - lx) * mask[y1, x0]
    + ly * lx * mask[y1, x1]
  )


def reference_crop_and_resize(mask, box, m, cap=4):
  """Soft crop of `mask` into `box` on an m x m grid (aligned, adaptive samples per bin)."""
  y1, x1, y2, x2 = (float(v) - 0.5 for v in box)
  bin_h, bin_w = (y2 - y1) / m, (x2 - x1) / m
  grid_h = min(max(math.ceil(bin_h), 0), cap)
  grid_w = min(max(math.ceil(bin_w), 0), cap)
  out = np.zeros((m, m))
  for i in range(m):
    for j in range(m):
      total = 0.0
      for a in range(grid_h):
        for b in range(grid_w):
          total += reference_sample(
            mask, y1 + (i + (a + 0.5) / grid_h) * bin_h, x1 + (j + (b + 0.5) / grid_w) * bin_w
          )
      out[i, j] = total / max(grid_h * grid_w, 1)
  return out


def reference_paste(prob, box, height, width):
  """Interpolated value per image pixel (NaN outside the half-open box); mask coordinates
  are clamped to the outermost cell centres."""
  m_h, m_w = prob.shape
  y1, x1, y2, x2 = (float(v) for v in box)
  out = np.full((height, width), np.nan)
  for r in range(height):
    cy = r + 0.5
    if not y1 <= cy < y2:
      continue
    u = min(max((cy - y1) / (y2 - y1) * m_h - 0.5, 0.0), m_h - 1.0)
    for c in range(width):
      cx = c + 0.5
      if not x1 <= cx < x2:
        continue
      v = min(max((cx - x1) / (x2 - x1) * m_w - 0.5, 0.0), m_w - 1.0)
      value = 0.0
      for k in (math.floor(u), math.floor(u) + 1):
        for j in (math.floor(v), math.floor(v) + 1):
          if k < m_h and j < m_w:  # the second tap of the last cell has weight 0
            value += (1 - abs(u - k)) * (1 - abs(v - j)) * prob[k, j]
      out[r, c] = value
  return out


# ---------------------------------------------------------------------------- mask_targets
def _random_gt_masks(rng, count, height, width):
  masks = np.zeros((count, height, width), bool)
  for g in range(count):
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(3, height / 2), rng.uniform(3, width / 2)
    yy, xx = np.mgrid[:height, :width]
    masks[g] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
  return masks


_TARGETS = jax.jit(mask_ops.mask_targets, static_argnums=3)


def test_mask_targets_match_numpy_crop_and_resize():
  rng = np.random.default_rng(0)
  gt = _random_gt_masks(rng, 3, 40, 48)
  matched = rng.integers(0, 3, 12)
  y1, x1 = rng.uniform(-4, 36, 12), rng.uniform(-4, 44, 12)
  rois = np.stack([y1, x1, y1 + rng.uniform(2, 30, 12), x1 + rng.uniform(2, 30, 12)], 1)
  rois = rois.astype(np.float32)
  got = np.asarray(_TARGETS(gt, matched, rois, 7))
  assert got.shape == (12, 7, 7) and got.dtype == np.float32
  for s in range(12):
    soft = reference_crop_and_resize(gt[matched[s]].astype(float), rois[s], 7)
    decided = np.abs(soft - 0.5) > 1e-4  # values at 0.5 +- rounding may go either way
    np.testing.assert_array_equal(
      got[s][decided], (soft >= 0.5)[decided].astype(np.float32), err_msg=f'roi {s}'
    )


def test_roi_on_a_rectangle_gives_all_ones():
  gt = np.zeros((2, 32, 32), np.uint8)
  gt[1, 5:21, 8:30] = 1  # pixel centres 5.5..20.5 and 8.5..29.5: the box [5, 21) x [8, 30)
  rois = np.array([[5, 8, 21, 30], [0, 0, 32, 32]], np.float32)
  got = np.asarray(_TARGETS(gt, np.array([1, 0]), rois, 28))
  assert np.all(got[0] == 1.0) and np.all(got[1] == 0.0)


# ----------------------------------------------------------------------------- paste_masks
_PASTE = jax.jit(mask_ops.paste_masks, static_argnums=(2, 3))


def test_paste_matches_numpy_loop():
  rng = np.random.default_rng(1)
  probs = rng.uniform(size=(5, 6, 6)).astype(np.float32)
  y1, x1 = rng.uniform(-6, 20, 5), rng.uniform(-6, 24, 5)
  boxes = np.stack([y1, x1, y1 + rng.uniform(1, 20, 5), x1 + rng.uniform(1, 20, 5)], 1)
  boxes[0] = [3, 3, 3, 9]  # empty box pastes nothing
  boxes = boxes.astype(np.float32)
  for threshold in (0.5, 0.3):
    got = np.asarray(_PASTE(probs, boxes, (24, 28), threshold))
    assert got.shape == (5, 24, 28) and got.dtype == bool
    for d in range(5):
      value = reference_paste(probs[d], boxes[d], 24, 28)
      want = np.where(np.isnan(value), False, np.nan_to_num(value) >= threshold)
      decided = np.isnan(value) | (np.abs(np.nan_to_num(value) - threshold) > 1e-5)
      np.testing.assert_array_equal(got[d][decided], want[decided], err_msg=f'det {d}')
  assert not got[0].any()
  values = np.asarray(jax.jit(mask_ops.paste_mask_probs, static_argnums=2)(probs, boxes, (24, 28)))
  for d in range(5):
    want = np.nan_to_num(reference_paste(probs[d], boxes[d], 24, 28))  # 0 outside the box
    np.testing.assert_allclose(values[d], want, atol=1e-6, err_msg=f'det {d}')


@settings(max_examples=25, deadline=None)
@given(
  y1=st.floats(-5.0, 30.0),
  x1=st.floats(-5.0, 30.0),
  h=st.floats(0.2, 30.0),
  w=st.floats(0.2, 30.0),
  m=st.sampled_from([4, 28]),
)
def test_full_mask_pastes_to_its_box(y1, x1, h, w, m):
  box = np.array([[y1, x1, y1 + h, x1 + w]], np.float32)
  got = np.asarray(_PASTE(np.ones((1, m, m), np.float32), box, (32, 36), 0.5))[0]
  b = box[0].astype(np.float64)
  centres_y, centres_x = np.arange(32) + 0.5, np.arange(36) + 0.5
  inside = ((centres_y >= b[0]) & (centres_y < b[2]))[:, None] & (
    (centres_x >= b[1]) & (centres_x < b[3])
  )[None, :]
  np.testing.assert_array_equal(got, inside)


def test_paste_under_vmap():
  rng = np.random.default_rng(2)
  probs = rng.uniform(size=(2, 3, 5, 5)).astype(np.float32)
  boxes = np.tile(np.array([[2.0, 3.0, 14.0, 11.0]], np.float32), (2, 3, 1))
  boxes[1] += 2.5
  got = jax.jit(jax.vmap(lambda p, b: mask_ops.paste_masks(p, b, (16, 16))))(probs, boxes)
  for i in range(2):
    np.testing.assert_array_equal(got[i], _PASTE(probs[i], boxes[i], (16, 16), 0.5))


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r'masks\.py: mask_targets: gt_masks must be'):
    mask_ops.mask_targets(np.zeros((4, 4)), np.zeros(2, int), np.zeros((2, 4)), 7)
  with pytest.raises(ValueError, match=r'masks\.py: mask_targets: matched_gt must be'):
    mask_ops.mask_targets(np.zeros((1, 4, 4)), np.zeros(3, int), np.zeros((2, 4)), 7)
  with pytest.raises(ValueError, match=r'masks\.py: paste_mask_probs: boxes must be'):
    mask_ops.paste_masks(np.zeros((2, 4, 4)), np.zeros((3, 4)), (8, 8))
  with pytest.raises(ValueError, match=r'masks\.py: paste_mask_probs: image_size'):
    mask_ops.paste_masks(np.zeros((2, 4, 4)), np.zeros((2, 4)), (8, 0))
  with pytest.raises(ValueError, match=r'masks\.py: paste_masks: threshold must be > 0'):
    mask_ops.paste_masks(np.zeros((2, 4, 4)), np.zeros((2, 4)), (8, 8), 0.0)
