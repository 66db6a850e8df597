"""Evaluation's tables of the femorotibial subregions (metrics/subregions.py): the summary's
truth-beside-prediction table and subregions.csv (one row per volume and source, one column per
region x measure, for a statistician)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from imask_jax.evaluation.report.cells import finite_mean_sd
from imask_jax.metrics import subregions

# The order OA papers list them: plates with their subregions, the weight-bearing condyles
# with their thirds, the totals, then the regions reported apart.
ORDER = (
  *(f'{p}MT' for p in ('', *subregions.TIBIAL_PARTS)),
  *(f'{p}LT' for p in ('', *subregions.TIBIAL_PARTS)),
  'cMF',
  *(f'{p}cMF' for p in subregions.FEMORAL_PARTS),
  'cLF',
  *(f'{p}cLF' for p in subregions.FEMORAL_PARTS),
  'MFTC',
  'LFTC',
  'FTJ',
  'TrF',
  'pMF',
  'pLF',
)
SOURCES = ('truth', 'prediction')
CSV_LEAD = ('case_id', 'source', 'side', 'side_basis')


def csv_columns() -> tuple[str, ...]:
  return CSV_LEAD + tuple(f'{r}_{m}' for r in ORDER for m in subregions.MEASURES)


def csv_rows(
  case_id: str, side: str, side_basis: str, measured: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
  """subregions.csv's rows of one volume: one per source ('truth', 'prediction')."""
  rows = []
  for source in SOURCES:
    regions = measured.get(source) or {}
    row: dict[str, Any] = dict(case_id=case_id, source=source, side=side, side_basis=side_basis)
    for region in ORDER:
      r = regions.get(region)
      for m in subregions.MEASURES:
        row[f'{region}_{m}'] = math.nan if r is None else getattr(r, m)
    rows.append(row)
  return rows


def _mean_sd(values: Sequence[float], digits: int) -> str:
  """finite_mean_sd with the count of volumes that have a value (and of those without)."""
  text = finite_mean_sd(values, digits)
  if text == 'n/a':
    return text
  n = sum(math.isfinite(v) for v in values)
  missing = len(values) - n
  return text + (f' (n={n}, {missing} without)' if missing else f' (n={n})')


def summary_table(
  cases: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]], notes: Sequence[str] = ()
) -> list[str]:
  """The summary's subregion table: per region, ThCcAB of the truth and the prediction (mean ±
  SD over volumes), their difference (prediction - truth, mean ± SD over volumes), and the
  denuded share. `cases`: (case id, {'truth': regions, 'prediction': regions})."""
  lines = [
    '## Cartilage thickness by femorotibial subregion',
    '',
    'Mean cartilage thickness over the covered subchondral bone (ThCcAB, mm) per subregion of '
    "Eckstein's nomenclature and Wirth & Eckstein's regional technique, each segmentation's "
    'regions found on its own thickness maps; the difference is prediction - truth per volume '
    '(mean ± SD over volumes); dAB: denuded share of the subchondral bone area. Definitions '
    'and the decisions made on voxel data: docs/metrics.md. Every measure of every region, '
    'per volume: subregions.csv.',
    '',
  ]
  rows = []
  for region in ORDER:
    truth, pred, diff, denuded = [], [], [], []
    for _, measured in cases:
      t = (measured.get('truth') or {}).get(region)
      p = (measured.get('prediction') or {}).get(region)
      truth.append(t.thickness_cab_mm if t else math.nan)
      pred.append(p.thickness_cab_mm if p else math.nan)
      diff.append(pred[-1] - truth[-1])
      denuded.append(t.denuded_percent if t else math.nan)
    if not any(math.isfinite(v) for v in truth + pred):
      continue
    rows.append(
      [region, _mean_sd(truth, 2), _mean_sd(pred, 2), _mean_sd(diff, 3), _mean_sd(denuded, 1)]
    )
  header = [
    'Region',
    'truth ThCcAB (mm)',
    'predicted ThCcAB (mm)',
    'difference (mm)',
    'truth dAB (%)',
  ]
  table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  table += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return lines + table + ([''] + [f'- {n}' for n in notes] if notes else [])
