"""The paper's Tables 3, 4 and 6 with the models side by side, from evaluated runs' CSVs.

Each block is one measure: a row per model (its runs pooled: mean ± SD over volumes x runs),
the tissues across in the paper's order. The paper's definitions come first (per-slice Dice,
per-slice Hausdorff and ITK average Hausdorff in pixels, Matterport's mAP@0.5;
docs/reproducing.md, "Which column is which"), our 3D figures after them."""

from __future__ import annotations

import math
from collections.abc import Sequence

from imask_jax.evaluation.paper.runs import EvaluatedRun, RunError, by_model, display_name, rows_of
from imask_jax.evaluation.report.cells import (
  finite_mean_sd,
  markdown_table,
  rows_cell,
  tissue_abbreviation,
)

PAPER_TISSUE_ORDER = ('femur', 'tibia', 'femoral_cartilage', 'tibial_cartilage', 'effusion')
NOT_RECORDED = 'n/a (not in this evaluation)'
# The mask head a run of each paper name should have (a mismatch is flagged, not refused).
EXPECTED_HEADS = {'mask_rcnn': 'standard', 'imask': 'imask'}

# (title, source, column, digits): source 'metrics' = metrics.csv per volume, 'ap_case' = the
# volume's row of ap.csv, 'ap_all' = ap.csv over all slices of a run (one value per run).
PAPER_TABLE3 = (
  ('Dice, 2D per slice', 'metrics', 'dice_2d', 3),
  ('Hausdorff distance (pixel), 2D per slice', 'metrics', 'hausdorff_2d_px', 2),
  ("Ave. Hausdorff distance (pixel): ITK's average Hausdorff, 2D per slice", 'metrics',
   'average_hausdorff_2d_px', 3),
  ("Average precision: Matterport's mAP@0.5 per slice, mean ± SD over volumes", 'ap_case',
   'map50_per_image', 3),
)  # fmt: skip
OUR_TABLE3 = (
  ('Dice, 3D', 'metrics', 'dice', 3),
  ('Hausdorff (voxels), 3D', 'metrics', 'hausdorff_voxels', 2),
  ("Ave. Hausdorff (voxels): ITK's, 3D", 'metrics', 'average_hausdorff_voxels', 3),
  ('ASSD (mm), 3D', 'metrics', 'assd_mm', 3),
  ('HD95 (mm), 3D', 'metrics', 'hd95_mm', 2),
  ('COCO mask AP (IoU 0.50:0.95), all slices of a run; ± over runs', 'ap_all', 'ap', 3),
)
PAPER_TABLE6 = (
  ('Dice, 2D per slice', 'metrics', 'dice_2d', 3),
  ("Average precision: Matterport's mAP@0.5 per slice, mean ± SD over volumes", 'ap_case',
   'map50_per_image', 3),
)  # fmt: skip
OUR_TABLE6 = (
  ('Dice, 3D', 'metrics', 'dice', 3),
  ('Precision (voxels), 3D', 'metrics', 'precision', 3),
  ('Recall (voxels), 3D', 'metrics', 'recall', 3),
  ('COCO mask AP (IoU 0.50:0.95), all slices of a run; ± over runs', 'ap_all', 'ap', 3),
)
TABLE3_NOTE = (
  'Mean ± SD over the test volumes of every run of a model (volumes x seeds). "2D per slice": '
  'each slice of the slicing plane on its own, pixels = in-plane pixels; per volume, Dice is '
  'the mean over the slices where truth or prediction has the tissue, distances the mean over '
  'the slices where both have it. "3D": the whole volume, a slice step counting one voxel. '
  'A structure missed (or found where the truth has none) in a volume enters the Dice as 0 and '
  'is counted, never averaged away, for the distances ("k of n not found"). docs/metrics.md '
  'defines every measure.'
)


def tissues_of(runs: Sequence[EvaluatedRun]) -> list[str]:
  """The tissues of the runs' metrics.csv, in the paper's order (F, T, FC, TC), others after."""
  found = list(dict.fromkeys(r['tissue'] for run in runs for r in run.metrics))
  known = [t for t in PAPER_TISSUE_ORDER if t in found]
  return known + [t for t in found if t not in known]


def cell(runs: Sequence[EvaluatedRun], source: str, column: str, tissue: str, digits: int) -> str:
  """One model's cell of one measure and tissue (module docstring)."""
  if source == 'metrics':
    rows = rows_of(runs, 'metrics', tissue=tissue)
    if not rows or any(column not in r for r in rows):
      return NOT_RECORDED
    return rows_cell(rows, column, digits)
  if source == 'ap_case':
    cases = {c for run in runs for c in run.cases}
    rows = [r for r in rows_of(runs, 'ap', tissue=tissue) if r['scope'] in cases]
    if not rows or any(column not in r for r in rows):
      return NOT_RECORDED
    values = [r[column] for r in rows]
    text = finite_mean_sd(values, digits)
    unknown = sum(not math.isfinite(v) for v in values)
    return f'{text} ({unknown} of {len(values)} without a slice with truth)' if unknown else text
  rows = rows_of(runs, 'ap', tissue=tissue, scope='all')
  if not rows or any(column not in r for r in rows):
    return NOT_RECORDED
  return finite_mean_sd([r[column] for r in rows], digits)


def measure_blocks(
  runs: Sequence[EvaluatedRun], measures: Sequence[tuple[str, str, str, int]], tissues: list[str]
) -> list[str]:
  """One Markdown table per measure: a row per model, the tissues across."""
  lines: list[str] = []
  header = ['Model'] + [tissue_abbreviation(t) for t in tissues]
  for title, source, column, digits in measures:
    rows = [
      [display_name(name)] + [cell(group, source, column, t, digits) for t in tissues]
      for name, group in by_model(runs).items()
    ]
    lines += [f'### {title}', ''] + markdown_table(header, rows) + ['']
  return lines


def provenance(runs: Sequence[EvaluatedRun]) -> list[str]:
  """The evaluation folders each model's rows come from."""
  lines = ['Evaluated runs:', '']
  for name, group in by_model(runs).items():
    lines += [f'- {display_name(name)} (`{name}`): ' + '; '.join(r.describe() for r in group)]
    heads = {str(r.info.get('mask_head', '')) for r in group} - {''}
    expected = EXPECTED_HEADS.get(name)
    if expected and heads and heads != {expected}:
      lines += [f'  - CHECK: named {display_name(name)} but evaluated with mask head {heads}']
  return lines + ['']


def _legend(tissues: Sequence[str]) -> str:
  return 'Tissues: ' + ', '.join(f'{tissue_abbreviation(t)} = {t}' for t in tissues) + '.'


def table3(runs: Sequence[EvaluatedRun]) -> str:
  """Table 3: bone and cartilage segmentation, the paper's definitions then ours in 3D."""
  tissues = [t for t in tissues_of(runs) if t != 'effusion']
  if not tissues:
    raise RunError('Table 3 needs knee evaluations (femur, tibia, cartilage); the runs have none')
  lines = ['# Table 3: bone and cartilage segmentation', '', TABLE3_NOTE, '', _legend(tissues), '']
  lines += ['## As the paper defines its columns', '']
  lines += measure_blocks(runs, PAPER_TABLE3, tissues)
  lines += ['## Our 3D figures (no paper column, or a different definition)', '']
  lines += measure_blocks(runs, OUR_TABLE3, tissues)
  return '\n'.join(lines + provenance(runs))


def table4(runs: Sequence[EvaluatedRun]) -> str:
  """Table 4: signed surface distance between truth and each model, per tissue."""
  tissues = [t for t in tissues_of(runs) if t != 'effusion']
  if not tissues:
    raise RunError('Table 4 needs knee evaluations; the runs have no knee tissue')
  lines = [
    '# Table 4: surface distance between truth and prediction',
    '',
    'Per volume, the signed distances of both surfaces pooled (3D, mm): + where the prediction '
    "lies outside the truth (over-estimation), as the paper's Figure 6 colours it (red "
    'over-estimation); the paper labels its rows "GT - P". Columns: mean ± SD over volumes '
    "(x runs) of each volume's mean distance and of its SD.",
    '',
  ]
  rows = []
  for tissue in tissues:
    for name, group in by_model(runs).items():
      rows.append(
        [
          tissue_abbreviation(tissue),
          f'truth vs {display_name(name)}',
          cell(group, 'metrics', 'signed_mean_mm', tissue, 2),
          cell(group, 'metrics', 'signed_sd_mm', tissue, 2),
        ]
      )
  header = ['Tissue', 'Surfaces', 'Average of mean distance (mm)', 'Average mean distance SD (mm)']
  lines += markdown_table(header, rows) + ['', _legend(tissues), '']
  return '\n'.join(lines + provenance(runs))


def table6(runs: Sequence[EvaluatedRun]) -> str:
  """Table 6: effusion Dice and average precision, the paper's definitions then ours."""
  if 'effusion' not in tissues_of(runs):
    raise RunError('Table 6 needs effusion (hip) evaluations; the runs have no effusion tissue')
  lines = [
    '# Table 6: effusion Dice and precision',
    '',
    TABLE3_NOTE,
    '',
    '## As the paper defines its columns',
    '',
  ]
  lines += measure_blocks(runs, PAPER_TABLE6, ['effusion'])
  lines += ['## Our 3D figures', '']
  lines += measure_blocks(runs, OUR_TABLE6, ['effusion'])
  return '\n'.join(lines + provenance(runs))
