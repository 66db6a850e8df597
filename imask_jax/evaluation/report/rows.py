"""The per-volume measurements of an evaluation (`CaseResult`) as CSV rows: metrics.csv,
ap.csv, thickness.csv, volumes.csv and subregions.csv, each column described in
docs/evaluation.md, and the atomic writers of CSV and text files."""

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
from imask_jax.evaluation.report import subregion_tables

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
