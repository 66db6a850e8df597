"""Overlap metrics, empty-mask rules and summaries, against analytic shapes, plain NumPy
counting, medpy and SimpleITK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from medpy.metric import binary as medpy_binary

from imask_jax.metrics.overlap import (
  CaseStatus,
  overlap_metrics,
  overlap_per_label,
  summarize,
  summarize_values,
)
from imask_jax.metrics.surface import surface_metrics


def ball(
  shape: tuple[int, ...], spacing: tuple[float, ...], center_mm: tuple[float, ...], radius_mm: float
) -> np.ndarray:
  """Voxels whose centre (index * spacing) lies within the ball."""
  grid = np.indices(shape, dtype=float)
  squared = sum((grid[i] * spacing[i] - center_mm[i]) ** 2 for i in range(len(shape)))
  return squared <= radius_mm**2


def lens_volume(r1: float, r2: float, d: float) -> float:
  """Volume of the intersection of balls of radii r1, r2 whose centres are d apart."""
  return (
    math.pi
    * (r1 + r2 - d) ** 2
    * (d * d + 2 * d * r2 - 3 * r2 * r2 + 2 * d * r1 + 6 * r2 * r1 - 3 * r1 * r1)
    / (12 * d)
  )


def test_dice_of_offset_balls_matches_the_analytic_lens():
  spacing = (0.6, 0.8, 1.0)
  shape = (54, 40, 32)
  r1, r2 = 9.0, 7.0
  c1 = (16.1, 15.8, 16.05)
  c2 = (c1[0] + 3.0, c1[1] + 4.0, c1[2])  # 5 mm apart
  a, b = ball(shape, spacing, c1, r1), ball(shape, spacing, c2, r2)
  intersection = lens_volume(r1, r2, 5.0)
  volumes = 4 / 3 * math.pi * (r1**3 + r2**3)
  expected_dice = 2 * intersection / volumes
  expected_jaccard = intersection / (volumes - intersection)
  metrics = overlap_metrics(a, b)
  # Voxel counts of balls 7-9 mm across with voxels <= 1 mm miss the continuous volumes by
  # well under 1%; the measured Dice error here is 0.001.
  assert metrics.dice == pytest.approx(expected_dice, abs=0.005)
  assert metrics.jaccard == pytest.approx(expected_jaccard, abs=0.005)
  assert metrics.status is CaseStatus.OK


def _plain_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
  tp = fp = fn = 0
  for p, t in zip(pred.ravel().tolist(), truth.ravel().tolist()):
    tp += p and t
    fp += p and not t
    fn += t and not p
  return tp, fp, fn


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fraction=st.floats(0.05, 0.6))
def test_overlap_matches_plain_counting_and_medpy(seed, fraction):
  rng = np.random.default_rng(seed)
  pred = rng.random((9, 8, 7)) < fraction
  truth = rng.random((9, 8, 7)) < fraction
  pred[0, 0, 0] = truth[0, 0, 0] = True  # both non-empty
  tp, fp, fn = _plain_counts(pred, truth)
  metrics = overlap_metrics(pred.astype(np.uint8), truth)
  assert (metrics.true_positive, metrics.false_positive, metrics.false_negative) == (tp, fp, fn)
  assert metrics.dice == pytest.approx(2 * tp / (2 * tp + fp + fn))
  assert metrics.jaccard == pytest.approx(tp / (tp + fp + fn))
  assert metrics.precision == pytest.approx(tp / (tp + fp))
  assert metrics.recall == pytest.approx(tp / (tp + fn))
  assert metrics.dice == pytest.approx(medpy_binary.dc(pred, truth))
  assert metrics.jaccard == pytest.approx(medpy_binary.jc(pred, truth))
  assert metrics.precision == pytest.approx(medpy_binary.precision(pred, truth))
  assert metrics.recall == pytest.approx(medpy_binary.recall(pred, truth))


def test_dice_and_jaccard_match_simpleitk_label_overlap():
  rng = np.random.default_rng(3)
  pred = rng.random((12, 10, 8)) < 0.4
  truth = rng.random((12, 10, 8)) < 0.5
  measures = sitk.LabelOverlapMeasuresImageFilter()
  measures.Execute(
    sitk.GetImageFromArray(pred.astype(np.uint8)), sitk.GetImageFromArray(truth.astype(np.uint8))
  )
  metrics = overlap_metrics(pred, truth)
  assert metrics.dice == pytest.approx(measures.GetDiceCoefficient())
  assert metrics.jaccard == pytest.approx(measures.GetJaccardCoefficient())


def test_overlap_per_label_equals_overlap_of_each_label_mask():
  rng = np.random.default_rng(1)
  pred = rng.integers(0, 5, size=(10, 9, 6))
  truth = rng.integers(0, 5, size=(10, 9, 6))
  per_label = overlap_per_label(pred, truth, labels=(1, 2, 3, 4))
  for label in (1, 2, 3, 4):
    tp, fp, fn = _plain_counts(pred == label, truth == label)
    assert per_label[label].dice == pytest.approx(2 * tp / (2 * tp + fp + fn))
  assert set(overlap_per_label(pred, truth)) == {1, 2, 3, 4}  # OAI-ZIB labels by default


# ----------------------------------------------------------------------------- empty masks


def test_both_empty_is_nan_with_its_own_status():
  empty = np.zeros((5, 5, 5), bool)
  metrics = overlap_metrics(empty, empty)
  assert metrics.status is CaseStatus.BOTH_EMPTY
  assert all(
    math.isnan(v) for v in (metrics.dice, metrics.jaccard, metrics.precision, metrics.recall)
  )


def test_empty_prediction_is_missed_with_zero_overlap():
  truth = np.zeros((5, 5, 5), bool)
  truth[2, 2, 1:4] = True
  metrics = overlap_metrics(np.zeros_like(truth), truth)
  assert metrics.status is CaseStatus.MISSED
  assert (metrics.dice, metrics.jaccard, metrics.precision, metrics.recall) == (0, 0, 0, 0)
  assert metrics.false_negative == 3


def test_empty_truth_is_a_false_positive_with_zero_overlap():
  pred = np.zeros((5, 5, 5), bool)
  pred[1, 1, 1] = True
  metrics = overlap_metrics(pred, np.zeros_like(pred))
  assert metrics.status is CaseStatus.FALSE_POSITIVE
  assert (metrics.dice, metrics.jaccard, metrics.precision, metrics.recall) == (0, 0, 0, 0)
  assert metrics.false_positive == 1


# ----------------------------------------------------------------------------- summaries


def test_summary_counts_missed_and_never_improves_the_mean():
  truth = np.zeros((8, 8, 8), bool)
  truth[2:6, 2:6, 2:6] = True
  good = truth.copy()
  good[2, 2, 2] = False
  empty = np.zeros_like(truth)
  cases = [(good, truth), (good, truth), (empty, truth), (good, empty), (empty, empty)]
  overlap = [overlap_metrics(p, t) for p, t in cases]
  dice = summarize(overlap, 'dice')
  detected_dice = overlap[0].dice
  # Missed and false positive enter as 0; the both-empty case is left out and counted.
  assert dice.n == 4 and dice.n_both_empty == 1
  assert dice.n_missed == 1 and dice.n_false_positive == 1
  assert dice.mean == pytest.approx(np.mean([detected_dice, detected_dice, 0, 0]))
  assert dice.mean < detected_dice
  assert dice.sd == pytest.approx(np.std([detected_dice, detected_dice, 0, 0], ddof=1))

  surface = [surface_metrics(p, t, (1.0, 1.0, 2.0)) for p, t in cases]
  hd = summarize(surface, 'hausdorff_mm')
  assert math.isinf(hd.mean)  # a missed structure makes the mean worse, never better
  assert hd.n_finite == 2 and hd.mean_finite == pytest.approx(surface[0].hausdorff_mm)
  assert (hd.n_missed, hd.n_false_positive, hd.n_both_empty) == (1, 1, 1)
  assert '1 missed, 1 false positive' in str(hd)


def test_summary_of_plain_values():
  summary = summarize_values([0.9, 0.8, 0.7], ['ok', 'ok', 'ok'])
  assert summary.mean == pytest.approx(0.8)
  assert summary.sd == pytest.approx(0.1)
  assert str(summary) == '0.8 ± 0.1 (n=3)'
  with pytest.raises(ValueError, match='one status per value'):
    summarize_values([1.0], [])


# ----------------------------------------------------------------------------- bad input


def test_a_label_map_passed_as_a_mask_is_named_in_the_error():
  labels = np.array([[0, 1], [2, 3]])
  with pytest.raises(ValueError, match=r'overlap_metrics: pred holds values in \[0, 3\]'):
    overlap_metrics(labels, labels > 0)
  with pytest.raises(ValueError, match=r'shape \(2, 2\) differs from truth shape \(2, 3\)'):
    overlap_metrics(labels > 0, np.zeros((2, 3), bool))
  with pytest.raises(ValueError, match='0 is background'):
    overlap_per_label(labels, labels, labels=(0, 1))
