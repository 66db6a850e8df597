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
from imask_jax import metrics
from imask_jax.metrics import CaseStatus, Summary

if TYPE_CHECKING:
  from data_pipelines.tissues import LabelScheme

METRICS_COLUMNS = (
    'case_id', 'tissue', 'label_value', 'status',
    'dice', 'jaccard', 'precision', 'recall',
    'true_positive_voxels', 'false_positive_voxels', 'false_negative_voxels',
    'hausdorff_mm', 'hd95_mm', 'assd_mm', 'signed_mean_mm', 'signed_sd_mm',
    'hausdorff_voxels', 'truth_ml', 'pred_ml')
AP_COLUMNS = ('scope', 'tissue', 'class_id', 'ap', 'ap50', 'ap75', 'truth_instances',
              'detections')
THICKNESS_COLUMNS = ('case_id', 'plate', 'status', 'truth_mean_mm', 'pred_mean_mm',
                     'difference_mean_mm', 'difference_sd_mm', 'cells_compared', 'note')
VOLUME_COLUMNS = ('case_id', 'rater', 'right_ml', 'left_ml', 'total_ml')
MODEL_RATER = 'model'
PLATES = tuple(tissues.PLATES)  # 'femoral', 'tibial'
AP_RESOLUTION = ('source slice resolution: detections pasted into the original slice, truth '
                 'instances from the original label slice')



# --- one volume's measurements -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CaseResult:
  """Every measurement of one volume. Dicts are keyed by label value (tissues) or plate name;
  rater_ml maps a rater (reader or 'model') to its right / left / total effusion in mL."""
  case_id: str
  overlap: dict[int, metrics.OverlapMetrics]
  surface: dict[int, metrics.SurfaceMetrics]
  truth_ml: dict[int, float]
  pred_ml: dict[int, float]
  thickness: dict[str, metrics.PlateComparison] | None = None
  thickness_note: str = ''
  rater_ml: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


def metrics_rows(result: CaseResult, scheme: LabelScheme) -> list[dict[str, Any]]:
  """The metrics.csv rows of one volume (one per tissue, METRICS_COLUMNS)."""
  rows = []
  for value, name in scheme.names_by_value.items():
    o, s = result.overlap[value], result.surface[value]
    rows.append({
        'case_id': result.case_id, 'tissue': name, 'label_value': value, 'status': str(o.status),
        'dice': o.dice, 'jaccard': o.jaccard, 'precision': o.precision, 'recall': o.recall,
        'true_positive_voxels': o.true_positive, 'false_positive_voxels': o.false_positive,
        'false_negative_voxels': o.false_negative,
        'hausdorff_mm': s.hausdorff_mm, 'hd95_mm': s.hd95_mm, 'assd_mm': s.assd_mm,
        'signed_mean_mm': s.signed_mean_mm, 'signed_sd_mm': s.signed_sd_mm,
        'hausdorff_voxels': s.hausdorff_voxels,
        'truth_ml': result.truth_ml[value], 'pred_ml': result.pred_ml[value]})
  return rows


def thickness_rows(result: CaseResult) -> list[dict[str, Any]]:
  """The thickness.csv rows of one knee volume (one per plate, THICKNESS_COLUMNS)."""
  rows = []
  for plate in PLATES:
    if result.thickness is None:
      rows.append({'case_id': result.case_id, 'plate': plate, 'status': 'not_measured',
                   'truth_mean_mm': math.nan, 'pred_mean_mm': math.nan,
                   'difference_mean_mm': math.nan, 'difference_sd_mm': math.nan,
                   'cells_compared': 0, 'note': result.thickness_note})
      continue
    c = result.thickness[plate]
    rows.append({'case_id': result.case_id, 'plate': plate, 'status': str(c.status),
                 'truth_mean_mm': c.truth.mean_thickness_mm,
                 'pred_mean_mm': c.pred.mean_thickness_mm,
                 'difference_mean_mm': c.difference.mean_mm,
                 'difference_sd_mm': c.difference.sd_mm,
                 'cells_compared': c.difference.n_cells, 'note': ''})
  return rows


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
  counts = [f'{k} {label}' for k, label in ((s.n_missed, 'missed'),
                                             (s.n_false_positive, 'false positive'),
                                             (s.n_both_empty, 'both empty')) if k]
  return text + (f'; {", ".join(counts)}' if counts else '')


def _summary(results: Sequence[CaseResult], value: int, field: str) -> Summary:
  source = 'overlap' if hasattr(results[0].overlap[value], field) else 'surface'
  per_case = [getattr(r, source)[value] for r in results]
  return metrics.summarize(per_case, field)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return lines


def segmentation_tables(results: Sequence[CaseResult], scheme: LabelScheme,
                        ap: Mapping[int, metrics.ClassAP],
                        ap_per_case: Mapping[str, Mapping[int, metrics.ClassAP]]
                        ) -> list[str]:
  """Table 3 (Dice, Hausdorff in voxels, ASSD, AP; tissues across) and the other overlap and
  distance metrics, mean ± SD over volumes."""
  names = scheme.names_by_value
  class_of = scheme.class_map
  lines = ['## Segmentation (paper Table 3)', '',
           'Mean ± SD over volumes; tissues across. AP is COCO mask AP (IoU 0.50:0.95) over '
           'all slices of the split, with the mean ± SD of the per-volume AP in brackets.', '']

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
      ['Hausdorff (voxels)'] + [format_summary(_summary(results, v, 'hausdorff_voxels'), 2)
                                for v in names],
      ['ASSD (mm)'] + [format_summary(_summary(results, v, 'assd_mm')) for v in names],
      ['Mask AP'] + [ap_cell(v) for v in names],
  ]
  lines += markdown_table(['Metric'] + list(names.values()), rows)
  lines += ['', 'Further metrics (mean ± SD over volumes):', '']
  more = [('Precision', 'precision', 3), ('Recall', 'recall', 3), ('Jaccard', 'jaccard', 3),
          ('Hausdorff (mm)', 'hausdorff_mm', 2), ('HD95 (mm)', 'hd95_mm', 2)]
  rows = [[label] + [format_summary(_summary(results, v, field), digits) for v in names]
          for label, field, digits in more]
  rows.append(['AP50 (all slices)'] + [f'{ap[class_of[v]].ap50:.3f}' for v in names])
  rows.append(['AP75 (all slices)'] + [f'{ap[class_of[v]].ap75:.3f}' for v in names])
  lines += markdown_table(['Metric'] + list(names.values()), rows)
  return lines


def surface_table(results: Sequence[CaseResult], scheme: LabelScheme) -> list[str]:
  """Table 4: the signed mean surface distance and its SD per volume, averaged over volumes."""
  lines = ['## Signed surface distance (paper Table 4)', '',
           'Per volume, the signed distances of both surfaces are pooled: + where the '
           'prediction lies outside the truth (over-estimation), - inside. Columns: the mean '
           'over volumes (± SD) of each volume\'s mean and of its SD, in mm. The paper labels '
           'its rows "GT - P" but colours over-estimation as positive, as here.', '']
  rows = []
  for value, name in scheme.names_by_value.items():
    rows.append([name, format_summary(_summary(results, value, 'signed_mean_mm')),
                 format_summary(_summary(results, value, 'signed_sd_mm'))])
  return lines + markdown_table(['Tissue', 'average of mean distance (mm)',
                                 'average of distance SD (mm)'], rows)


def thickness_table(results: Sequence[CaseResult]) -> list[str]:
  """Table 5: prediction - truth thickness map differences, averaged over volumes."""
  lines = ['## Cartilage thickness (paper Table 5)', '',
           'Per volume and plate, the prediction - truth difference map (cells where both '
           'have cartilage); mean over volumes (± SD) of its mean and of its SD, in mm. The '
           'paper\'s rows read "GT - prediction": flip the sign of the first column to '
           'compare.', '']
  rows = []
  for plate in PLATES:
    comparisons = [r.thickness[plate] for r in results if r.thickness is not None]
    not_measured = [r.case_id for r in results if r.thickness is None]
    note = f'; {len(not_measured)} not measured ({", ".join(not_measured)})' if not_measured \
        else ''
    if not comparisons:
      rows.append([plate, 'n/a' + note, 'n/a', 'n/a', 'n/a'])
      continue
    statuses = [c.status for c in comparisons]
    mean_diff = metrics.summarize_values([c.difference.mean_mm for c in comparisons], statuses)
    sd_diff = metrics.summarize_values([c.difference.sd_mm for c in comparisons], statuses)
    truth_mean = metrics.summarize_values([c.truth.mean_thickness_mm for c in comparisons],
                                          [CaseStatus.OK] * len(comparisons))
    pred_mean = metrics.summarize_values([c.pred.mean_thickness_mm for c in comparisons],
                                         statuses)
    rows.append([plate, format_summary(mean_diff) + note, format_summary(sd_diff),
                 format_summary(truth_mean, 2), format_summary(pred_mean, 2)])
  return lines + markdown_table(['Plate', 'average of mean differences (mm)',
                                 'average of SD of differences (mm)', 'truth mean thickness (mm)',
                                 'predicted mean thickness (mm)'], rows)


def effusion_overlap_table(results: Sequence[CaseResult], scheme: LabelScheme,
                           ap: Mapping[int, metrics.ClassAP]) -> list[str]:
  """Table 6: effusion Dice and AP (with precision and recall)."""
  value = scheme.effusion_value
  lines = ['## Effusion segmentation (paper Table 6)', '']
  row = [format_summary(_summary(results, value, f)) for f in ('dice', 'precision', 'recall')]
  pooled = ap[scheme.class_map[value]]
  row.append('n/a (no truth instance)' if math.isnan(pooled.ap) else f'{pooled.ap:.3f}')
  return lines + markdown_table(['Dice', 'Precision (voxels)', 'Recall (voxels)',
                                 'Mask AP (all slices)'], [row])


def agreement(results: Sequence[CaseResult]) -> tuple[list[str],
                                                      dict[tuple[str, str], Any] | None]:
  """The raters (readers, then model) and, with >= 2 volumes, metrics.pairwise_agreement of
  their total effusion volumes."""
  raters = [r for r in results[0].rater_ml if r != MODEL_RATER] + [MODEL_RATER]
  if len(results) < 2:
    return raters, None
  totals = {r: [res.rater_ml[r]['total_ml'] for res in results] for r in raters}
  return raters, metrics.pairwise_agreement(totals)


def effusion_volume_table(results: Sequence[CaseResult]) -> list[str]:
  """Table 7: volumes per rater (right, left, overall), |difference| and CoV between raters,
  plus ICC(2,1), ICC(3,1) and Bland-Altman bias and limits."""
  raters, pairs = agreement(results)
  lines = ['## Effusion volumes (paper Table 7)', '',
           'Volumes in mL, mean ± SD over volumes. Sides split at the mid-sagittal plane of '
           'the scan (the centre of the canonical left-right axis).', '']
  rows = []
  for rater in raters:
    cells = []
    for side in ('right_ml', 'left_ml', 'total_ml'):
      values = np.array([res.rater_ml[rater][side] for res in results])
      sd = f' ± {np.std(values, ddof=1):.2f}' if values.size > 1 else ''
      cells.append(f'{np.mean(values):.2f}{sd}')
    rows.append([rater] + cells)
  lines += markdown_table(['Rater', 'Right', 'Left', 'Overall'], rows)
  if pairs is None:
    return lines + ['', f'Agreement statistics need >= 2 volumes; the split has '
                        f'{len(results)}.']

  def pair(a: str, b: str):
    return (pairs[(a, b)], 1.0) if (a, b) in pairs else (pairs[(b, a)], -1.0)

  lines += ['', 'Difference in volumes: mean |a - b| ± SD over volumes (mL), row a, column b.',
            '']
  rows = []
  for a in raters:
    cells = []
    for b in raters:
      if a == b:
        cells.append('0')
        continue
      d = pair(a, b)[0].difference
      cells.append(f'{d.mean_abs_difference:.2f} ± {d.sd_abs_difference:.2f}')
    rows.append([a] + cells)
  lines += markdown_table(['Rater'] + raters, rows)
  lines += ['', 'CoV between two raters: per volume CoV_i = SD_i / mean_i of its two '
            'measurements (SD_i = |a_i - b_i| / sqrt(2), the sample SD); reported as RMS CoV = '
            'sqrt(mean_i CoV_i^2) / mean CoV = mean_i CoV_i. Volumes where both raters measure '
            '0 have no CoV and are counted.', '']
  rows = []
  for a in raters:
    cells = []
    for b in raters:
      if a == b:
        cells.append('0')
        continue
      cov = pair(a, b)[0].cov
      zero = f' ({cov.n_zero_mean} all-zero)' if cov.n_zero_mean else ''
      cells.append(f'{cov.rms_cov:.2f} / {cov.mean_cov:.2f}{zero}')
    rows.append([a] + cells)
  lines += markdown_table(['Rater'] + raters, rows)
  lines += ['', 'ICC of total volumes (two-way ANOVA, Shrout & Fleiss): ICC(2,1) absolute '
            'agreement, ICC(3,1) consistency; Bland-Altman bias a - b and 95% limits of '
            'agreement (mL).', '']
  rows = []
  for (a, b), p in pairs.items():
    ba = p.bland_altman
    rows.append([f'{a} vs {b}', f'{p.icc.icc_2_1:.3f}', f'{p.icc.icc_3_1:.3f}',
                 f'{ba.bias:+.2f}', f'[{ba.loa_lower:+.2f}, {ba.loa_upper:+.2f}]'])
  lines += markdown_table(['Pair', 'ICC(2,1)', 'ICC(3,1)', 'bias (mL)', 'limits of agreement (mL)'],
                  rows)
  table = np.array([[res.rater_ml[r]['total_ml'] for r in raters] for res in results])
  icc = metrics.intraclass_correlation(table)
  lines += ['', f'All {len(raters)} raters together: ICC(2,1) {icc.icc_2_1:.3f}, ICC(3,1) '
            f'{icc.icc_3_1:.3f}.']
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
  return lines + (found or ['None: every tissue is present in both truth and prediction of '
                            'every volume.'])


def summary_markdown(header: Mapping[str, Any], results: Sequence[CaseResult],
                     scheme: LabelScheme, ap: Mapping[int, metrics.ClassAP],
                     ap_per_case: Mapping[str, Mapping[int, metrics.ClassAP]]) -> str:
  lines = [f'# Evaluation: {header["workdir"]} at step {header["checkpoint_step"]}, '
           f'split {header["split"]!r}', '',
           f'{len(results)} volume{"s" if len(results) != 1 else ""}: '
           f'{", ".join(r.case_id for r in results)}. Dataset '
           f'{header["dataset"]}, mask head {header["mask_head"]}, backbone '
           f'{header["backbone"]}. Distances in mm from each volume\'s voxel spacing; '
           f'Hausdorff also in voxels (the paper\'s Table 3 unit). Mask AP at '
           f'{AP_RESOLUTION}. Empty-mask rules: docs/metrics.md (a missed structure has Dice 0 '
           f'and infinite distances; distance means are then given over the finite cases, '
           f'with the count).', '']
  lines += segmentation_tables(results, scheme, ap, ap_per_case) + ['']
  lines += surface_table(results, scheme) + ['']
  if scheme.knee is not None:
    lines += thickness_table(results) + ['']
  if scheme.effusion_value is not None:
    lines += effusion_overlap_table(results, scheme, ap) + ['']
    lines += effusion_volume_table(results) + ['']
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


def write_tables(folder: str, results: Sequence[CaseResult], scheme: LabelScheme,
                 ap: Mapping[int, metrics.ClassAP],
                 ap_per_case: Mapping[str, Mapping[int, metrics.ClassAP]]) -> None:
  """metrics.csv, ap.csv and, by dataset, thickness.csv or volumes.csv into `folder`."""
  write_csv(os.path.join(folder, 'metrics.csv'), METRICS_COLUMNS,
            [row for r in results for row in metrics_rows(r, scheme)])
  ap_rows = []
  for scope, table in [('all', ap)] + list(ap_per_case.items()):
    for class_id, a in table.items():
      ap_rows.append({'scope': scope, 'tissue': scheme.class_names[class_id - 1],
                      'class_id': class_id, 'ap': a.ap, 'ap50': a.ap50, 'ap75': a.ap75,
                      'truth_instances': a.truth_instances, 'detections': a.detections})
  write_csv(os.path.join(folder, 'ap.csv'), AP_COLUMNS, ap_rows)
  if scheme.knee is not None:
    write_csv(os.path.join(folder, 'thickness.csv'), THICKNESS_COLUMNS,
              [row for r in results for row in thickness_rows(r)])
  if scheme.effusion_value is not None:
    write_csv(os.path.join(folder, 'volumes.csv'), VOLUME_COLUMNS,
              [dict(case_id=r.case_id, rater=rater, **sides)
               for r in results for rater, sides in r.rater_ml.items()])
