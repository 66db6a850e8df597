"""Volumes in mL from masks, and agreement of volumes between readers or methods ("raters").

Entry points: `volume_ml`, `volumes_ml_per_label`; between raters `paired_difference`,
`coefficient_of_variation` (RMS and mean CoV), `intraclass_correlation` (ICC(2,1), ICC(3,1)),
`bland_altman` and `pairwise_agreement`; the paper's Table 7 (per hip, at baseline)
`hip_volume_table(scans, baseline)` from every scan's `ScanVolumes`. Agreement takes paired
measurements: two 1-D arrays `a`, `b` of one value per subject, or a table `measurements` of
shape [n_subjects, k_raters]. Every SD is a sample SD (ddof = 1).

Formulas, which ICC to use where, and the Table 7 layout with the paper's rows that fix it:
docs/metrics.md, 'Volumes and agreement'.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from imask_jax.metrics.overlap import KNEE_LABELS, as_label_map, as_labels, as_mask, as_spacing

MM3_PER_ML = 1000.0
LIMITS_OF_AGREEMENT_Z = 1.96


# ----------------------------------------------------------------------------- volumes


def volume_ml(mask: Any, spacing: Sequence[float]) -> float:
  """Volume of a binary mask in mL: voxel count x voxel volume (mm^3) / 1000."""
  mask = as_mask(mask, 'mask', 'volume_ml')
  spacing = as_spacing(spacing, mask.ndim, 'volume_ml')
  return int(np.count_nonzero(mask)) * math.prod(spacing) / MM3_PER_ML


def volumes_ml_per_label(
  label_map: Any, spacing: Sequence[float], labels: Iterable[int] | Mapping[int, str] = KNEE_LABELS
) -> dict[int, float]:
  """Volume in mL of each label value of an integer label map."""
  where = 'volumes_ml_per_label'
  label_map = as_label_map(label_map, 'label_map', where)
  voxel_mm3 = math.prod(as_spacing(spacing, label_map.ndim, where))
  return {
    label: int(np.count_nonzero(label_map == label)) * voxel_mm3 / MM3_PER_ML
    for label in as_labels(labels, where)
  }


# ----------------------------------------------------------------------------- input checks


def _as_pair(a: Any, b: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(a, dtype=float)
  b = np.asarray(b, dtype=float)
  if a.ndim != 1 or a.shape != b.shape or a.size < 2:
    raise ValueError(
      f'{where}: a {a.shape} and b {b.shape} must be 1-D of the same length '
      '(one value per subject, at least 2 subjects).'
    )
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError(f'{where}: a and b must be finite; got a={a}, b={b}.')
  return a, b


def _as_table(measurements: Any, where: str) -> np.ndarray:
  table = np.asarray(measurements, dtype=float)
  if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 2:
    raise ValueError(
      f'{where}: measurements have shape {table.shape}; expected [n_subjects >= 2, k_raters >= 2].'
    )
  if not np.all(np.isfinite(table)):
    raise ValueError(f'{where}: measurements must be finite; got {table}.')
  return table


# ----------------------------------------------------------------------------- agreement


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """Differences a - b over subjects (units of the inputs, e.g. mL)."""

  mean_difference: float
  sd_difference: float
  mean_abs_difference: float
  sd_abs_difference: float
  n: int


def paired_difference(a: Any, b: Any) -> PairedDifference:
  """Bias and spread of a - b, and mean +- SD of |a - b| (sample SDs)."""
  a, b = _as_pair(a, b, 'paired_difference')
  difference = a - b
  return PairedDifference(
    mean_difference=float(difference.mean()),
    sd_difference=float(difference.std(ddof=1)),
    mean_abs_difference=float(np.abs(difference).mean()),
    sd_abs_difference=float(np.abs(difference).std(ddof=1)),
    n=int(difference.size),
  )


@dataclasses.dataclass(frozen=True)
class CoefficientOfVariation:
  """CoV_i = SD_i / mean_i per subject, and its RMS and mean over subjects.

  Subjects whose measurements are all zero (mean 0, e.g. no effusion by every rater) have no
  CoV: per_subject is NaN there, they are left out of rms_cov and mean_cov, and counted in
  n_zero_mean.
  """

  rms_cov: float
  mean_cov: float
  per_subject: np.ndarray
  n_used: int
  n_zero_mean: int


def coefficient_of_variation(measurements: Any) -> CoefficientOfVariation:
  """CoV of non-negative measurements [n_subjects, k_raters] (e.g. volumes in mL)."""
  where = 'coefficient_of_variation'
  table = _as_table(measurements, where)
  if np.any(table < 0):
    raise ValueError(
      f'{where}: CoV needs non-negative measurements (ratio scale); got minimum {table.min()}.'
    )
  means = table.mean(axis=1)
  sds = table.std(axis=1, ddof=1)
  used = means > 0
  per_subject = np.full(means.shape, np.nan)
  per_subject[used] = sds[used] / means[used]
  cov = per_subject[used]
  return CoefficientOfVariation(
    rms_cov=float(np.sqrt(np.mean(cov**2))) if cov.size else math.nan,
    mean_cov=float(np.mean(cov)) if cov.size else math.nan,
    per_subject=per_subject,
    n_used=int(used.sum()),
    n_zero_mean=int((~used).sum()),
  )


@dataclasses.dataclass(frozen=True)
class IntraclassCorrelation:
  """ICC(2,1) (absolute agreement) and ICC(3,1) (consistency), with the ANOVA mean squares.

  Both are NaN when every measurement is equal (no variance to apportion).
  """

  icc_2_1: float
  icc_3_1: float
  between_subjects_ms: float
  between_raters_ms: float
  residual_ms: float
  n_subjects: int
  n_raters: int


def intraclass_correlation(measurements: Any) -> IntraclassCorrelation:
  """ICC(2,1) and ICC(3,1) of a table [n_subjects, k_raters] (Shrout & Fleiss 1979)."""
  table = _as_table(measurements, 'intraclass_correlation')
  n, k = table.shape
  grand = table.mean()
  subject_ss = k * np.sum((table.mean(axis=1) - grand) ** 2)
  rater_ss = n * np.sum((table.mean(axis=0) - grand) ** 2)
  residual_ss = np.sum((table - grand) ** 2) - subject_ss - rater_ss
  bms = subject_ss / (n - 1)
  jms = rater_ss / (k - 1)
  ems = residual_ss / ((n - 1) * (k - 1))
  return IntraclassCorrelation(
    icc_2_1=_ratio(bms - ems, bms + (k - 1) * ems + k * (jms - ems) / n),
    icc_3_1=_ratio(bms - ems, bms + (k - 1) * ems),
    between_subjects_ms=float(bms),
    between_raters_ms=float(jms),
    residual_ms=float(ems),
    n_subjects=n,
    n_raters=k,
  )


def _ratio(numerator: float, denominator: float) -> float:
  return float(numerator / denominator) if denominator != 0 else math.nan


# ----------------------------------------------------------------------------- Bland-Altman


@dataclasses.dataclass(frozen=True)
class BlandAltman:
  """Bland-Altman statistics of a - b: bias, sample SD and 95% limits of agreement, plus the
  per-subject means (a + b) / 2 and differences a - b that the plot shows."""

  bias: float
  sd: float
  loa_lower: float
  loa_upper: float
  means: np.ndarray
  differences: np.ndarray


def bland_altman(a: Any, b: Any) -> BlandAltman:
  """Bland-Altman statistics of paired measurements a, b (1-D, one per subject)."""
  a, b = _as_pair(a, b, 'bland_altman')
  differences = a - b
  bias = float(differences.mean())
  sd = float(differences.std(ddof=1))
  return BlandAltman(
    bias=bias,
    sd=sd,
    loa_lower=bias - LIMITS_OF_AGREEMENT_Z * sd,
    loa_upper=bias + LIMITS_OF_AGREEMENT_Z * sd,
    means=(a + b) / 2,
    differences=differences,
  )


# ----------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class PairAgreement:
  """Agreement of rater a with rater b (differences are a - b)."""

  difference: PairedDifference
  cov: CoefficientOfVariation
  icc: IntraclassCorrelation
  bland_altman: BlandAltman


def pairwise_agreement(measurements: Mapping[str, Any]) -> dict[tuple[str, str], PairAgreement]:
  """Agreement for every ordered-by-input pair of raters, e.g. {'reader1': mL per subject,
  'reader2': ..., 'model': ...} -> {('reader1', 'reader2'): PairAgreement, ...}. The paper's
  Table 7 is this for readers and methods."""
  if len(measurements) < 2:
    raise ValueError(f'pairwise_agreement: got raters {list(measurements)}; expected >= 2.')
  table = {}
  for name_a, name_b in itertools.combinations(measurements, 2):
    a, b = _as_pair(
      measurements[name_a], measurements[name_b], f'pairwise_agreement[{name_a!r}, {name_b!r}]'
    )
    both = np.stack([a, b], axis=1)
    table[(name_a, name_b)] = PairAgreement(
      difference=paired_difference(a, b),
      cov=coefficient_of_variation(both),
      icc=intraclass_correlation(both),
      bland_altman=bland_altman(a, b),
    )
  return table


# ----------------------------------------------------------------------------- Table 7 per hip

SIDES = ('right', 'left')


@dataclasses.dataclass(frozen=True)
class ScanVolumes:
  """One scan's effusion volumes: rater -> (right mL, left mL). subject: the person scanned;
  timepoint: the visit, or None when the data name no time points."""

  scan_id: str
  subject: str
  timepoint: str | None
  volumes: Mapping[str, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class MeanSD:
  """Mean +- sample SD (ddof=1; NaN for n < 2) of n values (mL)."""

  mean: float
  sd: float
  n: int

  @classmethod
  def of(cls, values: Any) -> MeanSD:
    values = np.asarray(values, dtype=float)
    return cls(
      float(values.mean()) if values.size else math.nan,
      float(values.std(ddof=1)) if values.size > 1 else math.nan,
      int(values.size),
    )


@dataclasses.dataclass(frozen=True)
class HipAgreement:
  """Agreement of rater a with rater b over hips (differences a - b, mL)."""

  difference: PairedDifference
  cov: CoefficientOfVariation


@dataclasses.dataclass(frozen=True, eq=False)
class HipVolumeTable:
  """The paper's Table 7 from baseline scans (docs/metrics.md, 'Volumes and agreement').

  raters: in input order. scans: the scans used, one per subject (sorted by subject).
  left_out: scans not used (later time points). subjects_without_baseline: subjects left out
  because no scan of theirs is at the named baseline. hips: (subject, side) per row of
  hip_ml [n_hips, k_raters] (each scan's right hip, then its left). right, left, overall,
  scan_total: rater -> MeanSD. pairs: (a, b) -> HipAgreement for every pair in rater order
  (empty with fewer than 2 hips).
  """

  raters: tuple[str, ...]
  scans: tuple[str, ...]
  left_out: tuple[str, ...]
  subjects_without_baseline: tuple[str, ...]
  hips: tuple[tuple[str, str], ...]
  hip_ml: np.ndarray
  right: dict[str, MeanSD]
  left: dict[str, MeanSD]
  overall: dict[str, MeanSD]
  scan_total: dict[str, MeanSD]
  pairs: dict[tuple[str, str], HipAgreement]


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
  """Sort key comparing digit runs as numbers: 'v2' < 'v10', '01' < '2'."""
  return tuple(
    (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r'(\d+)', text) if part
  )


def baseline_scans(
  scans: Sequence[ScanVolumes], baseline: str | None = None
) -> tuple[list[ScanVolumes], list[ScanVolumes], list[str]]:
  """(the scans used, one per subject, sorted by subject; the scans left out; the subjects
  without a `baseline` scan). A subject's scans name their time points, or it has one scan
  that names none: a single-visit scan, its subject's baseline (a cohort may mix single-visit
  ids such as HIP_001 with visits such as stiho_017_v2, data.subject_pattern)."""
  where = 'baseline_scans'
  by_subject: dict[str, list[ScanVolumes]] = {}
  for scan in scans:
    by_subject.setdefault(scan.subject, []).append(scan)
  used, left_out, without = [], [], []
  for subject in sorted(by_subject, key=natural_key):
    group = by_subject[subject]
    named = [s.timepoint not in (None, '') for s in group]
    if not any(named):
      if len(group) > 1:
        raise ValueError(
          f'{where}: subject {subject!r} has scans '
          f'{[s.scan_id for s in group]} and no time points; expected one scan '
          'per subject, or time points naming the baseline.'
        )
      used.append(group[0])
      continue
    if not all(named):
      unnamed = [s.scan_id for s, n in zip(group, named) if not n]
      raise ValueError(
        f'{where}: subject {subject!r}: scans {unnamed} name no time point but its other '
        'scans do; expected every scan of a subject as <subject>_<timepoint>, or one scan.'
      )
    points = [s.timepoint for s in group]
    if len(set(points)) != len(points):
      raise ValueError(
        f'{where}: subject {subject!r} has two scans at one time point: '
        f'{[s.scan_id for s in group]}.'
      )
    if baseline is None:
      first = min(group, key=lambda s: natural_key(s.timepoint))
    else:
      first = next((s for s in group if s.timepoint == baseline), None)
      if first is None:
        without.append(subject)
    used += [first] if first is not None else []
    left_out += [s for s in group if s is not first]
  return used, left_out, without


def hip_volume_table(scans: Sequence[ScanVolumes], baseline: str | None = None) -> HipVolumeTable:
  """Table 7 per hip at baseline (docs/metrics.md, 'Volumes and agreement') from every scan's
  (right, left) volumes in mL of every rater (readers and methods)."""
  where = 'hip_volume_table'
  if not scans:
    raise ValueError(f'{where}: no scans given.')
  raters = tuple(scans[0].volumes)
  for scan in scans:
    if tuple(scan.volumes) != raters:
      raise ValueError(
        f'{where}: scan {scan.scan_id!r} has raters {list(scan.volumes)}; '
        f'expected {list(raters)} like {scans[0].scan_id!r}.'
      )
  used, left_out, without = baseline_scans(scans, baseline)
  if not used:
    raise ValueError(
      f'{where}: no scan at baseline {baseline!r} among {[s.scan_id for s in scans]}.'
    )
  sides = np.array([[[float(v) for v in scan.volumes[r]] for r in raters] for scan in used])
  if sides.shape[2:] != (2,) or not np.all(np.isfinite(sides)) or np.any(sides < 0):
    raise ValueError(
      f'{where}: volumes must be finite, non-negative (right, left) pairs in mL;'
      f' got {sides.tolist()}.'
    )
  right, left = sides[:, :, 0], sides[:, :, 1]  # [n_scans, k_raters]
  hip_ml = np.stack([right, left], axis=1).reshape(-1, len(raters))
  hips = tuple((scan.subject, side) for scan in used for side in SIDES)
  pairs = {}
  if hip_ml.shape[0] >= 2:
    for (i, a), (j, b) in itertools.combinations(enumerate(raters), 2):
      pair = hip_ml[:, [i, j]]
      pairs[(a, b)] = HipAgreement(
        paired_difference(pair[:, 0], pair[:, 1]), coefficient_of_variation(pair)
      )
  return HipVolumeTable(
    raters=raters,
    scans=tuple(s.scan_id for s in used),
    left_out=tuple(s.scan_id for s in left_out),
    subjects_without_baseline=tuple(without),
    hips=hips,
    hip_ml=hip_ml,
    right={r: MeanSD.of(right[:, k]) for k, r in enumerate(raters)},
    left={r: MeanSD.of(left[:, k]) for k, r in enumerate(raters)},
    overall={r: MeanSD.of(hip_ml[:, k]) for k, r in enumerate(raters)},
    scan_total={r: MeanSD.of(right[:, k] + left[:, k]) for k, r in enumerate(raters)},
    pairs=pairs,
  )


def effusion_ml_by_side(
  label_map: np.ndarray, spacing: Sequence[float], effusion_value: int
) -> dict[str, float]:
  """Effusion volume (mL) on the patient's right and left and in total, from a canonical RAS+
  label map [X, Y, Z] (X toward the patient's right) with spacing in mm.

  The sides are split at the plane through the centre of the volume along X (a bilateral hip
  scan is centred on the midline); a voxel column lying exactly on that plane (odd X) counts
  half to each side, so right + left = total exactly.
  """
  label_map = np.asarray(label_map)
  if label_map.ndim != 3:
    raise ValueError(
      f'effusion_ml_by_side: label_map has shape {label_map.shape}; expected a '
      'canonical [X, Y, Z] volume'
    )
  voxel_ml = float(np.prod(np.asarray(spacing, float))) / 1000.0
  per_column = np.count_nonzero(label_map == effusion_value, axis=(1, 2)).astype(float)
  centre = (label_map.shape[0] - 1) / 2.0
  x = np.arange(label_map.shape[0])
  weight_right = np.where(x > centre, 1.0, np.where(x == centre, 0.5, 0.0))
  right = float(np.sum(per_column * weight_right)) * voxel_ml
  total = float(np.sum(per_column)) * voxel_ml
  return {'right_ml': right, 'left_ml': total - right, 'total_ml': total}
