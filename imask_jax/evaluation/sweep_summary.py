"""A sweep's summary from its evaluated runs: summary.csv rows (each run's metrics.csv with its
volumes' AP), and summary.md: the Table 3 layout per variant (mean +- SD over test volumes x
seeds), COCO mask AP pooled per run, and each variant paired against its baseline per tissue
and metric (mean difference with its 95 % t-interval, two-sided Wilcoxon signed-rank p over
(seed, volume) pairs), and once more at the paper's granularity (one value per tissue).
`sweep.aggregate` finds the runs' evaluations and writes these files; docs/sweeps.md."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

if TYPE_CHECKING:
  from imask_jax.sweep import Run

SUMMARY_COLUMNS = (
  'variant',
  'seed',
  'case_id',
  'tissue',
  'status',
  'dice',
  'precision',
  'recall',
  'hausdorff_voxels',
  'average_hausdorff_voxels',
  'hausdorff_mm',
  'hd95_mm',
  'assd_mm',
  'signed_mean_mm',
  'ap',
  'thickness_offset_mm',
  'abs_thickness_offset_mm',
  'thickness_sd_mm',
  'volume_error_ml',
  'abs_volume_error_ml',
)
# Filled from thickness.csv (a cartilage's plate) and volumes.csv (effusion), NaN elsewhere.
ENDPOINT_COLUMNS = SUMMARY_COLUMNS[-5:]
# Columns that evaluations made before they existed lack: read as NaN ('n/a' in the tables).
LATER_COLUMNS = ('average_hausdorff_voxels',)
# (column, label, digits) of the Table 3 layout, tissues across within each: the paper's
# columns with the paper's definitions (Ave. Hausdorff: ITK's average Hausdorff distance).
TABLE3_METRICS = (
  ('dice', 'Dice', 3),
  ('hausdorff_voxels', 'Hausdorff (px)', 2),
  ('average_hausdorff_voxels', 'Ave. Hausdorff (px)', 3),
  ('assd_mm', 'ASSD (mm)', 3),
  ('ap', 'AP', 3),
)
# (column, label, digits) compared pairwise between a variant and its baseline.
PAIRED_METRICS = (
  ('dice', 'Dice', 4),
  ('assd_mm', 'ASSD (mm)', 3),
  ('hausdorff_voxels', 'Hausdorff (px)', 2),
)
# The endpoints beside the paper's columns: the table of each tissue that has them, and the
# paired comparisons (a signed offset is compared by its size: closer to the truth is better).
ENDPOINT_METRICS = (
  ('hd95_mm', 'HD95 (mm)', 2),
  ('thickness_offset_mm', 'Thickness offset (mm)', 3),
  ('thickness_sd_mm', 'Thickness SD (mm)', 3),
  ('volume_error_ml', 'Volume error (mL)', 3),
)
PAIRED_ENDPOINTS = (
  ('hd95_mm', 'HD95 (mm)', 2),
  ('abs_thickness_offset_mm', 'Abs. thickness offset (mm)', 3),
  ('thickness_sd_mm', 'Thickness SD (mm)', 3),
  ('abs_volume_error_ml', 'Abs. volume error (mL)', 3),
)


def _float(text: str) -> float:
  return float(text) if text != '' else math.nan


def run_rows(run: Run, eval_dir: str) -> list[dict[str, Any]]:
  """The summary.csv rows of one finished run: its metrics.csv rows with the volume's AP."""
  with open(os.path.join(eval_dir, 'ap.csv'), newline='') as f:
    ap = {(row['scope'], row['tissue']): _float(row['ap']) for row in csv.DictReader(f)}
  rows = []
  with open(os.path.join(eval_dir, 'metrics.csv'), newline='') as f:
    for row in csv.DictReader(f):
      out = {
        'variant': run.variant,
        'seed': run.seed,
        'case_id': row['case_id'],
        'tissue': row['tissue'],
        'status': row['status'],
        'ap': ap.get((row['case_id'], row['tissue']), math.nan),
      }
      for column in SUMMARY_COLUMNS:
        if column in ENDPOINT_COLUMNS:
          out[column] = math.nan
        elif column not in out:
          out[column] = _float(row.get(column, '') if column in LATER_COLUMNS else row[column])
      rows.append(out)
  by_key = {(r['case_id'], r['tissue']): r for r in rows}
  for (case_id, tissue), values in _endpoints(eval_dir).items():
    if (case_id, tissue) in by_key:
      by_key[case_id, tissue].update(values)
  return rows


def _endpoints(eval_dir: str) -> dict[tuple[str, str], dict[str, float]]:
  """(case, tissue) -> endpoint columns: each plate's thickness difference map (mean:
  prediction - truth, mm; SD over its cells) on its cartilage's row, from thickness.csv; the
  total effusion volume's error (model - reference, mL) on the effusion row, from
  volumes.csv. Files an evaluation did not write give nothing."""
  from data_pipelines.tissues import EFFUSION, PLATES

  out: dict[tuple[str, str], dict[str, float]] = {}
  path = os.path.join(eval_dir, 'thickness.csv')
  if os.path.exists(path):
    with open(path, newline='') as f:
      for row in csv.DictReader(f):
        if row['status'] != 'ok' or row['plate'] not in PLATES:
          continue
        offset = _float(row['difference_mean_mm'])
        out[row['case_id'], PLATES[row['plate']][1]] = {
          'thickness_offset_mm': offset,
          'abs_thickness_offset_mm': abs(offset),
          'thickness_sd_mm': _float(row['difference_sd_mm']),
        }
  path = os.path.join(eval_dir, 'volumes.csv')
  if os.path.exists(path):
    totals: dict[str, dict[str, float]] = {}
    with open(path, newline='') as f:
      for row in csv.DictReader(f):
        totals.setdefault(row['case_id'], {})[row['rater']] = _float(row['total_ml'])
    for case_id, by_rater in totals.items():
      if 'model' in by_rater and 'reference' in by_rater:
        error = by_rater['model'] - by_rater['reference']
        out[case_id, EFFUSION] = {'volume_error_ml': error, 'abs_volume_error_ml': abs(error)}
  return out


def _has_values(rows: Sequence[Mapping[str, Any]], column: str, tissue: str | None = None) -> bool:
  """Whether any row (of `tissue`) has a finite `column`: an endpoint a tissue has."""
  return any(math.isfinite(r[column]) for r in rows if tissue is None or r['tissue'] == tissue)


def pooled_ap(eval_dir: str) -> dict[str, float]:
  """COCO mask AP per tissue over all slices of the run's split (ap.csv scope 'all')."""
  with open(os.path.join(eval_dir, 'ap.csv'), newline='') as f:
    return {row['tissue']: _float(row['ap']) for row in csv.DictReader(f) if row['scope'] == 'all'}


def wilcoxon(differences: Sequence[float]) -> float:
  """Two-sided Wilcoxon signed-rank p of paired differences (exact for small n without ties;
  1.0 when every difference is zero; NaN for fewer than two pairs)."""
  from scipy import stats

  d = np.asarray(differences, float)
  if d.size < 2:
    return math.nan
  if np.all(d == 0):
    return 1.0
  return float(stats.wilcoxon(d).pvalue)


def paired_differences(
  rows: Sequence[Mapping[str, Any]], variant: str, baseline: str, tissue: str, column: str
) -> tuple[list[float], int]:
  """Differences variant - baseline of one tissue and metric over the (seed, case) pairs both
  have (a structure empty in both is no pair), and how many pairs were dropped because a value
  is not finite (e.g. a distance to a structure one of them missed)."""

  def values(name):
    return {
      (r['seed'], r['case_id']): r[column]
      for r in rows
      if r['variant'] == name and r['tissue'] == tissue and r['status'] != 'both_empty'
    }

  a, b = values(variant), values(baseline)
  keys = sorted(set(a) & set(b))
  finite = [k for k in keys if math.isfinite(a[k]) and math.isfinite(b[k])]
  return [a[k] - b[k] for k in finite], len(keys) - len(finite)


def mean_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """The t-interval of the mean paired difference (NaNs for fewer than two pairs)."""
  from scipy import stats

  d = np.asarray(differences, float)
  if d.size < 2:
    return math.nan, math.nan
  if np.all(d == d[0]):  # no spread: the interval is the point
    return float(d[0]), float(d[0])
  interval = stats.ttest_1samp(d, 0.0).confidence_interval(level)
  return float(interval.low), float(interval.high)


def paired_comparison(
  rows: Sequence[Mapping[str, Any]], variant: str, baseline: str, tissue: str, column: str
) -> tuple[int, float, float, int, tuple[float, float]]:
  """Pairs of (seed, case) values of `variant` and `baseline` for one tissue and metric.

  Returns (pairs, mean of variant - baseline, Wilcoxon p, pairs dropped as not finite, the
  mean's 95 % t-interval)."""
  d, dropped = paired_differences(rows, variant, baseline, tissue, column)
  mean = float(np.mean(d)) if d else math.nan
  return len(d), mean, wilcoxon(d), dropped, mean_interval(d)


def tissue_level_comparison(
  rows: Sequence[Mapping[str, Any]],
  variant: str,
  baseline: str,
  tissues: Sequence[str],
  column: str,
) -> tuple[int, float, float]:
  """The paper's granularity: one value per tissue (the mean paired difference over its
  (seed, case) pairs), tested over the tissues. Returns (tissues with pairs, mean of their
  differences, Wilcoxon p); with 4 tissues the smallest possible p is 2 / 2^4 = 0.125."""
  per_tissue = []
  for tissue in tissues:
    d, _ = paired_differences(rows, variant, baseline, tissue, column)
    if d:
      per_tissue.append(float(np.mean(d)))
  mean = float(np.mean(per_tissue)) if per_tissue else math.nan
  return len(per_tissue), mean, wilcoxon(per_tissue)


def summary_markdown(
  sweep: ml_collections.ConfigDict,
  runs: Sequence[Run],
  rows: Sequence[Mapping[str, Any]],
  ap_by_run: Mapping[str, Mapping[str, float]],
  missing: Sequence[str],
) -> str:
  from imask_jax.evaluation.report import finite_mean_sd, markdown_table
  from imask_jax.evaluation.report.cells import rows_cell, tissue_abbreviation

  tissues = list(dict.fromkeys(r['tissue'] for r in rows))
  variants = [str(v[0]) for v in sweep.variants]
  seeds = list(sweep.seeds)
  lines = [
    '# Sweep summary',
    '',
    f'- base experiment: `{sweep.experiment}` with `{sweep.base_arg or "(no argument)"}`',
    f'- study: {sweep.get("study", "")}; seeds: {", ".join(str(s) for s in seeds)}; '
    f'split: {sweep.split}',
    f'- runs finished: {len(runs) - len(missing)} of {len(runs)}'
    + (f' (not yet: {", ".join(missing)})' if missing else ''),
    '',
    "## Segmentation (laid out like the paper's Table 3)",
    '',
    "Mean ± SD over test volumes and seeds (3D, on each volume's grid). Hausdorff and "
    'Ave. Hausdorff in pixels (voxels, unit spacing) as in the paper; Ave. Hausdorff is '
    "ITK's average Hausdorff distance, the paper's definition (docs/metrics.md). ASSD, "
    'the average symmetric surface distance in mm, is our boundary measure and no paper '
    "column. Per-slice (2D) figures: each run's summary.md. AP: COCO mask AP (IoU "
    '0.50:0.95) over all test slices of a run, mean ± SD over seeds.',
    '',
  ]
  header = ['Variant'] + [
    f'{label} {tissue_abbreviation(t)}' for _, label, _ in TABLE3_METRICS for t in tissues
  ]
  table = []
  for variant in variants:
    own = [r for r in rows if r['variant'] == variant]
    if not own:
      continue
    cells = [variant]
    for column, _, digits in TABLE3_METRICS:
      for tissue in tissues:
        if column == 'ap':
          cells.append(
            finite_mean_sd(
              [
                ap_by_run[f'{variant}/seed{s}'].get(tissue, math.nan)
                for s in seeds
                if f'{variant}/seed{s}' in ap_by_run
              ],
              digits,
            )
          )
        else:
          cells.append(rows_cell([r for r in own if r['tissue'] == tissue], column, digits))
    table.append(cells)
  lines += markdown_table(header, table)
  lines += [
    '',
    'Tissues: ' + ', '.join(f'{tissue_abbreviation(t)} = {t}' for t in tissues),
  ]
  lines += _endpoint_table(variants, tissues, rows)
  lines += [
    '',
    '## Paired comparisons',
    '',
    'Each variant against its baseline over the same test volumes and seeds: the mean '
    'difference (variant − baseline; Dice higher is better, distances lower) and the '
    'two-sided Wilcoxon signed-rank p, and in brackets the 95 % t-interval of the mean '
    'difference. With n pairs the smallest possible p is 2 / 2^n (0.0625 for 5), so a '
    'handful of volumes cannot reach 0.05 whatever the effect: add seeds or volumes for a '
    'test with power.',
    '',
  ]

  def signed(value: float, digits: int) -> str:
    return 'n/a' if math.isnan(value) else f'{value:+.{digits}f}'

  compared = PAIRED_METRICS + tuple(m for m in PAIRED_ENDPOINTS if _has_values(rows, m[0]))
  header = ['Variant', 'Baseline', 'Tissue', 'n'] + [
    f'{h} {label}' for _, label, _ in compared for h in ('Δ', 'p')
  ]
  table = []
  for name, _, baseline in sweep.variants:
    if not baseline:
      continue
    for tissue in tissues:
      cells, count, dropped = [], 0, 0
      for column, _, digits in compared:
        if not _has_values(rows, column, tissue):  # an endpoint this tissue does not have
          cells += ['n/a', 'n/a']
          continue
        n, mean, p, lost, (low, high) = paired_comparison(rows, name, baseline, tissue, column)
        count, dropped = max(count, n), max(dropped, lost)
        delta = 'n/a' if not n else signed(mean, digits)
        if n >= 2:
          delta += f' [{signed(low, digits)}, {signed(high, digits)}]'
        cells += [delta, 'n/a' if math.isnan(p) else f'{p:.3g}']
      if count:
        table.append(
          [
            name,
            baseline,
            tissue_abbreviation(tissue),
            f'{count}' + (f' ({dropped} dropped)' if dropped else ''),
          ]
          + cells
        )
  if not table:
    lines.append('No comparison has finished runs on both sides yet.')
    return '\n'.join(lines) + '\n'
  lines += markdown_table(header, table)
  if len(tissues) < 2:  # one value per tissue is no test
    return '\n'.join(lines) + '\n'
  lines += [
    '',
    "## At the paper's granularity",
    '',
    'One value per tissue (its mean paired difference), the signed-rank test over the '
    'tissues: the test the paper\'s "p < 0.125" most likely was (the floor for 4 values). '
    'It cannot reach 0.05 with four tissues; the per-tissue table above is the test with power.',
    '',
  ]
  header = ['Variant', 'Baseline', 'Tissues'] + [
    f'{h} {label}' for _, label, _ in PAIRED_METRICS for h in ('Δ', 'p')
  ]
  table = []
  for name, _, baseline in sweep.variants:
    if not baseline:
      continue
    cells, count = [], 0
    for column, _, digits in PAIRED_METRICS:
      n, mean, p = tissue_level_comparison(rows, name, baseline, tissues, column)
      count = max(count, n)
      cells += [signed(mean, digits), 'n/a' if math.isnan(p) else f'{p:.3g}']
    if count:
      table.append([name, baseline, str(count)] + cells)
  lines += markdown_table(header, table)
  return '\n'.join(lines) + '\n'


def _endpoint_table(
  variants: Sequence[str], tissues: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> list[str]:
  """Markdown lines of the endpoints each tissue has (mean ± SD over test volumes and seeds),
  or none when no tissue has one."""
  from imask_jax.evaluation.report import markdown_table
  from imask_jax.evaluation.report.cells import rows_cell, tissue_abbreviation

  columns = [
    (column, label, digits, tissue)
    for column, label, digits in ENDPOINT_METRICS
    for tissue in tissues
    if _has_values(rows, column, tissue)
  ]
  if not columns:
    return []
  header = ['Variant'] + [f'{label} {tissue_abbreviation(t)}' for _, label, _, t in columns]
  table = []
  for variant in variants:
    own = [r for r in rows if r['variant'] == variant]
    if own:
      table.append(
        [variant]
        + [
          rows_cell([r for r in own if r['tissue'] == t], column, digits)
          for column, _, digits, t in columns
        ]
      )
  return [
    '',
    '## Surface distance, thickness and volume',
    '',
    'Mean ± SD over test volumes and seeds. HD95: the 95th percentile of the symmetric '
    "surface distances, mm. Thickness offset: the mean of a plate's prediction − truth "
    "thickness difference map, mm (thickness.csv); thickness SD: that map's SD over its "
    'cells. Volume error: predicted − reference total effusion volume, mL (volumes.csv). '
    'The paired comparisons below compare an offset or a volume error by its size.',
    '',
    *markdown_table(header, table),
  ]
