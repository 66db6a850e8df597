"""Per-slice (2D, in the slice plane) Dice, Hausdorff and average Hausdorff of a 3D structure,
and their per-volume aggregate: what a 2D method's paper most likely reports.

Entry points: `slice_metrics(pred, truth, axis, spacing)` and `slice_metrics_per_label`, each a
`SliceMetrics` (`aggregate(name)`, `summary(name)`). Every slice along `axis` is a 2D image with
the in-plane spacing (mm); the "px" values use unit in-plane spacing. A slice counts where the
prediction or the truth holds the structure; a one-sided slice has Dice 0 and distances +inf.
Aggregate over a volume: Dice = mean over the slices that count; distances = mean over the
two-sided slices, with the one-sided ones counted beside it (n_missed_slices,
n_false_positive_slices); the volume's own 3D status (CaseStatus) is kept.

Definitions, the aggregate without a two-sided slice, speed and the reference comparison:
docs/metrics.md, 'Per-slice 2D metrics'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from imask_jax.metrics.overlap import (
  KNEE_LABELS,
  CaseStatus,
  Summary,
  as_label_map,
  as_labels,
  as_mask,
  as_spacing,
  case_status,
  check_same_shape,
  summarize_values,
)
from imask_jax.metrics.surface import _average_hausdorff, _border, _distance_to, _union_crop

# Per-slice value arrays of SliceMetrics, in the order of its fields.
SLICE_VALUES = (
  'dice',
  'hausdorff_px',
  'hausdorff_mm',
  'average_hausdorff_px',
  'average_hausdorff_mm',
)


@dataclasses.dataclass(frozen=True, eq=False)
class SliceMetrics:
  """2D metrics of one structure in every slice along `axis` that holds it in the prediction
  or the truth (n slices, in slice order); the definitions: docs/metrics.md, 'Per-slice 2D
  metrics'.

  axis: the slice axis of the 3D arrays; pixel_spacing: (mm, mm) of the two remaining axes in
  array order. index: int [n], the slices' positions along axis. status: CaseStatus per slice
  (OK, MISSED or FALSE_POSITIVE). dice, hausdorff_px, hausdorff_mm, average_hausdorff_px,
  average_hausdorff_mm: float [n] (+inf distances and Dice 0 on one-sided slices).
  volume_status: the 3D case status of the whole structure.
  """

  axis: int
  pixel_spacing: tuple[float, float]
  index: np.ndarray
  status: tuple[CaseStatus, ...]
  dice: np.ndarray
  hausdorff_px: np.ndarray
  hausdorff_mm: np.ndarray
  average_hausdorff_px: np.ndarray
  average_hausdorff_mm: np.ndarray
  volume_status: CaseStatus

  @property
  def n_slices(self) -> int:
    """Slices where the prediction or the truth holds the structure."""
    return int(self.index.size)

  @property
  def n_missed_slices(self) -> int:
    return sum(s is CaseStatus.MISSED for s in self.status)

  @property
  def n_false_positive_slices(self) -> int:
    return sum(s is CaseStatus.FALSE_POSITIVE for s in self.status)

  def aggregate(self, name: str) -> float:
    """The per-volume value of `name` (one of SLICE_VALUES): the mean over counted slices for
    Dice, over two-sided slices for distances (module docstring)."""
    if name not in SLICE_VALUES:
      raise ValueError(
        f'SliceMetrics.aggregate: unknown value {name!r}; expected one of {SLICE_VALUES}'
      )
    values = getattr(self, name)
    if name == 'dice':
      return float(values.mean()) if values.size else math.nan
    both = np.array([s is CaseStatus.OK for s in self.status], dtype=bool)
    if both.any():
      return float(values[both].mean())
    return math.inf if self.n_slices else math.nan

  def summary(self, name: str) -> Summary:
    """Mean ± SD of `name` over this volume's counted slices, with the one-sided slices
    counted (overlap.summarize_values, one slice per case)."""
    if name not in SLICE_VALUES:
      raise ValueError(
        f'SliceMetrics.summary: unknown value {name!r}; expected one of {SLICE_VALUES}'
      )
    return summarize_values(getattr(self, name), self.status)


def slice_metrics(pred: Any, truth: Any, axis: int, spacing: Sequence[float]) -> SliceMetrics:
  """Per-slice 2D Dice, Hausdorff and average Hausdorff (mm and pixels) of binary 3D masks of
  the same shape, slicing along `axis` (0, 1 or 2); `spacing` in mm per 3D array axis."""
  where = 'slice_metrics'
  pred = as_mask(pred, 'pred', where)
  truth = as_mask(truth, 'truth', where)
  check_same_shape(pred, truth, where)
  if pred.ndim != 3:
    raise ValueError(f'{where}: masks have shape {pred.shape}; expected 3D volumes.')
  spacing = as_spacing(spacing, 3, where)
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis < 3:
    raise ValueError(f'{where}: axis={axis!r}; expected the slice axis 0, 1 or 2.')
  axis = int(axis)
  pixel_spacing = tuple(s for i, s in enumerate(spacing) if i != axis)
  pred, truth = np.moveaxis(pred, axis, 0), np.moveaxis(truth, axis, 0)

  n_pred = np.count_nonzero(pred, axis=(1, 2))
  n_truth = np.count_nonzero(truth, axis=(1, 2))
  index = np.flatnonzero((n_pred > 0) | (n_truth > 0))
  status = tuple(case_status(int(n_pred[k]), int(n_truth[k])) for k in index)
  both = n_pred[index] * n_truth[index] > 0
  tp = np.count_nonzero(pred[index] & truth[index], axis=(1, 2))
  dice = np.where(both, 2.0 * tp / np.maximum(n_pred[index] + n_truth[index], 1), 0.0)

  distances = np.full((4, index.size), math.inf)  # hd px, hd mm, average px, average mm
  square = pixel_spacing[0] == pixel_spacing[1]
  for j in np.flatnonzero(both):
    distances[:, j] = _slice_distances(pred[index[j]], truth[index[j]], pixel_spacing, square)
  return SliceMetrics(
    axis=axis,
    pixel_spacing=pixel_spacing,
    index=index,
    status=status,
    dice=dice,
    hausdorff_px=distances[0],
    hausdorff_mm=distances[1],
    average_hausdorff_px=distances[2],
    average_hausdorff_mm=distances[3],
    volume_status=case_status(int(n_pred.sum()), int(n_truth.sum())),
  )


def slice_metrics_per_label(
  pred_labels: Any,
  truth_labels: Any,
  axis: int,
  spacing: Sequence[float],
  labels: Iterable[int] | Mapping[int, str] = KNEE_LABELS,
) -> dict[int, SliceMetrics]:
  """slice_metrics for each label value of two 3D label maps of the same shape."""
  where = 'slice_metrics_per_label'
  pred_labels = as_label_map(pred_labels, 'pred_labels', where)
  truth_labels = as_label_map(truth_labels, 'truth_labels', where)
  check_same_shape(pred_labels, truth_labels, where)
  return {
    label: slice_metrics(pred_labels == label, truth_labels == label, axis, spacing)
    for label in as_labels(labels, where)
  }


def _slice_distances(
  pred: np.ndarray, truth: np.ndarray, pixel_spacing: tuple[float, float], square: bool
) -> tuple[float, float, float, float]:
  """(Hausdorff px, Hausdorff mm, average Hausdorff px, average Hausdorff mm) of two non-empty
  2D masks."""
  crop = _union_crop(pred, truth)
  pred, truth = pred[crop], truth[crop]
  pred_border, truth_border = _border(pred), _border(truth)

  def hausdorff_and_average(spacing: Sequence[float]) -> tuple[float, float]:
    to_truth = _distance_to(truth_border, spacing)
    to_pred = _distance_to(pred_border, spacing)
    hausdorff = max(to_truth[pred_border].max(), to_pred[truth_border].max())
    return float(hausdorff), _average_hausdorff(pred, truth, to_truth, to_pred)

  hd_mm, average_mm = hausdorff_and_average(pixel_spacing)
  if square:  # same nearest pixels, distances scaled by the one spacing
    hd_px, average_px = hd_mm / pixel_spacing[0], average_mm / pixel_spacing[0]
  else:
    hd_px, average_px = hausdorff_and_average((1.0, 1.0))
  return hd_px, hd_mm, average_px, average_mm
