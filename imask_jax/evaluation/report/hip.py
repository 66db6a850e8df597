"""Hip effusion tables: Table 6 (effusion overlap and AP) and Table 7 (effusion volumes of the
readers and the model, per hip and per scan, with their agreement)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipelines.datasets import params as params_lib
from imask_jax import metrics
from imask_jax.evaluation.report.cells import (
  finite_mean_sd,
  format_summary,
  map50_cell,
  markdown_table,
  mean_sd,
  tissue_summary,
)
from imask_jax.evaluation.report.rows import MODEL_RATER, CaseResult

if TYPE_CHECKING:
  from data_pipelines.tissues import LabelScheme


def effusion_overlap_table(
  results: Sequence[CaseResult], scheme: LabelScheme, ap: Mapping[int, metrics.ClassAP]
) -> list[str]:
  """Table 6: effusion Dice and AP (with precision and recall)."""
  value = scheme.effusion_value
  lines = ['## Effusion segmentation (paper Table 6)', '']
  row = [format_summary(tissue_summary(results, value, f)) for f in ('dice', 'precision', 'recall')]
  pooled = ap[scheme.class_map[value]]
  row.append('n/a (no truth instance)' if math.isnan(pooled.ap) else f'{pooled.ap:.3f}')
  lines += markdown_table(
    ['Dice', 'Precision (voxels)', 'Recall (voxels)', 'Mask AP (all slices)'], [row]
  )
  return lines + [
    '',
    'Mask AP is COCO\'s (IoU 0.50:0.95). The paper\'s "average precision", '
    "Matterport's per-slice mAP at IoU 0.5 over the slices holding effusion: "
    + map50_cell(pooled, [])
    + '.',
  ]


def agreement(results: Sequence[CaseResult]) -> tuple[list[str], dict[tuple[str, str], Any] | None]:
  """The raters (readers, then model) and, with >= 2 volumes, metrics.pairwise_agreement of
  their total effusion volumes."""
  raters = [r for r in results[0].rater_ml if r != MODEL_RATER] + [MODEL_RATER]
  if len(results) < 2:
    return raters, None
  totals = {r: [res.rater_ml[r]['total_ml'] for res in results] for r in raters}
  return raters, metrics.pairwise_agreement(totals)


def _rater_matrix(raters: Sequence[str], cell: Any) -> list[list[str]]:
  """Rows a, columns b of cell(a, b) for a != b, '0' on the diagonal."""
  return [[a] + ['0' if a == b else cell(a, b) for b in raters] for a in raters]


def hip_volume_lines(
  results: Sequence[CaseResult],
  raters: Sequence[str],
  subject_pattern: str = '',
  baseline: str | None = None,
) -> list[str]:
  """Table 7 as the paper lays it out: per hip, baseline scans only (metrics.hip_volume_table),
  subjects and time points read from the case ids with `subject_pattern`."""
  scans = []
  for res in results:
    subject, timepoint = params_lib.subject_and_timepoint(res.case_id, subject_pattern)
    scans.append(
      metrics.ScanVolumes(
        res.case_id,
        subject,
        timepoint,
        {r: (res.rater_ml[r]['right_ml'], res.rater_ml[r]['left_ml']) for r in raters},
      )
    )
  table = metrics.hip_volume_table(scans, baseline)
  used = f'{len(table.scans)} of {len(results)} scans, one per subject' + (
    f' (left out, not at baseline: {", ".join(table.left_out)})' if table.left_out else ''
  )
  lines = [
    '## Effusion volumes (paper Table 7)',
    '',
    'Per hip, at baseline, as the paper lays it out (mL): ' + used + '. Right / Left: '
    'mean ± SD over the right (left) hips; Overall: over all their hips pooled, one value '
    "per hip (the paper's 7.72 and 6.17 give 6.94). Sides split at the mid-sagittal "
    'plane of the scan (the centre of the canonical left-right axis).',
    '',
  ]
  rows = [
    [
      r,
      mean_sd(table.right[r].mean, table.right[r].sd, 2),
      mean_sd(table.left[r].mean, table.left[r].sd, 2),
      mean_sd(table.overall[r].mean, table.overall[r].sd, 2),
    ]
    for r in raters
  ]
  lines += markdown_table(['Rater', 'Right', 'Left', 'Overall'], rows)

  def pair(a: str, b: str) -> metrics.HipAgreement:
    return table.pairs[(a, b)] if (a, b) in table.pairs else table.pairs[(b, a)]

  def difference(a: str, b: str) -> str:
    d = pair(a, b).difference
    return mean_sd(d.mean_abs_difference, d.sd_abs_difference, 2)

  def cov(a: str, b: str) -> str:
    c = pair(a, b).cov
    zero = f' ({c.n_zero_mean} all-zero)' if c.n_zero_mean else ''
    return f'{c.rms_cov:.2f} / {c.mean_cov:.2f}{zero}'

  lines += [
    '',
    f'Difference per hip: mean |a - b| ± SD over the {len(table.hips)} hips (mL), row a, column b.',
    '',
  ]
  lines += markdown_table(['Rater'] + list(raters), _rater_matrix(raters, difference))
  lines += [
    '',
    "CoV per hip between two raters: CoV_i = SD_i / mean_i of hip i's two "
    'measurements (SD_i = |a_i - b_i| / sqrt(2)); RMS CoV / mean CoV over the hips. '
    'Hips both raters measure 0 have no CoV and are counted.',
    '',
  ]
  return lines + markdown_table(['Rater'] + list(raters), _rater_matrix(raters, cov))


def effusion_volume_table(
  results: Sequence[CaseResult], subject_pattern: str = '', baseline: str | None = None
) -> list[str]:
  """Table 7 per hip at baseline (the paper's layout, `hip_volume_lines`), then the scan totals
  of every volume (a named extra): volumes per rater (right, left, total), |difference| and
  CoV between raters, ICC(2,1), ICC(3,1) and Bland-Altman bias and limits."""
  raters, pairs = agreement(results)
  lines = hip_volume_lines(results, raters, subject_pattern, baseline) + ['']
  lines += [
    '## Effusion volumes: scan totals (not a paper column)',
    '',
    'Every volume of the split, one value per scan; volumes in mL, mean ± SD over '
    'volumes. Scan total = right + left.',
    '',
  ]
  rows = []
  for rater in raters:
    cells = []
    for side in ('right_ml', 'left_ml', 'total_ml'):
      cells.append(finite_mean_sd([res.rater_ml[rater][side] for res in results], 2))
    rows.append([rater] + cells)
  lines += markdown_table(['Rater', 'Right', 'Left', 'Scan total'], rows)
  if pairs is None:
    return lines + ['', f'Agreement statistics need >= 2 volumes; the split has {len(results)}.']

  def pair(a: str, b: str):
    return (pairs[(a, b)], 1.0) if (a, b) in pairs else (pairs[(b, a)], -1.0)

  lines += [
    '',
    'Difference in volumes (scan totals): mean |a - b| ± SD over volumes (mL), row a, column b.',
    '',
  ]

  def difference_cell(a: str, b: str) -> str:
    d = pair(a, b)[0].difference
    return mean_sd(d.mean_abs_difference, d.sd_abs_difference, 2)

  lines += markdown_table(['Rater'] + raters, _rater_matrix(raters, difference_cell))
  lines += [
    '',
    'CoV between two raters: per volume CoV_i = SD_i / mean_i of its two '
    'measurements (SD_i = |a_i - b_i| / sqrt(2), the sample SD); reported as RMS CoV = '
    'sqrt(mean_i CoV_i^2) / mean CoV = mean_i CoV_i. Volumes where both raters measure '
    '0 have no CoV and are counted.',
    '',
  ]

  def cov_cell(a: str, b: str) -> str:
    cov = pair(a, b)[0].cov
    zero = f' ({cov.n_zero_mean} all-zero)' if cov.n_zero_mean else ''
    return f'{cov.rms_cov:.2f} / {cov.mean_cov:.2f}{zero}'

  lines += markdown_table(['Rater'] + raters, _rater_matrix(raters, cov_cell))
  lines += [
    '',
    'ICC of total volumes (two-way ANOVA, Shrout & Fleiss): ICC(2,1) absolute '
    'agreement, ICC(3,1) consistency; Bland-Altman bias a - b and 95% limits of '
    'agreement (mL).',
    '',
  ]
  rows = []
  for (a, b), p in pairs.items():
    ba = p.bland_altman
    rows.append(
      [
        f'{a} vs {b}',
        f'{p.icc.icc_2_1:.3f}',
        f'{p.icc.icc_3_1:.3f}',
        f'{ba.bias:+.2f}',
        f'[{ba.loa_lower:+.2f}, {ba.loa_upper:+.2f}]',
      ]
    )
  lines += markdown_table(
    ['Pair', 'ICC(2,1)', 'ICC(3,1)', 'bias (mL)', 'limits of agreement (mL)'], rows
  )
  table = np.array([[res.rater_ml[r]['total_ml'] for r in raters] for res in results])
  icc = metrics.intraclass_correlation(table)
  lines += [
    '',
    f'All {len(raters)} raters together: ICC(2,1) {icc.icc_2_1:.3f}, ICC(3,1) {icc.icc_3_1:.3f}.',
  ]
  return lines
