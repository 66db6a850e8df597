"""Surface distances between binary masks in mm: Hausdorff, HD95, ASSD, signed mean distance.

Definitions (docs/metrics.md has the reasoning and the comparison with medpy/SimpleITK):

  surface of a mask  its border voxels: voxels of the mask with at least one face neighbour
                     (scipy connectivity 1: 6 neighbours in 3D, 4 in 2D) outside the mask.
                     Outside the array counts as outside the mask, so voxels on the array's
                     edge are border voxels.
  d(a, B)            Euclidean distance in mm from the centre of border voxel a to the nearest
                     border voxel centre of mask B, read from
                     scipy.ndimage.distance_transform_edt(~border(B), sampling=spacing): one
                     distance transform per direction, never pairwise point distances.
  directed A -> B    the values d(a, B) over every border voxel a of A.
  Hausdorff          max of both directed sets.
  HD95               max of the two directed 95th percentiles (numpy's linear interpolation).
                     Like the Hausdorff distance it is a max over the two directions, and it
                     does not depend on which mask has more border voxels; medpy's hd95 takes
                     the percentile of the pooled directed sets instead.
  ASSD               mean of the pooled directed sets: (sum over A->B + sum over B->A) /
                     (number of border voxels of A + of B).
  signed distance    d with a sign: + where the prediction lies outside the truth
                     (over-estimation), - where it lies inside (under-estimation). For a
                     prediction border voxel: + if it is outside the truth mask; for a truth
                     border voxel: + if it is inside the prediction mask. signed mean and
                     signed SD are over the pooled signed sets; |signed| pooled averages to
                     the ASSD.

Empty masks follow the rules in overlap.py: both empty -> NaN everywhere; prediction empty
(missed) -> distances +inf and signed mean -inf; truth empty (false positive) -> distances +inf
and signed mean +inf. Signed SD is NaN whenever one mask is empty.

Speed: every computation runs on the bounding box of pred | truth grown by one voxel. That
crop is exact, not an approximation: the one-voxel margin keeps each border voxel's outside
neighbour inside the crop (or the crop ends where the array ends, as the full array would),
and every border voxel, hence every nearest border voxel, lies inside it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from imask_jax.metrics.overlap import (KNEE_LABELS, CaseStatus, as_label_map, as_labels,
                                       as_mask, as_spacing, case_status, check_same_shape)

# Face connectivity for the surface; stated in the module docstring and docs/metrics.md.
SURFACE_CONNECTIVITY = 1
HD_PERCENTILE = 95.0


@dataclasses.dataclass(frozen=True)
class SurfaceMetrics:
  """Surface distances between one prediction mask and one truth mask (mm unless noted).

  hausdorff_voxels is the Hausdorff distance with unit spacing (voxels, or pixels in 2D; the
  paper's Table 3 unit); None unless requested.
  """
  hausdorff_mm: float
  hd95_mm: float
  assd_mm: float
  signed_mean_mm: float
  signed_sd_mm: float
  hausdorff_voxels: float | None
  status: CaseStatus


def surface_voxels(mask: Any) -> np.ndarray:
  """Border voxels of a binary mask (bool, same shape): in the mask with a face neighbour
  outside it or outside the array."""
  mask = as_mask(mask, 'mask', 'surface_voxels')
  return _border(mask)


def directed_surface_distances(from_mask: Any, to_mask: Any, spacing: Sequence[float]
                               ) -> np.ndarray:
  """d(a, to_mask) in mm for every border voxel a of `from_mask` (1-D float64, in C order of
  the voxels). Both masks must be non-empty."""
  where = 'directed_surface_distances'
  from_mask = as_mask(from_mask, 'from_mask', where)
  to_mask = as_mask(to_mask, 'to_mask', where)
  check_same_shape(from_mask, to_mask, where)
  spacing = as_spacing(spacing, from_mask.ndim, where)
  if not from_mask.any() or not to_mask.any():
    raise ValueError(f'{where}: both masks must hold at least one voxel (from_mask: '
                     f'{int(from_mask.sum())}, to_mask: {int(to_mask.sum())}); '
                     'surface_metrics applies the empty-mask rules.')
  crop = _union_crop(from_mask, to_mask)
  from_mask, to_mask = from_mask[crop], to_mask[crop]
  return _distance_to(_border(to_mask), spacing)[_border(from_mask)]


def surface_metrics(pred: Any, truth: Any, spacing: Sequence[float], *,
                    voxel_hausdorff: bool = False) -> SurfaceMetrics:
  """Hausdorff, HD95, ASSD and signed mean/SD surface distance (mm) of binary masks of the
  same shape, with `spacing` in mm per array axis. With `voxel_hausdorff`, also the Hausdorff
  distance in voxels (two more distance transforms)."""
  where = 'surface_metrics'
  pred = as_mask(pred, 'pred', where)
  truth = as_mask(truth, 'truth', where)
  check_same_shape(pred, truth, where)
  spacing = as_spacing(spacing, pred.ndim, where)
  status = case_status(int(np.count_nonzero(pred)), int(np.count_nonzero(truth)))
  if status is not CaseStatus.OK:
    return _empty_case(status, voxel_hausdorff)

  crop = _union_crop(pred, truth)
  pred, truth = pred[crop], truth[crop]
  pred_border, truth_border = _border(pred), _border(truth)
  pred_to_truth = _distance_to(truth_border, spacing)[pred_border]
  truth_to_pred = _distance_to(pred_border, spacing)[truth_border]

  # + = over-estimation: a prediction border voxel outside the truth, or a truth border voxel
  # covered by the prediction.
  signed = np.concatenate([
      np.where(truth[pred_border], -pred_to_truth, pred_to_truth),
      np.where(pred[truth_border], truth_to_pred, -truth_to_pred)])
  pooled = np.abs(signed)

  voxel_hd = None
  if voxel_hausdorff:
    unit = (1.0,) * pred.ndim
    voxel_hd = float(max(_distance_to(truth_border, unit)[pred_border].max(),
                         _distance_to(pred_border, unit)[truth_border].max()))
  return SurfaceMetrics(
      hausdorff_mm=float(pooled.max()),
      hd95_mm=float(max(np.percentile(pred_to_truth, HD_PERCENTILE),
                        np.percentile(truth_to_pred, HD_PERCENTILE))),
      assd_mm=float(pooled.mean()),
      signed_mean_mm=float(signed.mean()),
      signed_sd_mm=float(signed.std()),
      hausdorff_voxels=voxel_hd,
      status=status)


def hausdorff_voxels(pred: Any, truth: Any) -> float:
  """Hausdorff distance in voxels (pixels in 2D): surface_metrics with unit spacing."""
  pred = as_mask(pred, 'pred', 'hausdorff_voxels')
  return surface_metrics(pred, truth, (1.0,) * pred.ndim).hausdorff_mm


def surface_metrics_per_label(pred_labels: Any, truth_labels: Any, spacing: Sequence[float],
                              labels: Iterable[int] | Mapping[int, str] = KNEE_LABELS, *,
                              voxel_hausdorff: bool = False) -> dict[int, SurfaceMetrics]:
  """surface_metrics for each label value of two label maps of the same shape."""
  where = 'surface_metrics_per_label'
  pred_labels = as_label_map(pred_labels, 'pred_labels', where)
  truth_labels = as_label_map(truth_labels, 'truth_labels', where)
  check_same_shape(pred_labels, truth_labels, where)
  return {label: surface_metrics(pred_labels == label, truth_labels == label, spacing,
                                 voxel_hausdorff=voxel_hausdorff)
          for label in as_labels(labels, where)}


def _empty_case(status: CaseStatus, voxel_hausdorff: bool) -> SurfaceMetrics:
  if status is CaseStatus.BOTH_EMPTY:
    distance, signed_mean = math.nan, math.nan
  else:
    distance = math.inf
    signed_mean = -math.inf if status is CaseStatus.MISSED else math.inf
  return SurfaceMetrics(
      hausdorff_mm=distance, hd95_mm=distance, assd_mm=distance,
      signed_mean_mm=signed_mean, signed_sd_mm=math.nan,
      hausdorff_voxels=distance if voxel_hausdorff else None, status=status)


def _border(mask: np.ndarray) -> np.ndarray:
  structure = ndimage.generate_binary_structure(mask.ndim, SURFACE_CONNECTIVITY)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _distance_to(border: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
  """Distance in mm from every voxel centre to the nearest voxel of `border`."""
  return ndimage.distance_transform_edt(~border, sampling=spacing)


def _union_crop(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
  """Bounding box of a | b (both non-empty) grown by `margin` voxels, clipped to the array."""
  union = a | b
  crop = []
  for axis, size in enumerate(union.shape):
    others = tuple(i for i in range(union.ndim) if i != axis)
    occupied = np.flatnonzero(np.any(union, axis=others))
    crop.append(slice(max(int(occupied[0]) - margin, 0),
                      min(int(occupied[-1]) + 1 + margin, size)))
  return tuple(crop)
