"""Overlap metrics between binary masks, the empty-mask rules, and summaries over volumes.

Everything here takes plain NumPy arrays: binary masks (bool, or integers/floats holding only
0 and 1) or integer label maps of the same shape. Any number of dimensions works, so the same
functions serve 3D volumes and 2D slices.

Empty-mask rules (shared by every metric module in this package; see docs/metrics.md):

  * both masks empty      -> status BOTH_EMPTY: every metric is NaN. A summary leaves the
                             case out of its mean and counts it in `n_both_empty`.
  * prediction empty only -> status MISSED: Dice, Jaccard, precision and recall are 0;
                             distances are +inf. A summary counts it in `n_missed`.
  * truth empty only      -> status FALSE_POSITIVE: overlap metrics 0, distances +inf.
                             A summary counts it in `n_false_positive`.

A missed or false-positive structure therefore always pulls a mean down (overlap) or up
(distances, to +inf); it can never improve an average by dropping out of it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.tissues import KNEE_LABELS  # the default labels of the per-label metrics


class CaseStatus(enum.StrEnum):
  """Which of the two masks of one case (one structure in one volume) hold any voxel."""

  OK = 'ok'
  BOTH_EMPTY = 'both_empty'
  MISSED = 'missed'
  FALSE_POSITIVE = 'false_positive'


def case_status(pred_count: int, truth_count: int) -> CaseStatus:
  """Status of a case from the voxel counts of its prediction and truth masks."""
  if pred_count and truth_count:
    return CaseStatus.OK
  if truth_count:
    return CaseStatus.MISSED
  if pred_count:
    return CaseStatus.FALSE_POSITIVE
  return CaseStatus.BOTH_EMPTY


# ----------------------------------------------------------------------------- input checks


def as_mask(array: Any, name: str, where: str) -> np.ndarray:
  """Returns `array` as a bool array; it must be bool or hold only the values 0 and 1.

  `name` and `where` (the calling function) go into the error message, so a label map passed
  where a binary mask belongs is reported by name instead of being silently merged.
  """
  array = np.asarray(array)
  if array.dtype == bool:
    return array
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise TypeError(
      f'{where}: {name} has dtype {array.dtype}; expected a binary mask '
      '(bool, or integers/floats holding only 0 and 1).'
    )
  if array.size:
    low, high = array.min(), array.max()
    # Integers within [0, 1] can only be 0 or 1; floats need the exact check.
    is_binary = (
      low >= 0
      and high <= 1
      and (np.issubdtype(array.dtype, np.integer) or bool(np.all((array == 0) | (array == 1))))
    )
    if not is_binary:
      raise ValueError(
        f'{where}: {name} holds values in [{low}, {high}]; expected a binary '
        'mask of 0 and 1 (for a label map use the *_per_label functions).'
      )
  return array != 0


def as_label_map(array: Any, name: str, where: str) -> np.ndarray:
  """Returns `array` as an integer label map (0 = background)."""
  array = np.asarray(array)
  if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
    raise TypeError(f'{where}: {name} has dtype {array.dtype}; expected an integer label map.')
  return array


def check_same_shape(pred: np.ndarray, truth: np.ndarray, where: str) -> None:
  if pred.shape != truth.shape:
    raise ValueError(
      f'{where}: prediction shape {pred.shape} differs from truth shape '
      f'{truth.shape}; both must be on the same voxel grid.'
    )


def as_spacing(spacing: Any, ndim: int, where: str) -> tuple[float, ...]:
  """Voxel spacing in mm, one positive finite entry per array axis (no default on purpose:
  a silent unit spacing turns millimetres into voxels)."""
  try:
    values = tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1))
  except (TypeError, ValueError) as error:
    raise TypeError(
      f'{where}: spacing {spacing!r} is not a sequence of numbers (mm per axis).'
    ) from error
  if len(values) != ndim:
    raise ValueError(
      f'{where}: spacing {spacing!r} has {len(values)} entries; expected {ndim} '
      '(mm per array axis, in array axis order).'
    )
  if not all(math.isfinite(s) and s > 0 for s in values):
    raise ValueError(f'{where}: spacing {spacing!r} must be positive and finite (mm).')
  return values


def as_labels(labels: Iterable[int] | Mapping[int, str], where: str) -> list[int]:
  """The label values to evaluate, as plain ints; 0 (background) is not a structure."""
  values = [int(v) for v in (labels.keys() if isinstance(labels, Mapping) else labels)]
  if not values or any(v <= 0 for v in values):
    raise ValueError(
      f'{where}: labels {values} must be a non-empty list of positive label '
      'values (0 is background).'
    )
  return values


# ---------------------------------------------------------------------------- overlap


@dataclasses.dataclass(frozen=True)
class OverlapMetrics:
  """Overlap of one prediction mask with one truth mask (fractions in [0, 1]).

  dice = 2 TP / (2 TP + FP + FN); jaccard = TP / (TP + FP + FN);
  precision (PPV) = TP / (TP + FP); recall (sensitivity) = TP / (TP + FN).
  Counts are voxels. Values follow the empty-mask rules of this module's docstring.
  """

  dice: float
  jaccard: float
  precision: float
  recall: float
  true_positive: int
  false_positive: int
  false_negative: int
  status: CaseStatus


def overlap_metrics(pred: Any, truth: Any) -> OverlapMetrics:
  """Dice, Jaccard, precision and recall of binary masks `pred` and `truth` (same shape)."""
  where = 'overlap_metrics'
  pred = as_mask(pred, 'pred', where)
  truth = as_mask(truth, 'truth', where)
  check_same_shape(pred, truth, where)
  tp = int(np.count_nonzero(pred & truth))
  n_pred = int(np.count_nonzero(pred))
  n_truth = int(np.count_nonzero(truth))
  return _overlap_from_counts(tp, n_pred, n_truth)


def _overlap_from_counts(tp: int, n_pred: int, n_truth: int) -> OverlapMetrics:
  status = case_status(n_pred, n_truth)
  fp, fn = n_pred - tp, n_truth - tp
  if status is CaseStatus.BOTH_EMPTY:
    nan = math.nan
    return OverlapMetrics(nan, nan, nan, nan, 0, 0, 0, status)
  if status is not CaseStatus.OK:
    return OverlapMetrics(0.0, 0.0, 0.0, 0.0, 0, fp, fn, status)
  return OverlapMetrics(
    dice=2 * tp / (n_pred + n_truth),
    jaccard=tp / (n_pred + n_truth - tp),
    precision=tp / n_pred,
    recall=tp / n_truth,
    true_positive=tp,
    false_positive=fp,
    false_negative=fn,
    status=status,
  )


def overlap_per_label(
  pred_labels: Any, truth_labels: Any, labels: Iterable[int] | Mapping[int, str] = KNEE_LABELS
) -> dict[int, OverlapMetrics]:
  """Overlap metrics for each label value of two label maps of the same shape."""
  where = 'overlap_per_label'
  pred_labels = as_label_map(pred_labels, 'pred_labels', where)
  truth_labels = as_label_map(truth_labels, 'truth_labels', where)
  check_same_shape(pred_labels, truth_labels, where)
  return {
    label: overlap_metrics(pred_labels == label, truth_labels == label)
    for label in as_labels(labels, where)
  }


# ---------------------------------------------------------------------------- summaries


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean +- SD of one metric over cases (volumes), with the empty-mask cases counted.

  mean, sd: over every case except BOTH_EMPTY ones (n cases). A missed or false-positive case
    enters with its value (0 for overlap, +inf for distances), so it can only make the mean
    worse; a distance mean with any such case is +inf (or NaN for mixed signs).
  mean_finite, sd_finite: over the n_finite cases whose value is finite, i.e. "over the
    detected structures"; quote them only together with n_missed and n_false_positive.
  SDs are sample SDs (ddof=1); NaN for fewer than two values.
  """

  mean: float
  sd: float
  n: int
  mean_finite: float
  sd_finite: float
  n_finite: int
  n_missed: int
  n_false_positive: int
  n_both_empty: int

  def __str__(self) -> str:
    if self.n == self.n_finite:
      return f'{self.mean:.3g} ± {self.sd:.2g} (n={self.n})'
    return (
      f'{self.mean_finite:.3g} ± {self.sd_finite:.2g} over {self.n_finite} of {self.n}; '
      f'{self.n_missed} missed, {self.n_false_positive} false positive'
    )


def summarize_values(values: Sequence[float], statuses: Sequence[CaseStatus | str]) -> Summary:
  """Summary of per-case `values` whose empty-mask statuses are `statuses` (same length)."""
  if len(values) != len(statuses):
    raise ValueError(
      f'summarize_values: {len(values)} values but {len(statuses)} statuses; '
      'expected one status per value.'
    )
  statuses = [CaseStatus(s) for s in statuses]
  values = np.asarray(values, dtype=float)
  counted = np.array([s is not CaseStatus.BOTH_EMPTY for s in statuses], dtype=bool)
  kept = values[counted]
  finite = kept[np.isfinite(kept)]
  mean, sd = _mean_sd(kept)
  mean_finite, sd_finite = _mean_sd(finite)
  return Summary(
    mean=mean,
    sd=sd,
    n=int(kept.size),
    mean_finite=mean_finite,
    sd_finite=sd_finite,
    n_finite=int(finite.size),
    n_missed=sum(s is CaseStatus.MISSED for s in statuses),
    n_false_positive=sum(s is CaseStatus.FALSE_POSITIVE for s in statuses),
    n_both_empty=sum(s is CaseStatus.BOTH_EMPTY for s in statuses),
  )


def summarize(results: Sequence[Any], metric: str) -> Summary:
  """Summary of field `metric` (e.g. 'dice', 'hd95_mm') over per-case result objects that
  carry a `status` (OverlapMetrics, SurfaceMetrics)."""
  if not results:
    raise ValueError(f'summarize: no results given for metric {metric!r}.')
  if not all(hasattr(r, metric) and hasattr(r, 'status') for r in results):
    raise AttributeError(
      f'summarize: every result needs fields {metric!r} and "status"; got '
      f'{type(results[0]).__name__}.'
    )
  return summarize_values([getattr(r, metric) for r in results], [r.status for r in results])


def _mean_sd(values: np.ndarray) -> tuple[float, float]:
  if values.size == 0:
    return math.nan, math.nan
  with np.errstate(invalid='ignore'):  # inf - inf inside the SD of non-finite values is NaN
    mean = float(np.mean(values))
    sd = float(np.std(values, ddof=1)) if values.size > 1 else math.nan
  return mean, sd
