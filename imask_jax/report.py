"""Tables of an evaluation: the CSV rows and the paper-style summary.md (Tables 3-7).

Everything here takes measurements that are already made (`CaseResult`, mask AP) and lays them
out; nothing measures, nothing draws. `evaluate.py` measures and writes through these
functions, `sweep.py` builds its comparison tables from the same pieces. docs/evaluation.md
describes every column.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipelines import tissues
from data_pipelines.atomic import atomic_path
from data_pipelines.datasets import params as params_lib
from imask_jax import metrics, subregion_tables
from imask_jax.metrics import CaseStatus, Summary

if TYPE_CHECKING:
  from data_pipelines.tissues import LabelScheme

METRICS_COLUMNS = (
  'case_id',
  'tissue',
  'label_value',
  'status',
  'dice',
  'jaccard',
  'precision',
  'recall',
  'true_positive_voxels',
  'false_positive_voxels',
  'false_negative_voxels',
  'hausdorff_mm',
  'hd95_mm',
  'assd_mm',
  'signed_mean_mm',
  'signed_sd_mm',
  'hausdorff_voxels',
  'average_hausdorff_mm',
  'average_hausdorff_voxels',
  'dice_2d',
  'hausdorff_2d_px',
  'hausdorff_2d_mm',
  'average_hausdorff_2d_px',
  'average_hausdorff_2d_mm',
  'slices_2d',
  'slices_2d_missed',
  'slices_2d_false_positive',
  'truth_ml',
  'pred_ml',
)
# metrics.csv per-slice columns -> the SliceMetrics aggregate they hold.
SLICE_COLUMNS = {
  'dice_2d': 'dice',
  'hausdorff_2d_px': 'hausdorff_px',
  'hausdorff_2d_mm': 'hausdorff_mm',
  'average_hausdorff_2d_px': 'average_hausdorff_px',
  'average_hausdorff_2d_mm': 'average_hausdorff_mm',
}
AP_COLUMNS = (
  'scope',
  'tissue',
  'class_id',
  'ap',
  'ap50',
  'ap75',
  'truth_instances',
  'detections',
  'map50_per_image',
  'images_with_truth',
)
THICKNESS_COLUMNS = (
  'case_id',
  'plate',
  'status',
  'truth_mean_mm',
  'pred_mean_mm',
  'difference_mean_mm',
  'difference_sd_mm',
  'cells_compared',
  'cells_truth_only',
  'cells_pred_only',
  'fraction_compared',
  'fraction_truth_only',
  'fraction_pred_only',
  'note',
)
VOLUME_COLUMNS = ('case_id', 'rater', 'right_ml', 'left_ml', 'total_ml')
MODEL_RATER = 'model'
PLATES = tuple(tissues.PLATES)  # 'femoral', 'tibial'
AP_RESOLUTION = (
  'source slice resolution: detections pasted into the original slice, truth '
  'instances from the original label slice'
)


# --- one volume's measurements -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CaseResult:
  """Every measurement of one volume. Dicts are keyed by label value (tissues) or plate name;
  rater_ml maps a rater (reader or 'model') to its right / left / total effusion in mL; slices
  holds the per-slice 2D metrics along the slicing plane (empty when not measured)."""

  case_id: str
  overlap: dict[int, metrics.OverlapMetrics]
  surface: dict[int, metrics.SurfaceMetrics]
  truth_ml: dict[int, float]
  pred_ml: dict[int, float]
  thickness: dict[str, metrics.PlateComparison] | None = None
  thickness_note: str = ''
  rater_ml: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  slices: dict[int, metrics.SliceMetrics] = dataclasses.field(default_factory=dict)
  # Knees: the side the subregions were named with and its basis, and per source ('truth',
  # 'prediction') the femorotibial subregions' measures (metrics/subregions.py); a note says
  # why a source has none.
  side: str = ''
  side_basis: str = ''
  subregions: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  subregion_note: str = ''
  # Where the labels split medial and lateral tibial cartilage (OAIZIB-CM): the share of those
  # voxels the geometric MT / LT split puts on the same side.
  split_agreement: float | None = None


def metrics_rows(result: CaseResult, scheme: LabelScheme) -> list[dict[str, Any]]:
  """The metrics.csv rows of one volume (one per tissue, METRICS_COLUMNS)."""
  rows = []
  for value, name in scheme.names_by_value.items():
    o, s = result.overlap[value], result.surface[value]
    rows.append(
      {
        'case_id': result.case_id,
        'tissue': name,
        'label_value': value,
        'status': str(o.status),
        'dice': o.dice,
        'jaccard': o.jaccard,
        'precision': o.precision,
        'recall': o.recall,
        'true_positive_voxels': o.true_positive,
        'false_positive_voxels': o.false_positive,
        'false_negative_voxels': o.false_negative,
        'hausdorff_mm': s.hausdorff_mm,
        'hd95_mm': s.hd95_mm,
        'assd_mm': s.assd_mm,
        'signed_mean_mm': s.signed_mean_mm,
        'signed_sd_mm': s.signed_sd_mm,
        'hausdorff_voxels': s.hausdorff_voxels,
        'average_hausdorff_mm': s.average_hausdorff_mm,
        'average_hausdorff_voxels': s.average_hausdorff_voxels,
        **_slice_columns(result.slices.get(value)),
        'truth_ml': result.truth_ml[value],
        'pred_ml': result.pred_ml[value],
      }
    )
  return rows


def _slice_columns(sliced: metrics.SliceMetrics | None) -> dict[str, Any]:
  """The per-slice columns of one tissue's metrics.csv row (NaN / blank when not measured)."""
  if sliced is None:
    return {
      **{c: math.nan for c in SLICE_COLUMNS},
      'slices_2d': None,
      'slices_2d_missed': None,
      'slices_2d_false_positive': None,
    }
  return {
    **{c: sliced.aggregate(name) for c, name in SLICE_COLUMNS.items()},
    'slices_2d': sliced.n_slices,
    'slices_2d_missed': sliced.n_missed_slices,
    'slices_2d_false_positive': sliced.n_false_positive_slices,
  }


def thickness_plates(results: Sequence[CaseResult]) -> tuple[str, ...]:
  """The plates measured: 'femoral', 'tibial', then any part measured as a plate of its own
  (a scheme that trains medial and lateral tibial cartilage apart), in the order found."""
  plates = list(PLATES)
  for r in results:
    plates += [p for p in r.thickness or () if p not in plates]
  return tuple(plates)


def thickness_rows(result: CaseResult) -> list[dict[str, Any]]:
  """The thickness.csv rows of one knee volume (one per plate, THICKNESS_COLUMNS)."""
  rows = []
  for plate in thickness_plates([result]):
    if result.thickness is None:
      rows.append(
        {
          'case_id': result.case_id,
          'plate': plate,
          'status': 'not_measured',
          'truth_mean_mm': math.nan,
          'pred_mean_mm': math.nan,
          'difference_mean_mm': math.nan,
          'difference_sd_mm': math.nan,
          'cells_compared': 0,
          **_coverage_columns(None),
          'note': result.thickness_note,
        }
      )
      continue
    c = result.thickness[plate]
    rows.append(
      {
        'case_id': result.case_id,
        'plate': plate,
        'status': str(c.status),
        'truth_mean_mm': c.truth.mean_thickness_mm,
        'pred_mean_mm': c.pred.mean_thickness_mm,
        'difference_mean_mm': c.difference.mean_mm,
        'difference_sd_mm': c.difference.sd_mm,
        'cells_compared': c.difference.n_cells,
        **_coverage_columns(c.difference.coverage),
        'note': '',
      }
    )
  return rows


def _coverage_columns(coverage: metrics.ThicknessCoverage | None) -> dict[str, Any]:
  """thickness.csv's coverage columns: map cells only the truth / only the prediction has
  cartilage in, and the compared / truth-only / prediction-only cells as fractions of the
  truth's cells (blank / NaN when not measured)."""
  if coverage is None:
    return {
      'cells_truth_only': None,
      'cells_pred_only': None,
      'fraction_compared': math.nan,
      'fraction_truth_only': math.nan,
      'fraction_pred_only': math.nan,
    }
  return {
    'cells_truth_only': coverage.truth_only,
    'cells_pred_only': coverage.pred_only,
    'fraction_compared': coverage.both_fraction,
    'fraction_truth_only': coverage.truth_only_fraction,
    'fraction_pred_only': coverage.pred_only_fraction,
  }


# --- tables --------------------------------------------------------------------------------------


def format_summary(s: Summary, digits: int = 3) -> str:
  """'mean ± SD (n=..)', or over the finite cases with the missed / false-positive / both-empty
  counts spelled out: a missing structure is counted, never averaged away in silence."""

  def number(x: float) -> str:
    return f'{x:.{digits}f}' if math.isfinite(x) else str(x)

  def mean_sd(mean: float, sd: float) -> str:
    return number(mean) if math.isnan(sd) else f'{number(mean)} ± {number(sd)}'

  if s.n == 0:
    text = 'n/a'
  elif s.n_finite == s.n:
    text = f'{mean_sd(s.mean, s.sd)} (n={s.n})'
  elif s.n_finite == 0:
    text = f'none finite of {s.n}'
  else:
    text = f'{mean_sd(s.mean_finite, s.sd_finite)} over {s.n_finite} of {s.n}'
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


def _summary(results: Sequence[CaseResult], value: int, field: str) -> Summary:
  source = 'overlap' if hasattr(results[0].overlap[value], field) else 'surface'
  per_case = [getattr(r, source)[value] for r in results]
  return metrics.summarize(per_case, field)


def _slice_summary(results: Sequence[CaseResult], value: int, name: str) -> Summary | None:
  """Summary over volumes of each volume's per-slice aggregate `name` (SliceMetrics), with
  the volumes' 3D statuses; None unless every volume was measured per slice."""
  per_case = [r.slices.get(value) for r in results]
  if any(p is None for p in per_case):
    return None
  return metrics.summarize_values(
    [p.aggregate(name) for p in per_case], [p.volume_status for p in per_case]
  )


def _per_volume_spread(values: Sequence[float]) -> str:
  finite = [v for v in values if math.isfinite(v)]
  if len(finite) > 1:
    return f' [{np.mean(finite):.3f} ± {np.std(finite, ddof=1):.3f}]'
  return f' [{finite[0]:.3f}]' if finite else ''


def map50_cell(pooled: metrics.ClassAP, per_case: Sequence[metrics.ClassAP]) -> str:
  """Matterport's per-slice mAP@0.5 over all slices (with the slice count), then the mean ± SD
  of the per-volume values in brackets."""
  if math.isnan(pooled.map50_per_image):
    return 'n/a (no slice with truth)'
  return f'{pooled.map50_per_image:.3f} ({pooled.images_with_truth} slices)' + _per_volume_spread(
    [c.map50_per_image for c in per_case]
  )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return lines


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
    finite = [v for v in per_case if math.isfinite(v)]
    spread = ''
    if len(finite) > 1:
      spread = f' [{np.mean(finite):.3f} ± {np.std(finite, ddof=1):.3f}]'
    elif len(finite) == 1:
      spread = f' [{finite[0]:.3f}]'
    return ('n/a (no truth instance)' if math.isnan(pooled.ap) else f'{pooled.ap:.3f}') + spread

  rows = [
    ['Dice'] + [format_summary(_summary(results, v, 'dice')) for v in names],
    ['Hausdorff (voxels)']
    + [format_summary(_summary(results, v, 'hausdorff_voxels'), 2) for v in names],
    ['ASSD (mm)'] + [format_summary(_summary(results, v, 'assd_mm')) for v in names],
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
    ['Dice, 2D per slice'] + [cell(_slice_summary(results, v, 'dice'), 3) for v in names],
    ['Hausdorff (px), 2D per slice']
    + [cell(_slice_summary(results, v, 'hausdorff_px'), 2) for v in names],
    ['Ave. Hausdorff (px), 2D per slice']
    + [cell(_slice_summary(results, v, 'average_hausdorff_px'), 3) for v in names],
    ['Ave. Hausdorff (mm), 2D per slice']
    + [cell(_slice_summary(results, v, 'average_hausdorff_mm'), 3) for v in names],
    ['Ave. Hausdorff (voxels), 3D']
    + [format_summary(_summary(results, v, 'average_hausdorff_voxels')) for v in names],
    ['Ave. Hausdorff (mm), 3D']
    + [format_summary(_summary(results, v, 'average_hausdorff_mm')) for v in names],
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
    [label] + [format_summary(_summary(results, v, field), digits) for v in names]
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
        format_summary(_summary(results, value, 'signed_mean_mm')),
        format_summary(_summary(results, value, 'signed_sd_mm')),
      ]
    )
  return lines + markdown_table(
    ['Tissue', 'average of mean distance (mm)', 'average of distance SD (mm)'], rows
  )


THICKNESS_METHOD_TEXT = {
  'nearest': 'at each bone-cartilage interface point, the distance to the nearest articular '
  'surface point (reads low on voxel staircases)',
  'normal': 'at each bone-cartilage interface point, the distance along the normal of the '
  'smoothed interface to the smoothed articular surface',
}


def thickness_table(results: Sequence[CaseResult], method: str = 'nearest') -> list[str]:
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


def effusion_overlap_table(
  results: Sequence[CaseResult], scheme: LabelScheme, ap: Mapping[int, metrics.ClassAP]
) -> list[str]:
  """Table 6: effusion Dice and AP (with precision and recall)."""
  value = scheme.effusion_value
  lines = ['## Effusion segmentation (paper Table 6)', '']
  row = [format_summary(_summary(results, value, f)) for f in ('dice', 'precision', 'recall')]
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


def _mean_sd_cell(m: metrics.MeanSD) -> str:
  return f'{m.mean:.2f}' + ('' if math.isnan(m.sd) else f' ± {m.sd:.2f}')


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
      _mean_sd_cell(table.right[r]),
      _mean_sd_cell(table.left[r]),
      _mean_sd_cell(table.overall[r]),
    ]
    for r in raters
  ]
  lines += markdown_table(['Rater', 'Right', 'Left', 'Overall'], rows)

  def pair(a: str, b: str) -> metrics.HipAgreement:
    return table.pairs[(a, b)] if (a, b) in table.pairs else table.pairs[(b, a)]

  def difference(a: str, b: str) -> str:
    d = pair(a, b).difference
    return f'{d.mean_abs_difference:.2f} ± {d.sd_abs_difference:.2f}'

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
      values = np.array([res.rater_ml[rater][side] for res in results])
      sd = f' ± {np.std(values, ddof=1):.2f}' if values.size > 1 else ''
      cells.append(f'{np.mean(values):.2f}{sd}')
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
    return f'{d.mean_abs_difference:.2f} ± {d.sd_abs_difference:.2f}'

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


def summary_markdown(
  header: Mapping[str, Any],
  results: Sequence[CaseResult],
  scheme: LabelScheme,
  ap: Mapping[int, metrics.ClassAP],
  ap_per_case: Mapping[str, Mapping[int, metrics.ClassAP]],
  *,
  thickness_method: str = 'nearest',
) -> str:
  lines = [
    f'# Evaluation: {header["workdir"]} at step {header["checkpoint_step"]}, '
    f'split {header["split"]!r}',
    '',
    f'{len(results)} volume{"s" if len(results) != 1 else ""}: '
    f'{", ".join(r.case_id for r in results)}. Dataset '
    f'{header["dataset"]}, mask head {header["mask_head"]}, backbone '
    f"{header['backbone']}. Distances in mm from each volume's voxel spacing; "
    f"Hausdorff also in voxels (the paper's Table 3 unit). Mask AP at "
    f'{AP_RESOLUTION}. Empty-mask rules: docs/metrics.md (a missed structure has Dice 0 '
    f'and infinite distances; distance means are then given over the finite cases, '
    f'with the count).',
    '',
  ]
  if header.get('split_origin'):
    lines += [f'Split {header["split"]!r}: {header["split_origin"]}.', '']
  lines += segmentation_tables(results, scheme, ap, ap_per_case) + ['']
  lines += surface_table(results, scheme) + ['']
  if scheme.knee is not None:
    lines += thickness_table(results, thickness_method) + ['']
    if any(r.subregions for r in results):
      notes = [f'{r.case_id}: {r.subregion_note}' for r in results if r.subregion_note]
      shares = [r.split_agreement for r in results if r.split_agreement is not None]
      if shares:
        notes.append(
          "The labels' medial / lateral tibial cartilage against the geometric MT / LT split: "
          f'{100 * np.mean(shares):.2f} % of the voxels on the same side (mean over '
          f'{len(shares)} volumes; lowest {100 * min(shares):.2f} %).'
        )
      cases = [(r.case_id, r.subregions) for r in results]
      lines += subregion_tables.summary_table(cases, notes) + ['']
  if scheme.effusion_value is not None:
    lines += effusion_overlap_table(results, scheme, ap) + ['']
    lines += effusion_volume_table(
      results, str(header.get('subject_pattern') or ''), header.get('baseline_timepoint') or None
    ) + ['']
  lines += missing_structures(results, scheme)
  return '\n'.join(lines) + '\n'


# --- writing ------------------------------------------------------------------------------------


def _csv_value(value: Any) -> Any:
  if value is None:
    return ''
  if isinstance(value, (float, np.floating)):
    return repr(float(value))  # round-trips exactly; inf and nan as 'inf' and 'nan'
  return value


def write_csv(path: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
  with atomic_path(path) as tmp:
    with open(tmp, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=list(columns))
      writer.writeheader()
      for row in rows:
        writer.writerow({k: _csv_value(row[k]) for k in columns})
  return path


def write_text(path: str, text: str) -> str:
  with atomic_path(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
  return path


def write_tables(
  folder: str,
  results: Sequence[CaseResult],
  scheme: LabelScheme,
  ap: Mapping[int, metrics.ClassAP],
  ap_per_case: Mapping[str, Mapping[int, metrics.ClassAP]],
) -> None:
  """metrics.csv, ap.csv and, by dataset, thickness.csv or volumes.csv into `folder`."""
  write_csv(
    os.path.join(folder, 'metrics.csv'),
    METRICS_COLUMNS,
    [row for r in results for row in metrics_rows(r, scheme)],
  )
  ap_rows = []
  for scope, table in [('all', ap)] + list(ap_per_case.items()):
    for class_id, a in table.items():
      ap_rows.append(
        {
          'scope': scope,
          'tissue': scheme.class_names[class_id - 1],
          'class_id': class_id,
          'ap': a.ap,
          'ap50': a.ap50,
          'ap75': a.ap75,
          'truth_instances': a.truth_instances,
          'detections': a.detections,
          'map50_per_image': a.map50_per_image,
          'images_with_truth': a.images_with_truth,
        }
      )
  write_csv(os.path.join(folder, 'ap.csv'), AP_COLUMNS, ap_rows)
  if scheme.knee is not None:
    write_csv(
      os.path.join(folder, 'thickness.csv'),
      THICKNESS_COLUMNS,
      [row for r in results for row in thickness_rows(r)],
    )
    if any(r.subregions for r in results):
      write_csv(
        os.path.join(folder, 'subregions.csv'),
        subregion_tables.csv_columns(),
        [
          row
          for r in results
          for row in subregion_tables.csv_rows(r.case_id, r.side, r.side_basis, r.subregions)
        ],
      )
  if scheme.effusion_value is not None:
    write_csv(
      os.path.join(folder, 'volumes.csv'),
      VOLUME_COLUMNS,
      [
        dict(case_id=r.case_id, rater=rater, **sides)
        for r in results
        for rater, sides in r.rater_ml.items()
      ],
    )
