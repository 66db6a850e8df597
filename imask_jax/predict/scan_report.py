"""The JSON report of one predicted scan: tissue volumes, cartilage thickness by region,
effusion by side, and the quality flags (imask_jax/predict/quality.py).

Regional thickness (`cartilage_thickness`): the femoral map (rows = angle around the condylar
cylinder, 0 deg inferior, +90 anterior; columns = mm along its rightward axis) is cut into
posterior [-180, -45), central [-45, 45) and anterior [45, 180] deg bands, each split into the
patient's right (axial >= 0) and left half at the mean left-right position of the femoral
bone-cartilage interface; the tibial map into right and left halves at the mean left-right
position of its interface. Right/left, not medial/lateral: which is medial depends on the
knee's side, which a NIfTI file does not record. A region's value is the mean over its filled
map cells (mm), null where it has none.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines import laterality, nifti_io, orientation, tissues
from imask_jax import metrics
from imask_jax.inference import loading
from imask_jax.inference.whole_volume import VolumePrediction
from imask_jax.metrics import side as side_metrics
from imask_jax.metrics.thickness import check_method
from imask_jax.predict import quality

FEMORAL_BANDS_DEG = {
  'posterior': (-180.0, -45.0),
  'central': (-45.0, 45.0),
  'anterior': (45.0, 180.0),
}


def _finite_or_none(value: float) -> float | None:
  return float(value) if math.isfinite(value) else None


def _mean_cells(cells: np.ndarray) -> float | None:
  filled = cells[np.isfinite(cells)]
  return float(filled.mean()) if filled.size else None


def femoral_thickness(
  label_map: np.ndarray,
  spacing: Sequence[float],
  knee: metrics.KneeLabelValues,
  method: str,
  maps: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Mean and regional femoral cartilage thickness (mm) of a canonical label map, measured
  with thickness `method` (metrics.interface_thickness); the map goes into `maps['femoral']`
  when given (for the subregions)."""
  try:
    m = metrics.femoral_thickness_map(
      label_map,
      spacing,
      labels=knee,
      angle_bin_deg=metrics.femoral_angle_bin_deg(spacing),
      method=method,
    )
  except ValueError as error:  # too little cartilage on the femur to fit the cylinder
    return {'status': 'not_measured', 'reason': str(error)}
  if maps is not None:
    maps['femoral'] = m
  rows, cols = m.row_centers, m.col_centers
  regions = {}
  for band, (low, high) in FEMORAL_BANDS_DEG.items():
    in_band = (rows >= low) & ((rows < high) if high < 180 else (rows <= high))
    for side, in_side in (('right', cols >= 0), ('left', cols < 0)):
      regions[f'{band}_{side}'] = _mean_cells(m.thickness_mm[np.ix_(in_band, in_side)])
  return {
    'status': 'measured',
    'mean_mm': _finite_or_none(m.mean_thickness_mm),
    'regions_mm': regions,
    'map_cells': int(np.isfinite(m.thickness_mm).sum()),
    'angle_bin_deg': float(m.row_edges[1] - m.row_edges[0]),
    'axial_bin_mm': float(m.col_edges[1] - m.col_edges[0]),
    'cylinder_radius_mm': m.cylinder.radius_mm,
  }


def tibial_thickness(
  label_map: np.ndarray,
  spacing: Sequence[float],
  knee: metrics.KneeLabelValues,
  method: str,
  maps: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Mean and right/left tibial cartilage thickness (mm) of a canonical label map, measured
  with thickness `method` (metrics.interface_thickness); the map goes into `maps['tibial']`
  when given (for the subregions)."""
  m = metrics.tibial_thickness_map(label_map, spacing, labels=knee, method=method)
  if len(m.points.thickness_mm) == 0:
    return {
      'status': 'not_measured',
      'reason': f'no tibial cartilage (label {knee.tibial_cartilage}) touches the tibia '
      f'(label {knee.tibia})',
    }
  if maps is not None:
    maps['tibial'] = m
  centre = float(m.points.positions_mm[:, 0].mean())
  cols = m.col_centers
  regions = {
    'right': _mean_cells(m.thickness_mm[:, cols >= centre]),
    'left': _mean_cells(m.thickness_mm[:, cols < centre]),
  }
  return {
    'status': 'measured',
    'mean_mm': _finite_or_none(m.mean_thickness_mm),
    'regions_mm': regions,
    'map_cells': int(np.isfinite(m.thickness_mm).sum()),
    'bin_mm': float(m.col_edges[1] - m.col_edges[0]),
  }


def volume_report(
  prediction: VolumePrediction,
  model: loading.LoadedModel,
  *,
  input_path: str,
  label_map_path: str,
  image_constant: bool = False,
  reference: dict[str, Any] | None = None,
  declared_side: laterality.DeclaredSide | None = None,
  side_conflict: str | None = None,
) -> dict[str, Any]:
  """The JSON report of one predicted volume (docs/predict.md lists its
  fields): `input_path` and `label_map_path` are recorded as given; `reference`: the training
  reference of quality.py (None skips the checks that need it); image_constant: whether every
  voxel of the input has one value; declared_side, side_conflict: what the scan (or --side)
  declares, or the one-line contradiction of its declarations (`side_report`)."""
  scheme = model.scheme
  spacing = prediction.spacing
  volumes = metrics.volumes_ml_per_label(prediction.canonical, spacing, scheme.label_values)
  report: dict[str, Any] = {
    'input': input_path,
    'label_map': label_map_path,
    'workdir': os.path.abspath(model.workdir),
    'checkpoint_step': model.step,
    'plane': prediction.plane,
    'shape': list(prediction.label_map.shape),
    'voxel_size_mm': list(nifti_io.affine_zooms(prediction.grid.affine)),
    # The in-plane pixel of the scan's slices and of the network input it was resampled to.
    'slice_pixel_spacing_mm': list(prediction.slice_spacing),
    'network_pixel_spacing_mm': (
      None if prediction.network_spacing is None else list(prediction.network_spacing)
    ),
    'network_input_size': None
    if prediction.network_size is None
    else list(prediction.network_size),
    'resampling': 'resize to fit'
    if not model.config.data.get('pixel_spacing_mm')
    else f'scale-true at {float(model.config.data.pixel_spacing_mm):g} mm',
    'labels': {name: value for value, name in scheme.names_by_value.items()},
    'volumes_ml': {scheme.names_by_value[v]: ml for v, ml in volumes.items()},
  }
  if scheme.knee is not None:
    method = check_method(model.config.eval.thickness_method, 'config eval.thickness_method')
    whole = scheme.with_parts_joined(prediction.canonical)  # parts trained apart, joined
    maps: dict[str, Any] = {}
    report['cartilage_thickness'] = {
      'femoral': femoral_thickness(whole, spacing, scheme.knee, method, maps),
      'tibial': tibial_thickness(whole, spacing, scheme.knee, method, maps),
    }
    measure = {'femoral': femoral_thickness, 'tibial': tibial_thickness}
    for part, (tissue, _) in scheme.parts.items():  # e.g. medial and lateral tibial cartilage
      plate = tissues.plate_of(tissue)
      alone = scheme.part_alone(prediction.canonical, part)
      report['cartilage_thickness'][part] = measure[plate](alone, spacing, scheme.knee, method)
    report['cartilage_thickness'].update(
      method=method,
      regions='patient right/left (not medial/lateral); see imask_jax/predict/scan_report.py',
    )
  if scheme.knee is not None:
    # Left or right knee: declared (--side, DICOM tags, a sidecar) and estimated (the anatomy).
    report['side'] = side_report(
      scheme.with_parts_joined(prediction.canonical),
      spacing,
      scheme.knee,
      declared=declared_side,
      conflict=side_conflict,
      input_path=input_path,
    )
    report['subregions'] = subregion_report(maps, report['side']['side'])
  if scheme.effusion_value is not None:
    report['effusion_ml'] = metrics.effusion_ml_by_side(
      prediction.canonical, spacing, scheme.effusion_value
    )
  scores = [inst.score for slice_ in prediction.instances or () for inst in slice_]
  unet = str(model.config.model.get('kind', 'maskrcnn')) == 'unet'
  report['quality'] = quality.quality_flags(
    image_constant=image_constant,
    volumes_ml=report['volumes_ml'],
    spacing=spacing,
    shape=prediction.canonical.shape,
    scores=scores,
    # A U-Net paints every region its argmax gives, whatever the region's score.
    score_threshold=0.0 if unet else float(model.config.model.label_score_threshold),
    reference=reference,
    resampled_axes=resampled_axes(model.config),
    unpainted=prediction.unpainted_detections,
    side=report.get('side'),
  )
  if unet:
    report['quality'] = semantic_quality(report['quality'])
  return report


# A U-Net's flags in its own words: it has no detections, scores or mask slots; its "instances"
# are the regions of one class in one slice (inference/semantic.py `slice_regions`), each scored
# by its mean class probability.
SEMANTIC_CODES = {'no_detections': 'empty_label_map', 'low_detection_score': 'low_probability'}


def semantic_quality(block: dict[str, Any]) -> dict[str, Any]:
  """quality.quality_flags' block of a U-Net (scores: its slice regions' mean class
  probabilities, all painting) in the U-Net's words: 'no_detections' becomes 'empty_label_map'
  (no pixel of any slice took a tissue), 'low_detection_score' 'low_probability' (the mean over
  the regions of their mean class probability is below quality.LOW_MEAN_SCORE), and the fields
  'mean_detection_score' and 'painting_detections' become 'mean_region_probability' and
  'painted_regions'. Other flags are the same for both models."""
  count, mean = block['painting_detections'], block['mean_detection_score']
  messages = {
    'empty_label_map': 'no pixel of any slice was given a tissue; the label map is empty',
    'low_probability': (
      f'mean class probability {mean or 0.0:.3f} < {quality.LOW_MEAN_SCORE} over the {count} '
      'painted regions (a tissue in a slice)'
    ),
  }
  flags = []
  for flag in block['flags']:
    code = SEMANTIC_CODES.get(flag['code'], flag['code'])
    flags.append({'code': code, 'message': messages.get(code, flag['message'])})
  out = {k: v for k, v in block.items() if k not in ('mean_detection_score', 'painting_detections')}
  out.update(flags=flags, mean_region_probability=mean, painted_regions=count)
  return out


def subregion_report(maps: dict[str, Any], side: str | None) -> dict[str, Any]:
  """The report's "subregions" block: the femorotibial subregions' measures
  (metrics/subregions.py; docs/metrics.md) named medial / lateral by the report's side, or
  why they were not measured. Values that cannot be measured are null."""
  if side is None:
    return {'status': 'not_measured', 'reason': "the knee's side is not known (see side)"}
  try:
    regions = metrics.knee_subregions(maps.get('femoral'), maps.get('tibial'), side)
  except ValueError as error:  # too little cartilage to find the plates or the notch
    return {'status': 'not_measured', 'reason': str(error)}
  return {
    'status': 'measured',
    'side': side,
    'regions': {
      name: {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in r.as_dict().items()}
      for name, r in regions.items()
    },
  }


def side_report(
  label_map: np.ndarray,
  spacing: Sequence[float],
  knee: metrics.KneeLabelValues,
  *,
  declared: laterality.DeclaredSide | None,
  conflict: str | None,
  input_path: str,
) -> dict[str, Any]:
  """The report's "side" block for a canonical knee label map: "side" ('left', 'right' or
  None), the declared one if any (data_pipelines/laterality.py: --side, then the DICOM tags,
  then a sidecar), else the anatomical estimate (imask_jax/metrics/side.py), with its "basis";
  "declared" and "conflict" (the one-line contradiction of the scan's declarations, or None);
  "estimated", "estimate_margin" and "estimate_basis". In canonical RAS+ a right knee's medial
  side is at smaller R, a left knee's at larger R. quality.py flags an unknown side, a
  declared side the estimate contradicts and a conflict."""
  estimate = side_metrics.estimate_side(label_map, spacing, knee)
  if conflict:
    undeclared = f'the declarations contradict each other: {conflict}'
  else:
    undeclared = f'nothing declared: no --side, {laterality.sources_read(input_path)}'
  if declared is not None:
    side, basis = declared.side, f'declared: {declared.basis}'
  elif estimate.side is not None:
    side, basis = estimate.side, f'estimated from the anatomy ({undeclared})'
  else:
    side, basis = None, f'unknown: {undeclared}; the anatomy does not tell: {estimate.basis}'
  return {
    'side': side,
    'basis': basis,
    'declared': None if declared is None else declared.side,
    'conflict': conflict,
    'estimated': estimate.side,
    'estimate_margin': estimate.margin,
    'estimate_basis': estimate.basis,
  }


def resampled_axes(config: Any) -> tuple[int, ...]:
  """The canonical axes a scale-true model resamples to its pixel size: the slice plane's rows
  and columns (none when it resizes to fit)."""
  if not config.data.get('pixel_spacing_mm'):
    return ()
  axes = orientation.plane_axes(str(config.data.plane))
  return (axes.row_axis, axes.col_axis)
