"""Distances between binary masks in mm: Hausdorff, HD95, ASSD, signed mean / SD surface
distance, and ITK / SimpleITK's average Hausdorff distance (the paper's Table 3 "Ave. Hausdorff").

Entry points: `surface_metrics(pred, truth, spacing)` (a `SurfaceMetrics`; `voxel_hausdorff=True`
adds the Hausdorff and average Hausdorff in voxels), `surface_metrics_per_label`,
`hausdorff_voxels`, `average_hausdorff`, `directed_surface_distances`, `surface_voxels`. Masks
are bool (or 0/1) arrays of one shape, 2D or 3D; `spacing` is mm per array axis. A mask's surface
is its border voxels (face connectivity); a signed distance is + where the prediction lies
outside the truth (over-estimation), - inside. Empty masks follow overlap.py's rules.

Definitions, empty-mask values, the exact bounding-box crop and the comparison with medpy and
SimpleITK: docs/metrics.md, 'Surface distances' and 'Empty-mask rules'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from imask_jax.metrics.overlap import (
  KNEE_LABELS,
  CaseStatus,
  as_label_map,
  as_labels,
  as_mask,
  as_spacing,
  case_status,
  check_same_shape,
)

# Face connectivity for the surface; stated in the module docstring and docs/metrics.md.
SURFACE_CONNECTIVITY = 1
HD_PERCENTILE = 95.0


@dataclasses.dataclass(frozen=True)
class SurfaceMetrics:
  """Surface distances between one prediction mask and one truth mask (mm unless noted).

  average_hausdorff_mm is ITK's average Hausdorff distance (docs/metrics.md, 'Surface
  distances'), not the ASSD.
  hausdorff_voxels / average_hausdorff_voxels are the same with unit spacing (voxels, or
  pixels in 2D; the paper's Table 3 unit); None unless requested.
  """

  hausdorff_mm: float
  hd95_mm: float
  assd_mm: float
  signed_mean_mm: float
  signed_sd_mm: float
  hausdorff_voxels: float | None
  average_hausdorff_mm: float
  average_hausdorff_voxels: float | None
  status: CaseStatus


def surface_voxels(mask: Any) -> np.ndarray:
  """Border voxels of a binary mask (bool, same shape): in the mask with a face neighbour
  outside it or outside the array."""
  mask = as_mask(mask, 'mask', 'surface_voxels')
  return _border(mask)


def directed_surface_distances(
  from_mask: Any, to_mask: Any, spacing: Sequence[float]
) -> np.ndarray:
  """d(a, to_mask) in mm for every border voxel a of `from_mask` (1-D float64, in C order of
  the voxels). Both masks must be non-empty."""
  where = 'directed_surface_distances'
  from_mask = as_mask(from_mask, 'from_mask', where)
  to_mask = as_mask(to_mask, 'to_mask', where)
  check_same_shape(from_mask, to_mask, where)
  spacing = as_spacing(spacing, from_mask.ndim, where)
  if not from_mask.any() or not to_mask.any():
    raise ValueError(
      f'{where}: both masks must hold at least one voxel (from_mask: '
      f'{int(from_mask.sum())}, to_mask: {int(to_mask.sum())}); '
      'surface_metrics applies the empty-mask rules.'
    )
  crop = _union_crop(from_mask, to_mask)
  from_mask, to_mask = from_mask[crop], to_mask[crop]
  return _distance_to(_border(to_mask), spacing)[_border(from_mask)]


def surface_metrics(
  pred: Any, truth: Any, spacing: Sequence[float], *, voxel_hausdorff: bool = False
) -> SurfaceMetrics:
  """Hausdorff, HD95, ASSD, signed mean/SD surface distance and ITK's average Hausdorff
  distance (mm) of binary masks of the same shape, with `spacing` in mm per array axis. With
  `voxel_hausdorff`, also the Hausdorff and average Hausdorff distances in voxels (two more
  distance transforms)."""
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
  to_truth = _distance_to(truth_border, spacing)
  to_pred = _distance_to(pred_border, spacing)
  pred_to_truth = to_truth[pred_border]
  truth_to_pred = to_pred[truth_border]

  # + = over-estimation: a prediction border voxel outside the truth, or a truth border voxel
  # covered by the prediction.
  signed = np.concatenate(
    [
      np.where(truth[pred_border], -pred_to_truth, pred_to_truth),
      np.where(pred[truth_border], truth_to_pred, -truth_to_pred),
    ]
  )
  pooled = np.abs(signed)

  voxel_hd = voxel_average = None
  if voxel_hausdorff:
    unit = (1.0,) * pred.ndim
    to_truth_voxels = _distance_to(truth_border, unit)
    to_pred_voxels = _distance_to(pred_border, unit)
    voxel_hd = float(max(to_truth_voxels[pred_border].max(), to_pred_voxels[truth_border].max()))
    voxel_average = _average_hausdorff(pred, truth, to_truth_voxels, to_pred_voxels)
  return SurfaceMetrics(
    hausdorff_mm=float(pooled.max()),
    hd95_mm=float(
      max(np.percentile(pred_to_truth, HD_PERCENTILE), np.percentile(truth_to_pred, HD_PERCENTILE))
    ),
    assd_mm=float(pooled.mean()),
    signed_mean_mm=float(signed.mean()),
    signed_sd_mm=float(signed.std()),
    hausdorff_voxels=voxel_hd,
    average_hausdorff_mm=_average_hausdorff(pred, truth, to_truth, to_pred),
    average_hausdorff_voxels=voxel_average,
    status=status,
  )


def hausdorff_voxels(pred: Any, truth: Any) -> float:
  """Hausdorff distance in voxels (pixels in 2D): surface_metrics with unit spacing."""
  pred = as_mask(pred, 'pred', 'hausdorff_voxels')
  return surface_metrics(pred, truth, (1.0,) * pred.ndim).hausdorff_mm


def average_hausdorff(pred: Any, truth: Any, spacing: Sequence[float]) -> float:
  """ITK / SimpleITK's average Hausdorff distance (GetAverageHausdorffDistance) in mm between
  binary masks of the same shape, `spacing` in mm per axis (all ones for voxels): the mean of
  the two directed means, over every voxel of one mask, of the distance to the other mask
  (0 inside it). Empty masks: NaN if both are, +inf if one is. Two distance transforms."""
  where = 'average_hausdorff'
  pred = as_mask(pred, 'pred', where)
  truth = as_mask(truth, 'truth', where)
  check_same_shape(pred, truth, where)
  spacing = as_spacing(spacing, pred.ndim, where)
  status = case_status(int(np.count_nonzero(pred)), int(np.count_nonzero(truth)))
  if status is not CaseStatus.OK:
    return math.nan if status is CaseStatus.BOTH_EMPTY else math.inf
  crop = _union_crop(pred, truth)
  pred, truth = pred[crop], truth[crop]
  return _average_hausdorff(
    pred, truth, _distance_to(_border(truth), spacing), _distance_to(_border(pred), spacing)
  )


def surface_metrics_per_label(
  pred_labels: Any,
  truth_labels: Any,
  spacing: Sequence[float],
  labels: Iterable[int] | Mapping[int, str] = KNEE_LABELS,
  *,
  voxel_hausdorff: bool = False,
) -> dict[int, SurfaceMetrics]:
  """surface_metrics for each label value of two label maps of the same shape."""
  where = 'surface_metrics_per_label'
  pred_labels = as_label_map(pred_labels, 'pred_labels', where)
  truth_labels = as_label_map(truth_labels, 'truth_labels', where)
  check_same_shape(pred_labels, truth_labels, where)
  return {
    label: surface_metrics(
      pred_labels == label, truth_labels == label, spacing, voxel_hausdorff=voxel_hausdorff
    )
    for label in as_labels(labels, where)
  }


def _empty_case(status: CaseStatus, voxel_hausdorff: bool) -> SurfaceMetrics:
  if status is CaseStatus.BOTH_EMPTY:
    distance, signed_mean = math.nan, math.nan
  else:
    distance = math.inf
    signed_mean = -math.inf if status is CaseStatus.MISSED else math.inf
  return SurfaceMetrics(
    hausdorff_mm=distance,
    hd95_mm=distance,
    assd_mm=distance,
    signed_mean_mm=signed_mean,
    signed_sd_mm=math.nan,
    hausdorff_voxels=distance if voxel_hausdorff else None,
    average_hausdorff_mm=distance,
    average_hausdorff_voxels=distance if voxel_hausdorff else None,
    status=status,
  )


def _average_hausdorff(
  pred: np.ndarray, truth: np.ndarray, to_truth: np.ndarray, to_pred: np.ndarray
) -> float:
  """ITK's average Hausdorff distance of non-empty masks from their border distance maps
  (to_truth = distance to the truth's border voxels, to_pred likewise): outside the other
  mask the nearest voxel of it is a border voxel, inside it the distance is 0."""
  pred_to_truth = to_truth[pred & ~truth].sum() / np.count_nonzero(pred)
  truth_to_pred = to_pred[truth & ~pred].sum() / np.count_nonzero(truth)
  return float((pred_to_truth + truth_to_pred) / 2)


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
    crop.append(slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + 1 + margin, size)))
  return tuple(crop)
