"""Table cells: mean ± SD texts (the one formatter of every table), summaries of one
tissue's measure over volumes (from measurements, or from the CSV rows an evaluation wrote),
Matterport's per-slice mAP@0.5 cell, the paper's tissue abbreviations, Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from imask_jax import metrics
from imask_jax.metrics import Summary

if TYPE_CHECKING:  # rows imports the cells (through subregion_tables)
  from imask_jax.evaluation.report.rows import CaseResult


def mean_sd(mean: float, sd: float, digits: int) -> str:
  """'mean ± SD' with `digits` decimals; the mean alone where the SD is NaN (one value)."""
  return f'{mean:.{digits}f}' if math.isnan(sd) else f'{mean:.{digits}f} ± {sd:.{digits}f}'


def finite_mean_sd(values: Sequence[float], digits: int) -> str:
  """mean_sd of the finite values (sample SD, ddof=1); 'n/a' when none is finite."""
  finite = np.asarray([v for v in values if math.isfinite(v)], float)
  if not finite.size:
    return 'n/a'
  return mean_sd(finite.mean(), finite.std(ddof=1) if finite.size > 1 else math.nan, digits)


def format_summary(s: Summary, digits: int = 3) -> str:
  """'mean ± SD (n=..)', or over the finite cases with the missed / false-positive / both-empty
  counts spelled out: a missing structure is counted, never averaged away in silence."""
  if s.n == 0:
    text = 'n/a'
  elif s.n_finite == s.n:
    text = f'{mean_sd(s.mean, s.sd, digits)} (n={s.n})'
  elif s.n_finite == 0:
    text = f'none finite of {s.n}'
  else:
    text = f'{mean_sd(s.mean_finite, s.sd_finite, digits)} over {s.n_finite} of {s.n}'
  counts = [
    f'{k} {label}'
    for k, label in (
      (s.n_missed, 'missed'),
      (s.n_false_positive, 'false positive'),
      (s.n_both_empty, 'both empty'),
    )
    if k
  ]
  return text + (f'; {", ".join(counts)}' if counts else '')


def rows_cell(rows: Sequence[Mapping[str, Any]], column: str, digits: int) -> str:
  """Mean ± SD of `column` over CSV-style rows (one per volume, or per volume and seed; each
  with its empty-mask `status`): volumes where the structure is missed or falsely found enter
  the Dice, and are counted (never averaged away) for the distances, which are infinite
  there. The sweep's Table 3 and the paper tables (evaluation/paper/) use it."""
  s = metrics.summarize_values([r[column] for r in rows], [r['status'] for r in rows])
  if s.n == 0:
    return 'n/a'
  text = finite_mean_sd([r[column] for r in rows if r['status'] != 'both_empty'], digits)
  missing = s.n - s.n_finite
  return f'{text} ({missing} of {s.n} not found)' if missing else text


def tissue_abbreviation(tissue: str) -> str:
  """femoral_cartilage -> FC, femur -> F (the paper's column names)."""
  return ''.join(part[0].upper() for part in tissue.split('_') if part)


def tissue_summary(results: Sequence[CaseResult], value: int, field: str) -> Summary:
  source = 'overlap' if hasattr(results[0].overlap[value], field) else 'surface'
  per_case = [getattr(r, source)[value] for r in results]
  return metrics.summarize(per_case, field)


def slice_summary(results: Sequence[CaseResult], value: int, name: str) -> Summary | None:
  """Summary over volumes of each volume's per-slice aggregate `name` (SliceMetrics), with
  the volumes' 3D statuses; None unless every volume was measured per slice."""
  per_case = [r.slices.get(value) for r in results]
  if any(p is None for p in per_case):
    return None
  return metrics.summarize_values(
    [p.aggregate(name) for p in per_case], [p.volume_status for p in per_case]
  )


def per_volume_spread(values: Sequence[float]) -> str:
  """' [mean ± SD]' of the finite per-volume values; '' when none is finite."""
  text = finite_mean_sd(values, 3)
  return '' if text == 'n/a' else f' [{text}]'


def map50_cell(pooled: metrics.ClassAP, per_case: Sequence[metrics.ClassAP]) -> str:
  """Matterport's per-slice mAP@0.5 over all slices (with the slice count), then the mean ± SD
  of the per-volume values in brackets."""
  if math.isnan(pooled.map50_per_image):
    return 'n/a (no slice with truth)'
  return f'{pooled.map50_per_image:.3f} ({pooled.images_with_truth} slices)' + per_volume_spread(
    [c.map50_per_image for c in per_case]
  )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return lines
