"""Knee cartilage tables: Table 5 (prediction - truth thickness maps) and the coverage of the
thickness maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from imask_jax import metrics
from imask_jax.evaluation.report.cells import format_summary, markdown_table
from imask_jax.evaluation.report.rows import CaseResult, thickness_plates
from imask_jax.metrics import CaseStatus

if TYPE_CHECKING:
  pass

THICKNESS_METHOD_TEXT = {
  'nearest': 'at each bone-cartilage interface point, the distance to the nearest articular '
  'surface point (reads low on voxel staircases)',
  'normal': 'at each bone-cartilage interface point, the distance along the normal of the '
  'smoothed interface to the smoothed articular surface',
}


def thickness_table(results: Sequence[CaseResult], method: str) -> list[str]:
  """Table 5: prediction - truth thickness map differences, averaged over volumes; `method`
  is the thickness measure both maps were made with (metrics.interface_thickness)."""
  lines = [
    '## Cartilage thickness (paper Table 5)',
    '',
    'Per volume and plate, the prediction - truth difference map (cells where both '
    'have cartilage); mean over volumes (± SD) of its mean and of its SD, in mm. The '
    'paper\'s rows read "GT - prediction": flip the sign of the first column to '
    f'compare. Thickness measure {method!r}: {THICKNESS_METHOD_TEXT[method]} '
    '(docs/metrics.md).',
    '',
  ]
  rows = []
  for plate in thickness_plates(results):
    comparisons = [r.thickness[plate] for r in results if plate in (r.thickness or ())]
    not_measured = [r.case_id for r in results if r.thickness is None]
    note = f'; {len(not_measured)} not measured ({", ".join(not_measured)})' if not_measured else ''
    if not comparisons:
      rows.append([plate, 'n/a' + note, 'n/a', 'n/a', 'n/a'])
      continue
    statuses = [c.status for c in comparisons]
    mean_diff = metrics.summarize_values([c.difference.mean_mm for c in comparisons], statuses)
    sd_diff = metrics.summarize_values([c.difference.sd_mm for c in comparisons], statuses)
    truth_mean = metrics.summarize_values(
      [c.truth.mean_thickness_mm for c in comparisons], [CaseStatus.OK] * len(comparisons)
    )
    pred_mean = metrics.summarize_values([c.pred.mean_thickness_mm for c in comparisons], statuses)
    rows.append(
      [
        plate,
        format_summary(mean_diff) + note,
        format_summary(sd_diff),
        format_summary(truth_mean, 2),
        format_summary(pred_mean, 2),
      ]
    )
  return (
    lines
    + markdown_table(
      [
        'Plate',
        'average of mean differences (mm)',
        'average of SD of differences (mm)',
        'truth mean thickness (mm)',
        'predicted mean thickness (mm)',
      ],
      rows,
    )
    + ['']
    + thickness_coverage_table(results)
  )


def thickness_coverage_table(results: Sequence[CaseResult]) -> list[str]:
  """Coverage of Table 5's maps: a region the prediction misses has no difference, so the
  mean difference alone can never show it."""
  lines = [
    '### Coverage of the thickness maps',
    '',
    'Per volume and plate, the map cells with cartilage in both maps (the cells Table 5 '
    'compares), in the truth only (missed by the prediction) and in the prediction only, '
    "as fractions of the truth's cells; mean over volumes (± SD).",
    '',
  ]
  rows = []
  for plate in thickness_plates(results):
    comparisons = [r.thickness[plate] for r in results if plate in (r.thickness or ())]
    if not comparisons:
      rows.append([plate, 'n/a', 'n/a', 'n/a', 'n/a'])
      continue
    statuses = [c.status for c in comparisons]
    cells = []
    for field, digits in (
      ('both_fraction', 3),
      ('truth_only_fraction', 3),
      ('pred_only_fraction', 3),
      ('truth_cells', 0),
    ):
      values = [
        math.nan if c.difference.coverage is None else getattr(c.difference.coverage, field)
        for c in comparisons
      ]
      cells.append(format_summary(metrics.summarize_values(values, statuses), digits))
    rows.append([plate] + cells)
  return lines + markdown_table(
    ['Plate', 'compared (both)', 'truth only (missed)', 'prediction only', 'truth cells'], rows
  )
