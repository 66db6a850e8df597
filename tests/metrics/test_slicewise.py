"""Per-slice 2D metrics against a plainly written loop over slices that calls SimpleITK (Dice,
average Hausdorff) and medpy (Hausdorff, the same border definition as ours) on each slice,
plus hand-worked aggregates and the empty-slice rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from imask_jax.metrics.overlap import CaseStatus
from imask_jax.metrics.slicewise import SLICE_VALUES, slice_metrics, slice_metrics_per_label


def blob(rng: np.random.Generator, shape: tuple[int, ...], smooth: float = 2.0) -> np.ndarray:
  mask = ndimage.gaussian_filter(rng.random(shape), smooth) > 0.5
  mask[tuple(s // 2 for s in shape)] = True
  return mask


def sitk_image(mask: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
  image = sitk.GetImageFromArray(mask.astype(np.uint8))  # SimpleITK axes are reversed
  image.SetSpacing(spacing[::-1])
  return image


def reference_loop(
  pred: np.ndarray, truth: np.ndarray, axis: int, spacing: tuple[float, float, float]
) -> list[tuple]:
  """(slice, status, Dice, HD px, HD mm, average HD px, average HD mm) for every slice where
  either mask has the structure, one library call per slice."""
  pixel_spacing = tuple(s for i, s in enumerate(spacing) if i != axis)
  rows = []
  for k in range(pred.shape[axis]):
    p, t = np.take(pred, k, axis=axis), np.take(truth, k, axis=axis)
    if not p.any() and not t.any():
      continue
    if not (p.any() and t.any()):
      status = CaseStatus.MISSED if t.any() else CaseStatus.FALSE_POSITIVE
      rows.append((k, status, 0.0, math.inf, math.inf, math.inf, math.inf))
      continue
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(sitk_image(t, pixel_spacing), sitk_image(p, pixel_spacing))
    averages = []
    for unit in ((1.0, 1.0), pixel_spacing):
      hausdorff = sitk.HausdorffDistanceImageFilter()
      hausdorff.Execute(sitk_image(p, unit), sitk_image(t, unit))
      averages.append(hausdorff.GetAverageHausdorffDistance())
    rows.append(
      (
        k,
        CaseStatus.OK,
        overlap.GetDiceCoefficient(),
        medpy_binary.hd(p, t),
        medpy_binary.hd(p, t, pixel_spacing),
        averages[0],
        averages[1],
      )
    )
  return rows


@pytest.mark.parametrize(
  'axis, spacing',
  [
    (0, (0.7, 0.365, 0.365)),  # sagittal-like: square pixels in the slice plane
    (1, (0.91, 3.0, 0.91)),  # coronal-like STIHO voxels
    (2, (0.5, 0.8, 1.3)),  # pixels not square: separate pixel transforms
  ],
)
def test_matches_a_loop_over_slices_with_simpleitk_and_medpy(axis, spacing):
  rng = np.random.default_rng(11 + axis)
  shape = (16, 18, 14)
  truth = blob(rng, shape)
  pred = blob(rng, shape)
  # Empty the prediction's first slices and the truth's last: one-sided slices at both ends.
  np.moveaxis(pred, axis, 0)[:3] = False
  np.moveaxis(truth, axis, 0)[-2:] = False
  result = slice_metrics(pred, truth, axis, spacing)
  rows = reference_loop(pred, truth, axis, spacing)
  assert result.axis == axis
  assert result.pixel_spacing == tuple(s for i, s in enumerate(spacing) if i != axis)
  np.testing.assert_array_equal(result.index, [r[0] for r in rows])
  assert result.status == tuple(r[1] for r in rows)
  assert result.n_missed_slices >= 1 and result.n_false_positive_slices >= 1
  for column, name in enumerate(SLICE_VALUES, start=2):
    # Libraries sum and take square roots in another order: equal to rounding.
    np.testing.assert_allclose(
      getattr(result, name), [r[column] for r in rows], rtol=1e-12, err_msg=name
    )
  # Aggregates as the module docstring states them, recomputed from the loop's rows.
  assert result.aggregate('dice') == pytest.approx(np.mean([r[2] for r in rows]), rel=1e-12)
  two_sided = [r for r in rows if r[1] is CaseStatus.OK]
  for column, name in enumerate(SLICE_VALUES[1:], start=3):
    assert result.aggregate(name) == pytest.approx(
      np.mean([r[column] for r in two_sided]), rel=1e-12
    )
  assert result.volume_status is CaseStatus.OK


def test_hand_worked_aggregate_of_four_slices():
  # Slice 0: the same 2 x 2 square in both: Dice 1, distances 0. Slice 1: truth 2 x 2, pred
  # its top row: Dice 2*2/(2+4) = 2/3; the truth's bottom row is one row (0.5 mm) from the
  # pred, so HD = 1 px = 0.5 mm; average = (0 + (2 * 0 + 2 * 0.5) / 4) / 2 = 0.125 mm.
  # Slice 2: prediction only (false positive): Dice 0, +inf. Slice 3: empty in both: skipped.
  pred = np.zeros((4, 5, 5), bool)
  truth = np.zeros_like(pred)
  truth[0, 1:3, 1:3] = pred[0, 1:3, 1:3] = True
  truth[1, 1:3, 1:3] = True
  pred[1, 1, 1:3] = True
  pred[2, 0, 0] = True
  result = slice_metrics(pred, truth, 0, (3.0, 0.5, 0.5))
  np.testing.assert_array_equal(result.index, [0, 1, 2])
  assert result.status == (CaseStatus.OK, CaseStatus.OK, CaseStatus.FALSE_POSITIVE)
  np.testing.assert_allclose(result.dice, [1.0, 2 / 3, 0.0])
  np.testing.assert_allclose(result.hausdorff_mm, [0.0, 0.5, math.inf])
  np.testing.assert_allclose(result.average_hausdorff_mm, [0.0, 0.125, math.inf])
  np.testing.assert_allclose(result.average_hausdorff_px, [0.0, 0.25, math.inf])
  assert result.aggregate('dice') == pytest.approx((1 + 2 / 3 + 0) / 3)
  assert result.aggregate('hausdorff_px') == pytest.approx(0.5)  # mean of 0 and 1
  assert result.aggregate('average_hausdorff_mm') == pytest.approx(0.0625)
  assert (result.n_slices, result.n_missed_slices, result.n_false_positive_slices) == (3, 0, 1)
  summary = result.summary('hausdorff_mm')
  assert summary.mean == math.inf and summary.mean_finite == pytest.approx(0.25)
  assert (summary.n, summary.n_finite, summary.n_false_positive) == (3, 2, 1)


def test_a_structure_never_in_both_masks_in_one_slice_is_infinite_and_absent_is_nan():
  truth = np.zeros((3, 6, 6), bool)
  pred = np.zeros_like(truth)
  truth[0, 2:4, 2:4] = True
  pred[1, 2:4, 2:4] = True
  result = slice_metrics(pred, truth, 0, (1.0, 1.0, 1.0))
  assert result.volume_status is CaseStatus.OK  # overlapping in 3D, never within a slice
  assert result.aggregate('dice') == 0.0
  assert all(result.aggregate(name) == math.inf for name in SLICE_VALUES[1:])
  missed = slice_metrics(np.zeros_like(truth), truth, 2, (1.0, 1.0, 1.0))
  assert missed.volume_status is CaseStatus.MISSED and missed.n_missed_slices == 2
  assert missed.aggregate('hausdorff_mm') == math.inf and missed.aggregate('dice') == 0.0
  empty = slice_metrics(np.zeros_like(truth), np.zeros_like(truth), 1, (1.0, 1.0, 1.0))
  assert empty.volume_status is CaseStatus.BOTH_EMPTY and empty.n_slices == 0
  assert all(math.isnan(empty.aggregate(name)) for name in SLICE_VALUES)


def test_per_label_equals_each_label_mask_and_bad_input_is_named():
  rng = np.random.default_rng(3)
  pred = (blob(rng, (10, 12, 9)) * 1 + blob(rng, (10, 12, 9)) * 1).astype(np.uint8)
  truth = (blob(rng, (10, 12, 9)) * 2).astype(np.uint8)
  spacing = (1.0, 0.5, 0.5)
  per_label = slice_metrics_per_label(pred, truth, 1, spacing, labels=(1, 2))
  for label in (1, 2):
    alone = slice_metrics(pred == label, truth == label, 1, spacing)
    for name in SLICE_VALUES:
      np.testing.assert_array_equal(getattr(per_label[label], name), getattr(alone, name))
  with pytest.raises(ValueError, match=r'slice_metrics: axis=3; expected the slice axis'):
    slice_metrics(pred == 1, truth == 2, 3, spacing)
  with pytest.raises(ValueError, match=r'slice_metrics: masks have shape \(12, 9\)'):
    slice_metrics(pred[0] == 1, truth[0] == 2, 0, (1.0, 1.0))
  with pytest.raises(ValueError, match='unknown value'):
    slice_metrics(pred == 1, truth == 2, 0, spacing).aggregate('assd_mm')
