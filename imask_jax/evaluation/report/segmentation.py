"""The segmentation tables of the summary: the paper's Table 3 (also in its own column
definitions), Table 4 (signed surface distances), and the missed / false-positive list."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from imask_jax import metrics
from imask_jax.evaluation.report.cells import (
  format_summary,
  map50_cell,
  markdown_table,
  per_volume_spread,
  slice_summary,
  tissue_summary,
)
from imask_jax.evaluation.report.rows import CaseResult
from imask_jax.metrics import CaseStatus, Summary

if TYPE_CHECKING:
  from data_pipelines.tissues import LabelScheme


def segmentation_tables(
  results: Sequence[CaseResult],
  scheme: LabelScheme,
  ap: Mapping[int, metrics.ClassAP],
  ap_per_case: Mapping[str, Mapping[int, metrics.ClassAP]],
) -> list[str]:
  """Table 3 (Dice, Hausdorff in voxels, ASSD, AP; tissues across), Table 3 as the paper defines
  its columns (per-slice 2D metrics, ITK's average Hausdorff, Matterport's mAP@0.5), and the
  other overlap and distance metrics, mean ± SD over volumes."""
  names = scheme.names_by_value
  class_of = scheme.class_map
  lines = [
    '## Segmentation (paper Table 3)',
    '',
    'Mean ± SD over volumes; tissues across. Dice, Hausdorff and ASSD here are 3D, on '
    "each volume's voxel grid (a slice step counts as one voxel). ASSD is the average "
    'symmetric surface distance, not a paper column: the paper\'s "Ave. Hausdorff '
    'distance" is ITK\'s average Hausdorff distance, in the next table with the '
    'per-slice values. AP is COCO mask AP (IoU 0.50:0.95) over all slices of the split, '
    'with the mean ± SD of the per-volume AP in brackets.',
    '',
  ]

  def ap_cell(value: int) -> str:
    pooled = ap[class_of[value]]
    per_case = [cases[class_of[value]].ap for cases in ap_per_case.values()]
    spread = per_volume_spread(per_case)
    return ('n/a (no truth instance)' if math.isnan(pooled.ap) else f'{pooled.ap:.3f}') + spread

  rows = [
    ['Dice'] + [format_summary(tissue_summary(results, v, 'dice')) for v in names],
    ['Hausdorff (voxels)']
    + [format_summary(tissue_summary(results, v, 'hausdorff_voxels'), 2) for v in names],
    ['ASSD (mm)'] + [format_summary(tissue_summary(results, v, 'assd_mm')) for v in names],
    ['Mask AP'] + [ap_cell(v) for v in names],
  ]
  lines += markdown_table(['Metric'] + list(names.values()), rows)
  lines += [
    '',
    'Table 3 as the paper defines its columns (mean ± SD over volumes). "2D per '
    'slice": each slice of the slicing plane on its own, pixels = in-plane spacing; per '
    'volume, Dice is the mean over the slices where truth or prediction has the tissue '
    '(a slice with it in one only counts 0), distances the mean over the slices where '
    'both have it (one-sided slices counted in the last row). "3D": the whole volume. '
    "Ave. Hausdorff = ITK / SimpleITK's average Hausdorff distance (mean of the two "
    'directed means over all voxels of one mask of the distance to the other, 0 inside '
    "it). mAP@0.5 = Matterport's per-image AP at IoU 0.5, averaged over the slices "
    'holding the tissue (all slices of the split; per-volume mean ± SD in brackets). '
    'docs/metrics.md has every definition.',
    '',
  ]

  def cell(summary: Summary | None, digits: int) -> str:
    return 'n/a (not measured per slice)' if summary is None else format_summary(summary, digits)

  def one_sided(value: int) -> str:
    per_case = [r.slices.get(value) for r in results]
    if any(p is None for p in per_case):
      return 'n/a (not measured per slice)'
    counted = sum(p.n_slices for p in per_case)
    missed = sum(p.n_missed_slices for p in per_case)
    false_positive = sum(p.n_false_positive_slices for p in per_case)
    return f'{missed} missed, {false_positive} false positive of {counted}'

  rows = [
    ['Dice, 2D per slice'] + [cell(slice_summary(results, v, 'dice'), 3) for v in names],
    ['Hausdorff (px), 2D per slice']
    + [cell(slice_summary(results, v, 'hausdorff_px'), 2) for v in names],
    ['Ave. Hausdorff (px), 2D per slice']
    + [cell(slice_summary(results, v, 'average_hausdorff_px'), 3) for v in names],
    ['Ave. Hausdorff (mm), 2D per slice']
    + [cell(slice_summary(results, v, 'average_hausdorff_mm'), 3) for v in names],
    ['Ave. Hausdorff (voxels), 3D']
    + [format_summary(tissue_summary(results, v, 'average_hausdorff_voxels')) for v in names],
    ['Ave. Hausdorff (mm), 3D']
    + [format_summary(tissue_summary(results, v, 'average_hausdorff_mm')) for v in names],
    ['mAP@0.5, per slice (Matterport)']
    + [map50_cell(ap[class_of[v]], [c[class_of[v]] for c in ap_per_case.values()]) for v in names],
    ['Slices with the tissue in one mask only (2D)'] + [one_sided(v) for v in names],
  ]
  lines += markdown_table(['As the paper defines it'] + list(names.values()), rows)
  lines += ['', 'Further metrics (mean ± SD over volumes):', '']
  more = [
    ('Precision', 'precision', 3),
    ('Recall', 'recall', 3),
    ('Jaccard', 'jaccard', 3),
    ('Hausdorff (mm)', 'hausdorff_mm', 2),
    ('HD95 (mm)', 'hd95_mm', 2),
  ]
  rows = [
    [label] + [format_summary(tissue_summary(results, v, field), digits) for v in names]
    for label, field, digits in more
  ]
  rows.append(['AP50 (all slices)'] + [f'{ap[class_of[v]].ap50:.3f}' for v in names])
  rows.append(['AP75 (all slices)'] + [f'{ap[class_of[v]].ap75:.3f}' for v in names])
  lines += markdown_table(['Metric'] + list(names.values()), rows)
  return lines


def surface_table(results: Sequence[CaseResult], scheme: LabelScheme) -> list[str]:
  """Table 4: the signed mean surface distance and its SD per volume, averaged over volumes."""
  lines = [
    '## Signed surface distance (paper Table 4)',
    '',
    'Per volume, the signed distances of both surfaces are pooled: + where the '
    'prediction lies outside the truth (over-estimation), - inside. Columns: the mean '
    "over volumes (± SD) of each volume's mean and of its SD, in mm. The paper labels "
    'its rows "GT - P" but colours over-estimation as positive, as here.',
    '',
  ]
  rows = []
  for value, name in scheme.names_by_value.items():
    rows.append(
      [
        name,
        format_summary(tissue_summary(results, value, 'signed_mean_mm')),
        format_summary(tissue_summary(results, value, 'signed_sd_mm')),
      ]
    )
  return lines + markdown_table(
    ['Tissue', 'average of mean distance (mm)', 'average of distance SD (mm)'], rows
  )


def missing_structures(results: Sequence[CaseResult], scheme: LabelScheme) -> list[str]:
  """Every volume and tissue whose prediction or truth is empty, by name."""
  lines = ['## Missed and false-positive structures', '']
  found = []
  for r in results:
    for value, name in scheme.names_by_value.items():
      status = r.overlap[value].status
      if status is not CaseStatus.OK:
        found.append(f'- {r.case_id} {name}: {status}')
  return lines + (
    found or ['None: every tissue is present in both truth and prediction of every volume.']
  )
