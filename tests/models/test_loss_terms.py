"""The loss terms of Mask R-CNN against plain NumPy written from their definitions.

Each term is a per-image weighted sum divided by that image's own count (at least 1), then the
mean over the images of the batch (losses.py's contract). The batches below give the images
different counts, one image no counted entry at all, and non-zero values in the entries that
must not count, so a pooled normaliser, a doubled or missing one, or a dropped mask changes the
result by far more than the tolerance.

Tolerance: the references run in float64; the op in float32 (unit roundoff u = 2^-24 = 6e-8).
Every term sums at most 64 values of one sign per image, and exp / log / log1p are accurate to
a few ulp, so the relative error is below 64 u + a few u, about 4e-6: rtol = 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from imask_jax.models import losses

RTOL = 1e-5


def _bce(logits, labels):
  """-(y log p + (1 - y) log(1 - p)), p = sigmoid(logit), in float64 (written out)."""
  x = np.asarray(logits, np.float64)
  p = 1.0 / (1.0 + np.exp(-x))
  return -(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p))


def _per_image_mean(numerators, counts):
  """Each image's sum / max(its count, 1), then the mean over images (loops, no broadcasting)."""
  out = []
  for numerator, count in zip(numerators, counts):
    out.append(float(np.sum(numerator)) / max(float(np.sum(count)), 1.0))
  return float(np.mean(out))


# --- RPN objectness ------------------------------------------------------------------------------


def test_rpn_objectness_is_the_bce_mean_over_each_images_sampled_anchors():
  rng = np.random.default_rng(0)
  b, a = 3, 40
  logits = rng.normal(0, 3, (b, a)).astype(np.float32)
  labels = (rng.random((b, a)) < 0.3).astype(np.float32)
  weight = np.zeros((b, a), np.float32)
  weight[0, :25] = 1.0  # 25 sampled anchors
  weight[1, ::7] = 1.0  # 6 sampled anchors
  # image 2: nothing sampled; its loss is 0 and it still counts as an image in the mean
  want = []
  for i in range(b):
    sampled = [_bce(logits[i, j], labels[i, j]) for j in range(a) if weight[i, j]]
    want.append(np.sum(sampled) / max(len(sampled), 1))
  got = float(losses.rpn_objectness_loss(logits, labels, weight))
  np.testing.assert_allclose(got, np.mean(want), rtol=RTOL)
  assert want[2] == 0.0 and got < 0.9 * np.mean(want[:2])  # the empty image halves nothing


def test_rpn_objectness_hand_worked():
  """logit 0 costs log 2 whatever the label; logit log 3 with label 1 costs log(4/3)."""
  logits = np.array([[0.0, np.log(3.0), 5.0]], np.float32)
  labels = np.array([[1.0, 1.0, 0.0]], np.float32)
  weight = np.array([[1.0, 1.0, 0.0]], np.float32)  # the third anchor is not sampled
  want = (np.log(2.0) + np.log(4.0 / 3.0)) / 2
  np.testing.assert_allclose(
    float(losses.rpn_objectness_loss(logits, labels, weight)), want, rtol=RTOL
  )


# --- box L1 and its normaliser -------------------------------------------------------------------


def test_box_l1_sums_coordinates_of_weighted_rows_over_the_normaliser():
  rng = np.random.default_rng(1)
  b, n = 3, 16
  pred = rng.normal(0, 1, (b, n, 4)).astype(np.float32)
  target = rng.normal(0, 1, (b, n, 4)).astype(np.float32)
  positive = np.zeros((b, n), np.float32)
  sampled = np.zeros((b, n), np.float32)
  positive[0, :3], sampled[0, :12] = 1, 1  # 3 positives among 12 sampled
  positive[1, :1], sampled[1, :16] = 1, 1  # 1 positive among 16
  # image 2: nothing sampled (an image without proposals): 0, not NaN
  want = []
  for i in range(b):
    total = 0.0
    for j in range(n):
      if positive[i, j]:
        total += sum(abs(float(pred[i, j, c]) - float(target[i, j, c])) for c in range(4))
    want.append(total / max(sampled[i].sum(), 1.0))
  got = float(losses.weighted_l1(pred, target, positive, normaliser=sampled))
  np.testing.assert_allclose(got, np.mean(want), rtol=RTOL)
  # Normalised by the sampled count (Detectron2), not by the positives: 12 and 16, not 3 and 1.
  by_positives = _per_image_mean(
    [positive[i][:, None] * np.abs(pred[i] - target[i].astype(np.float64)) for i in range(b)],
    positive,
  )
  assert abs(got - by_positives) > 0.5 * by_positives


def test_box_l1_hand_worked():
  """One positive row off by (1, -2, 0.5, 0) among 4 sampled rows: 3.5 / 4."""
  pred = np.zeros((1, 5, 4), np.float32)
  target = np.zeros((1, 5, 4), np.float32)
  target[0, 0] = (-1.0, 2.0, -0.5, 0.0)
  target[0, 1:] = 9.0  # rows of weight 0: never count
  weight = np.array([[1, 0, 0, 0, 0]], np.float32)
  normaliser = np.array([[1, 1, 1, 1, 0]], np.float32)  # 4 sampled
  got = float(losses.weighted_l1(pred, target, weight, normaliser=normaliser))
  assert got == pytest.approx(3.5 / 4, rel=RTOL)


# --- classification cross-entropy ----------------------------------------------------------------


def test_classification_ce_is_the_mean_over_valid_rois_of_minus_log_softmax():
  rng = np.random.default_rng(2)
  b, n, k1 = 3, 12, 5
  logits = rng.normal(0, 2, (b, n, k1)).astype(np.float32)
  labels = rng.integers(0, k1, (b, n)).astype(np.int32)
  valid = np.zeros((b, n), bool)
  valid[0, :9] = True
  valid[1, 4:6] = True
  # image 2 has no valid ROI; its padded rows still carry labels and logits
  want = []
  for i in range(b):
    terms = []
    for j in range(n):
      if valid[i, j]:
        z = logits[i, j].astype(np.float64)
        terms.append(-(z[labels[i, j]] - np.log(np.sum(np.exp(z)))))
    want.append(np.sum(terms) / max(len(terms), 1))
  got = float(losses.softmax_cross_entropy(logits, labels, valid))
  np.testing.assert_allclose(got, np.mean(want), rtol=RTOL)


def test_classification_ce_hand_worked():
  """Uniform logits over 4 classes cost log 4; logits (log 3, 0) with label 0 cost log(4/3)."""
  logits = np.zeros((1, 3, 4), np.float32)
  logits[0, 1, 0] = np.log(3.0)  # softmax (3/6, 1/6, 1/6, 1/6)
  logits[0, 2] = (50.0, -50.0, -50.0, -50.0)  # an invalid row with label 3: would cost 100
  labels = np.array([[2, 0, 3]], np.int32)
  valid = np.array([[True, True, False]])
  want = (np.log(4.0) + np.log(2.0)) / 2
  np.testing.assert_allclose(
    float(losses.softmax_cross_entropy(logits, labels, valid)), want, rtol=RTOL
  )


# --- take_class ----------------------------------------------------------------------------------


def test_take_class_picks_each_rois_own_class_of_boxes_and_masks():
  rng = np.random.default_rng(3)
  b, n, k, m = 2, 5, 3, 4
  deltas = rng.normal(size=(b, n, k, 4)).astype(np.float32)
  masks = rng.normal(size=(b, n, m, m, k)).astype(np.float32)
  classes = np.array([[1, 2, 3, 0, 2], [3, 3, 1, 0, 1]], np.int32)
  got_deltas = np.asarray(losses.take_class(deltas, classes))
  got_masks = np.asarray(losses.take_class(masks, classes))
  assert got_deltas.shape == (b, n, 4) and got_masks.shape == (b, n, m, m)
  for i in range(b):
    for j in range(n):
      own = max(classes[i, j], 1) - 1  # class c (1..K) is slot c - 1; background reads class 1
      np.testing.assert_array_equal(got_deltas[i, j], deltas[i, j, own])
      np.testing.assert_array_equal(got_masks[i, j], masks[i, j, :, :, own])


# --- boundary band and the boundary-weighted mask BCE --------------------------------------------


def _band(target):
  """1 where the 3x3 neighbourhood (cut at the border) holds both mask and background."""
  m = target.shape[-1]
  band = np.zeros_like(target)
  for r in range(m):
    for c in range(m):
      window = target[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2]
      band[r, c] = float(window.max() > window.min())
  return band


def test_boundary_band_marks_the_pixels_next_to_the_other_side():
  target = np.zeros((6, 6), np.float32)
  target[1:4, 1:5] = 1.0
  want = np.array(
    [
      [1, 1, 1, 1, 1, 1],
      [1, 1, 1, 1, 1, 1],
      [1, 1, 0, 0, 1, 1],
      [1, 1, 1, 1, 1, 1],
      [1, 1, 1, 1, 1, 1],
      [0, 0, 0, 0, 0, 0],
    ],
    np.float32,
  )
  np.testing.assert_array_equal(np.asarray(losses.boundary_band(target[None, None]))[0, 0], want)
  np.testing.assert_array_equal(_band(target), want)
  # A mask touching the border: the border does not count as background.
  full = np.ones((4, 4), np.float32)
  assert not np.asarray(losses.boundary_band(full[None])).any()


@pytest.mark.parametrize('boundary_weight', [0.0, 2.0])
def test_mask_bce_with_boundary_weight_matches_the_weighted_pixel_mean(boundary_weight):
  rng = np.random.default_rng(4)
  b, p, m = 2, 3, 8
  logits = rng.normal(0, 2, (b, p, m, m)).astype(np.float32)
  targets = np.zeros((b, p, m, m), np.float32)
  targets[0, 0, 2:6, 1:7] = 1
  targets[0, 1, 3:5, :] = 1
  targets[1, 0, :, :4] = 1
  targets[1, 1] = rng.random((m, m)) < 0.5
  positive = np.array([[True, True, False], [True, False, False]])
  want = []
  for i in range(b):
    per_roi = []
    for j in range(p):
      if positive[i, j]:
        w = 1.0 + boundary_weight * _band(targets[i, j])
        per_roi.append(np.sum(w * _bce(logits[i, j], targets[i, j])) / np.sum(w))
    want.append(np.mean(per_roi))
  got = float(losses.mask_bce(logits, targets, positive, boundary_weight=boundary_weight))
  np.testing.assert_allclose(got, np.mean(want), rtol=RTOL)


def test_boundary_weight_hand_worked():
  """A 5x5 ROI whose columns 0-2 are mask: the band is columns 2-3 (their 3x3 windows hold
  both); columns 0-1 and 4 are not (the image border is not background). Logit 0 costs log 2
  per pixel whatever the weights; column 4 predicted right (logit -4) costs log(1 + e^-4)."""
  targets = np.zeros((1, 1, 5, 5), np.float32)
  targets[0, 0, :, :3] = 1.0
  band = np.asarray(losses.boundary_band(targets))[0, 0]
  np.testing.assert_array_equal(band, np.tile([0, 0, 1, 1, 0], (5, 1)))
  logits = np.zeros((1, 1, 5, 5), np.float32)
  positive = np.ones((1, 1), bool)
  assert float(losses.mask_bce(logits, targets, positive, boundary_weight=3.0)) == pytest.approx(
    np.log(2.0), rel=RTOL
  )
  logits[0, 0, :, 4] = -4.0
  # weights 1 + 3 = 4 on the 10 band pixels, 1 on the 15 others
  want = (10 * 4 * np.log(2) + 10 * np.log(2) + 5 * np.log1p(np.exp(-4.0))) / (10 * 4 + 15)
  assert float(losses.mask_bce(logits, targets, positive, boundary_weight=3.0)) == pytest.approx(
    want, rel=RTOL
  )
