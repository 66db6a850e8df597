"""Surface distances against analytic spheres, a brute-force NumPy reference, medpy and
SimpleITK, ITK's average Hausdorff distance against SimpleITK and shifted boxes, plus the
empty-mask rules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from imask_jax.metrics.overlap import CaseStatus
from imask_jax.metrics.surface import (
  average_hausdorff,
  directed_surface_distances,
  hausdorff_voxels,
  surface_metrics,
  surface_metrics_per_label,
  surface_voxels,
)


def ball(
  shape: tuple[int, ...], spacing: tuple[float, ...], center_mm: tuple[float, ...], radius_mm: float
) -> np.ndarray:
  grid = np.indices(shape, dtype=float)
  squared = sum((grid[i] * spacing[i] - center_mm[i]) ** 2 for i in range(len(shape)))
  return squared <= radius_mm**2


def blob(rng: np.random.Generator, shape: tuple[int, ...], smooth: float = 2.0) -> np.ndarray:
  """A random smooth blob (possibly several pieces, possibly touching the array's edge)."""
  mask = ndimage.gaussian_filter(rng.random(shape), smooth) > 0.5
  mask[tuple(s // 2 for s in shape)] = True
  return mask


# ----------------------------------------------------------------------------- reference


def plain_border(mask: np.ndarray) -> np.ndarray:
  """Border voxels written out: in the mask, with a face neighbour outside it or the array."""
  border = np.zeros_like(mask)
  for index in zip(*np.nonzero(mask)):
    for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
      neighbour = list(index)
      neighbour[axis] += step
      if not 0 <= neighbour[axis] < mask.shape[axis] or not mask[tuple(neighbour)]:
        border[index] = True
        break
  return border


def plain_directed(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
  """For each border voxel of a (C order), min over border voxels of b of the mm distance,
  from all pairwise distances (fine for a test's small masks)."""
  pa = np.argwhere(plain_border(a)) * np.asarray(spacing)
  pb = np.argwhere(plain_border(b)) * np.asarray(spacing)
  return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


# ----------------------------------------------------------------------------- analytic


@pytest.mark.parametrize('spacing', [(0.6, 0.8, 1.0), (1.0, 0.5, 0.7)])
def test_concentric_spheres_are_r2_minus_r1_apart(spacing):
  shape = tuple(int(32 / s) for s in spacing)
  center = (16.13, 15.79, 16.07)
  r1, r2 = 6.0, 9.0
  inner, outer = ball(shape, spacing, center, r1), ball(shape, spacing, center, r2)
  over = surface_metrics(outer, inner, spacing)  # prediction = the larger sphere
  # Tolerances: border voxel centres of a digitised sphere of radius r lie in (r - s, r] with
  # s the largest spacing (a border voxel has a face neighbour outside the sphere), so each
  # surface-to-surface distance lies within about s of r2 - r1; averaging (ASSD) leaves a
  # fraction of that (measured -0.15 to -0.18 mm here), the max (HD) up to s (measured 0.6).
  s = max(spacing)
  assert over.hausdorff_mm == pytest.approx(r2 - r1, abs=s)
  assert over.hd95_mm == pytest.approx(r2 - r1, abs=s / 2)
  assert over.assd_mm == pytest.approx(r2 - r1, abs=s / 3)
  # Prediction outside the truth everywhere: signed mean = +ASSD, and -ASSD when swapped.
  assert over.signed_mean_mm == pytest.approx(over.assd_mm)
  under = surface_metrics(inner, outer, spacing)
  assert under.signed_mean_mm == pytest.approx(-under.assd_mm)
  assert under.hausdorff_mm == pytest.approx(over.hausdorff_mm)  # symmetric in the masks
  assert under.assd_mm == pytest.approx(over.assd_mm)


def test_one_voxel_dilation_is_one_spacing_everywhere():
  spacing = (0.5, 0.7, 1.2)
  truth = np.zeros((12, 12, 12), bool)
  truth[3:8, 4:9, 2:7] = True
  structure = ndimage.generate_binary_structure(3, 1)
  pred = ndimage.binary_dilation(truth, structure)
  metrics = surface_metrics(pred, truth, spacing)
  # Each border voxel of a dilated box is one face step from the other surface, except at
  # edges and corners, where the nearest partner is a diagonal away.
  assert metrics.signed_mean_mm > 0
  assert min(spacing) <= metrics.assd_mm <= math.hypot(*spacing)


# ----------------------------------------------------------------------------- references


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_matches_a_brute_force_reference_in_anisotropic_spacing(seed):
  rng = np.random.default_rng(seed)
  spacing = (0.5, 0.9, 1.7)
  pred, truth = blob(rng, (14, 12, 10)), blob(rng, (14, 12, 10))
  pred_to_truth = plain_directed(pred, truth, spacing)
  truth_to_pred = plain_directed(truth, pred, spacing)
  np.testing.assert_allclose(directed_surface_distances(pred, truth, spacing), pred_to_truth)
  np.testing.assert_allclose(directed_surface_distances(truth, pred, spacing), truth_to_pred)
  metrics = surface_metrics(pred, truth, spacing)
  pooled = np.concatenate([pred_to_truth, truth_to_pred])
  assert metrics.hausdorff_mm == pytest.approx(pooled.max())
  assert metrics.hd95_mm == pytest.approx(
    max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95))
  )
  assert metrics.assd_mm == pytest.approx(pooled.mean())
  pred_border_in_truth = truth[plain_border(pred)]
  truth_border_in_pred = pred[plain_border(truth)]
  signed = np.concatenate(
    [
      np.where(pred_border_in_truth, -pred_to_truth, pred_to_truth),
      np.where(truth_border_in_pred, truth_to_pred, -truth_to_pred),
    ]
  )
  assert metrics.signed_mean_mm == pytest.approx(signed.mean())
  assert metrics.signed_sd_mm == pytest.approx(signed.std())
  np.testing.assert_array_equal(surface_voxels(pred), plain_border(pred))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_agrees_with_medpy_where_the_definitions_match(seed):
  # medpy 0.5.2 uses the same surface (erosion with connectivity 1, outside = background) and
  # the same pooled ASSD; its hd95 is the percentile of the pooled directed distances, ours
  # the max of the two directed percentiles (docs/metrics.md).
  rng = np.random.default_rng(seed)
  spacing = (0.365, 0.365, 0.7)
  pred, truth = blob(rng, (40, 36, 20), 3.0), blob(rng, (40, 36, 20), 3.0)
  metrics = surface_metrics(pred, truth, spacing, voxel_hausdorff=True)
  assert metrics.hausdorff_mm == pytest.approx(medpy_binary.hd(pred, truth, spacing))
  assert metrics.assd_mm == pytest.approx(medpy_binary.assd(pred, truth, spacing))
  pred_to_truth = directed_surface_distances(pred, truth, spacing)
  truth_to_pred = directed_surface_distances(truth, pred, spacing)
  assert pred_to_truth.mean() == pytest.approx(medpy_binary.asd(pred, truth, spacing))
  assert truth_to_pred.mean() == pytest.approx(medpy_binary.asd(truth, pred, spacing))
  assert np.percentile(np.concatenate([pred_to_truth, truth_to_pred]), 95) == pytest.approx(
    medpy_binary.hd95(pred, truth, spacing)
  )
  assert metrics.hausdorff_voxels == pytest.approx(medpy_binary.hd(pred, truth))


def test_hausdorff_agrees_with_simpleitk_on_offset_balls():
  # SimpleITK measures from every voxel of one object to the nearest voxel of the other, not
  # surface to surface; for two offset balls both definitions find the same farthest point.
  spacing = (0.6, 0.8, 1.1)
  pred = ball((50, 40, 30), spacing, (14, 15, 16), 8)
  truth = ball((50, 40, 30), spacing, (17, 17, 15), 6)

  def image(mask: np.ndarray) -> sitk.Image:
    result = sitk.GetImageFromArray(mask.astype(np.uint8))  # SimpleITK axes are reversed
    result.SetSpacing(spacing[::-1])
    return result

  hausdorff = sitk.HausdorffDistanceImageFilter()
  hausdorff.Execute(image(pred), image(truth))
  assert surface_metrics(pred, truth, spacing).hausdorff_mm == pytest.approx(
    hausdorff.GetHausdorffDistance()
  )


def sitk_image(mask: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
  image = sitk.GetImageFromArray(mask.astype(np.uint8))  # SimpleITK axes are reversed
  image.SetSpacing(spacing[::-1])
  return image


def sitk_average_hausdorff(
  pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]
) -> float:
  hausdorff = sitk.HausdorffDistanceImageFilter()
  hausdorff.Execute(sitk_image(pred, spacing), sitk_image(truth, spacing))
  return hausdorff.GetAverageHausdorffDistance()


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_average_hausdorff_equals_simpleitk_on_random_blobs(seed):
  rng = np.random.default_rng(seed)
  for shape, spacing in [((18, 16, 12), (0.5, 0.9, 1.7)), ((30, 26), (0.4, 1.3))]:
    pred, truth = blob(rng, shape), blob(rng, shape)
    unit = (1.0,) * len(shape)
    metrics = surface_metrics(pred, truth, spacing, voxel_hausdorff=True)
    # SimpleITK sums float distances in another order: equal to rounding.
    assert metrics.average_hausdorff_mm == pytest.approx(
      sitk_average_hausdorff(pred, truth, spacing), rel=1e-12
    )
    assert metrics.average_hausdorff_voxels == pytest.approx(
      sitk_average_hausdorff(pred, truth, unit), rel=1e-12
    )
    assert average_hausdorff(pred, truth, spacing) == metrics.average_hausdorff_mm
    assert average_hausdorff(pred, truth, unit) == metrics.average_hausdorff_voxels


def test_average_hausdorff_equals_simpleitk_where_one_mask_holds_the_other():
  spacing = (0.6, 0.8, 1.1)
  outer = ball((40, 32, 26), spacing, (12, 13, 14), 9)
  inner = ball((40, 32, 26), spacing, (12.4, 12.7, 14.2), 5)
  for pred, truth in [(outer, inner), (inner, outer)]:
    assert average_hausdorff(pred, truth, spacing) == pytest.approx(
      sitk_average_hausdorff(pred, truth, spacing), rel=1e-12
    )


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_average_hausdorff_of_a_box_and_its_shifted_copy(axis):
  # A box n voxels long along `axis`, and the same box shifted by k voxels along it: the k
  # layers of each box outside the other lie 1..k spacings from it, the rest at 0, so each
  # directed mean is s * (1 + ... + k) / n = s k (k + 1) / (2 n), and so is their average.
  spacing = (0.4, 0.7, 1.5)
  n, k = 6, 2
  truth = np.zeros((14, 14, 14), bool)
  box = [slice(3, 8)] * 3
  box[axis] = slice(3, 3 + n)
  truth[tuple(box)] = True
  pred = np.roll(truth, k, axis=axis)
  expected = spacing[axis] * k * (k + 1) / (2 * n)
  metrics = surface_metrics(pred, truth, spacing, voxel_hausdorff=True)
  assert metrics.average_hausdorff_mm == pytest.approx(expected, rel=1e-12)
  assert metrics.average_hausdorff_voxels == pytest.approx(k * (k + 1) / (2 * n), rel=1e-12)
  assert average_hausdorff(truth, truth, spacing) == 0.0


def test_average_hausdorff_hand_worked_in_two_dimensions():
  # truth: 2 x 2 square at rows 0-1, cols 0-1; pred: the pixels (0, 0) and (3, 0).
  # pred -> truth: (0, 0) is inside (0), (3, 0) is 2 rows below (1, 0): 2 * 0.5 mm = 1 mm;
  # mean 0.5 mm. truth -> pred: (0, 0) 0, (0, 1) 1 col = 2 mm, (1, 0) 1 row = 0.5 mm,
  # (1, 1) hypot(0.5, 2) mm from (0, 0) (nearer than (3, 0): hypot(1.0, 2)); mean of the four.
  # Average Hausdorff: the mean of the two directed means.
  truth = np.zeros((5, 4), bool)
  truth[:2, :2] = True
  pred = np.zeros_like(truth)
  pred[0, 0] = pred[3, 0] = True
  spacing = (0.5, 2.0)
  expected = (0.5 + (0 + 2.0 + 0.5 + math.hypot(0.5, 2.0)) / 4) / 2
  assert average_hausdorff(pred, truth, spacing) == pytest.approx(expected, rel=1e-12)
  assert surface_metrics(pred, truth, spacing).average_hausdorff_mm == pytest.approx(
    expected, rel=1e-12
  )


def test_two_dimensional_masks_in_pixels():
  rng = np.random.default_rng(7)
  pred, truth = blob(rng, (30, 25)), blob(rng, (30, 25))
  expected = max(
    plain_directed(pred, truth, (1, 1)).max(), plain_directed(truth, pred, (1, 1)).max()
  )
  assert hausdorff_voxels(pred, truth) == pytest.approx(expected)
  metrics = surface_metrics(pred, truth, (0.5, 2.0), voxel_hausdorff=True)
  assert metrics.hausdorff_voxels == pytest.approx(expected)


def test_per_label_equals_each_label_mask():
  rng = np.random.default_rng(5)
  labels_pred = np.zeros((20, 18, 12), np.uint8)
  labels_truth = np.zeros_like(labels_pred)
  for label in (1, 2):
    labels_pred[blob(rng, labels_pred.shape) & (labels_pred == 0)] = label
    labels_truth[blob(rng, labels_truth.shape) & (labels_truth == 0)] = label
  spacing = (0.5, 0.5, 1.0)
  per_label = surface_metrics_per_label(labels_pred, labels_truth, spacing, labels=(1, 2, 3))
  assert per_label[1] == surface_metrics(labels_pred == 1, labels_truth == 1, spacing)
  assert per_label[3].status is CaseStatus.BOTH_EMPTY


# ----------------------------------------------------------------------------- empty masks


def test_both_empty_gives_nan_distances():
  empty = np.zeros((6, 6, 6), bool)
  metrics = surface_metrics(empty, empty, (1.0, 1.0, 1.0), voxel_hausdorff=True)
  assert metrics.status is CaseStatus.BOTH_EMPTY
  assert all(
    math.isnan(v)
    for v in (
      metrics.hausdorff_mm,
      metrics.hd95_mm,
      metrics.assd_mm,
      metrics.signed_mean_mm,
      metrics.hausdorff_voxels,
      metrics.average_hausdorff_mm,
      metrics.average_hausdorff_voxels,
    )
  )
  assert math.isnan(average_hausdorff(empty, empty, (1.0, 1.0, 1.0)))


def test_missed_structure_gives_infinite_distances_and_under_estimation():
  truth = np.zeros((6, 6, 6), bool)
  truth[2:4, 2:4, 2:4] = True
  metrics = surface_metrics(np.zeros_like(truth), truth, (1.0, 1.0, 1.0))
  assert metrics.status is CaseStatus.MISSED
  assert metrics.hausdorff_mm == metrics.hd95_mm == metrics.assd_mm == math.inf
  assert metrics.average_hausdorff_mm == math.inf
  assert metrics.signed_mean_mm == -math.inf and math.isnan(metrics.signed_sd_mm)
  assert metrics.hausdorff_voxels is None and metrics.average_hausdorff_voxels is None
  assert average_hausdorff(np.zeros_like(truth), truth, (1.0, 1.0, 1.0)) == math.inf


def test_false_positive_gives_infinite_distances_and_over_estimation():
  pred = np.zeros((6, 6, 6), bool)
  pred[1, 1, 1] = True
  metrics = surface_metrics(pred, np.zeros_like(pred), (1.0, 1.0, 1.0))
  assert metrics.status is CaseStatus.FALSE_POSITIVE
  assert metrics.hausdorff_mm == metrics.assd_mm == metrics.average_hausdorff_mm == math.inf
  assert metrics.signed_mean_mm == math.inf
  assert average_hausdorff(pred, np.zeros_like(pred), (1.0, 1.0, 1.0)) == math.inf


# ----------------------------------------------------------------------------- bad input


def test_spacing_must_match_the_dimensions_and_be_positive():
  mask = np.ones((3, 3, 3), bool)
  with pytest.raises(ValueError, match=r'surface_metrics: spacing .* has 2 entries; expected 3'):
    surface_metrics(mask, mask, (1.0, 1.0))
  with pytest.raises(ValueError, match='positive and finite'):
    surface_metrics(mask, mask, (1.0, 0.0, 1.0))
  with pytest.raises(ValueError, match='both masks must hold at least one voxel'):
    directed_surface_distances(mask, np.zeros_like(mask), (1.0, 1.0, 1.0))
