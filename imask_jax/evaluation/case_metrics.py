"""One volume measured: overlap, surfaces, per-slice figures, thickness and subregions of a
knee, effusion volumes of each reader of a hip (`evaluate_case`), and the truth instances mask
AP is ranked against (`truth_instances`). Measuring is metrics/'s; this module says which
measures a case gets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipelines import instances as instances_lib
from data_pipelines import orientation, tissues
from data_pipelines.tissues import LabelScheme
from imask_jax import metrics
from imask_jax.evaluation import knee_steps, report

if TYPE_CHECKING:
  from imask_jax.inference.whole_volume import VolumePrediction


def truth_instances(
  label_slice: np.ndarray, scheme: LabelScheme, instance_mode: str
) -> list[tuple[int, np.ndarray]]:
  """(class id, mask) of every truth instance of a label slice (label values), in the
  config's instance mode; no minimum size (every truth pixel counts)."""
  found = instances_lib.extract_instances(
    label_slice, scheme.class_map, mode=instance_mode, min_pixels=1
  )
  return [(int(c), m) for c, m in zip(found.classes, found.masks)]


def evaluate_case(
  case_id: str,
  truth: np.ndarray,
  prediction: VolumePrediction,
  scheme: LabelScheme,
  spacing: Sequence[float],
  reader_maps: Mapping[str, np.ndarray] | None = None,
  *,
  thickness_method: str,
  side: tuple[str, str] | None = None,
  label_split: tuple[np.ndarray, int, int] | None = None,
) -> report.CaseResult:
  """Measures one volume. truth / prediction.canonical: canonical label maps (label values)
  with `spacing` (mm, canonical axis order); reader_maps: each reader's canonical label map,
  for effusion volumes; thickness_method: the config's eval.thickness_method; side: the
  knee's side ('left' / 'right') and its basis, which names the medial and lateral subregions
  (None: no subregions); label_split: the stored labels with their medial and lateral tibial
  cartilage values, to compare with the geometric split."""
  pred = prediction.canonical
  values = scheme.label_values
  overlap = metrics.overlap_per_label(pred, truth, values)
  surface = metrics.surface_metrics_per_label(pred, truth, spacing, values, voxel_hausdorff=True)
  # Per-slice 2D metrics in the plane the model segments (the paper's method is 2D).
  slices = metrics.slice_metrics_per_label(
    pred, truth, orientation.plane_axes(prediction.plane).slice_axis, spacing, values
  )
  thickness, note = None, ''
  knee = scheme.knee
  if knee is not None:

    def compare(pred_map: np.ndarray, truth_map: np.ndarray) -> dict[str, Any]:
      return metrics.compare_thickness(
        pred_map,
        truth_map,
        spacing,
        labels=knee,
        angle_bin_deg=metrics.femoral_angle_bin_deg(spacing),
        method=thickness_method,
      )

    try:  # the whole plates (a tissue trained as parts joined)
      thickness = compare(scheme.with_parts_joined(pred), scheme.with_parts_joined(truth))
    except ValueError as error:  # the truth lacks a plate, or too little of it to fit
      note = str(error)
    for part, (tissue, _) in scheme.parts.items() if thickness is not None else ():
      try:  # each part as a plate of its own, beside the whole (medial / lateral tibial)
        whole = compare(scheme.part_alone(pred, part), scheme.part_alone(truth, part))
        thickness[part] = whole[tissues.plate_of(tissue)]
      except ValueError as error:
        note = (note + '; ' if note else '') + f'{part}: {error}'

  regions, region_note, agreement = {}, '', None
  if thickness is not None and side is not None:
    regions, region_note = knee_steps.truth_and_prediction_subregions(thickness, side[0])
    if label_split is not None and 'tibial' in thickness and 'truth' in regions:
      agreement = knee_steps.split_agreement(
        thickness['tibial'].truth, side[0], label_split, spacing
      )
  elif knee is not None:
    region_note = 'no subregions: ' + (note or "the knee's side is not known")
  rater_ml = {}
  if scheme.effusion_value is not None:
    for rater, labels in (reader_maps or {}).items():
      rater_ml[rater] = metrics.effusion_ml_by_side(labels, spacing, scheme.effusion_value)
    rater_ml[report.MODEL_RATER] = metrics.effusion_ml_by_side(pred, spacing, scheme.effusion_value)
  return report.CaseResult(
    case_id=case_id,
    overlap=overlap,
    surface=surface,
    truth_ml=metrics.volumes_ml_per_label(truth, spacing, values),
    pred_ml=metrics.volumes_ml_per_label(pred, spacing, values),
    thickness=thickness,
    thickness_note=note,
    rater_ml=rater_ml,
    slices=slices,
    side='' if side is None else side[0],
    side_basis='' if side is None else side[1],
    subregions=regions,
    subregion_note=region_note,
    split_agreement=agreement,
  )
