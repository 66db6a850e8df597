"""The label maps behind the paper's figures: one case's truth (read from the run's data, as
evaluate read it) and each evaluated run's predicted label map (its `labels/<case>.nii.gz`),
both in canonical RAS+ on the case's grid, and the thickness maps measured on them with the
run's own settings (eval.json's thickness method; the cylinder fitted on the truth, as
evaluate's thickness.csv). Figures draw these; nothing here draws."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from imask_jax.evaluation.paper.runs import EvaluatedRun, RunError

if TYPE_CHECKING:
  from data_pipelines.tissues import LabelScheme


@dataclasses.dataclass(frozen=True, eq=False)
class CaseMaps:
  """One case: the canonical truth, each run's canonical prediction (by run name, in the
  runs' order), the spacing in mm (canonical axes) and the label scheme."""

  case_id: str
  truth: np.ndarray
  predictions: dict[str, np.ndarray]
  spacing: tuple[float, float, float]
  scheme: LabelScheme
  thickness_method: str


def _source(run: EvaluatedRun) -> tuple[Any, LabelScheme]:
  """The run's volume source of its evaluated split, and its label scheme."""
  from data_pipelines.datasets import params as params_lib
  from data_pipelines.datasets import sources
  from data_pipelines.tissues import LabelScheme
  from imask_jax import workdir as workdir_lib

  config = workdir_lib.load_config(run.workdir)
  data_dir = str(run.info.get('data_dir') or workdir_lib.data_dir_for(config, run.workdir))
  split = str(run.info.get('split') or config.eval.split)
  source = sources.volume_source(params_lib.params_from_config(config, data_dir), data_dir, split)
  return source, LabelScheme.from_config(config)


def canonical_prediction(path: str) -> np.ndarray:
  """A predicted label map (evaluate's labels/<case>.nii.gz, on the input's grid) in
  canonical RAS+ (nibabel's closest-axis reorientation, as the readers apply to scans)."""
  if not os.path.isfile(path):
    raise RunError(f'{path}: no predicted label map; evaluate writes one per case')
  return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj).astype(np.int32)


def load_case(runs: Sequence[EvaluatedRun], case_id: str | None = None) -> CaseMaps:
  """`case_id` (default: the first case of the first run) of every run; the truth from the
  first run's data. RunError when a prediction is not on the truth's grid."""
  first = runs[0]
  case_id = case_id or first.cases[0]
  if case_id not in first.cases:
    raise RunError(f'case {case_id!r} is not among the evaluated cases: {", ".join(first.cases)}')
  source, scheme = _source(first)
  case = next((c for c in source.cases if c.case_id == case_id), None)
  if case is None:
    raise RunError(f'case {case_id!r} is not in split {source.split!r} of {first.workdir}')
  volume = source.load(case)
  truth = np.asarray(volume.labels, np.int32)
  predictions = {}
  for run in runs:
    pred = canonical_prediction(os.path.join(run.eval_dir, 'labels', f'{case_id}.nii.gz'))
    if pred.shape != truth.shape:
      raise RunError(
        f'{run.eval_dir}: the prediction of {case_id} has shape {pred.shape}, the truth '
        f'{truth.shape}; not the same data'
      )
    predictions[run.name] = pred
  method = str(first.info.get('thickness_method') or 'normal')
  return CaseMaps(
    case_id, truth, predictions, tuple(float(s) for s in volume.spacing), scheme, method
  )


def thickness_comparisons(maps: CaseMaps) -> dict[str, dict[str, Any]]:
  """Run name -> metrics.compare_thickness of its prediction against the truth (plate ->
  PlateComparison), measured as evaluate measures them (parts of a plate joined)."""
  from imask_jax import metrics

  scheme = maps.scheme
  if scheme.knee is None:
    raise RunError('thickness maps need knee evaluations; these runs have no knee labels')
  truth = scheme.with_parts_joined(maps.truth)
  comparisons = {}
  for name, pred in maps.predictions.items():
    try:
      comparisons[name] = metrics.compare_thickness(
        scheme.with_parts_joined(pred),
        truth,
        maps.spacing,
        labels=scheme.knee,
        angle_bin_deg=metrics.femoral_angle_bin_deg(maps.spacing),
        method=maps.thickness_method,
      )
    except ValueError as error:  # the truth lacks a plate: no map to draw
      raise RunError(f'case {maps.case_id}: {error}') from error
  return comparisons


def signed_surface_points(
  pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
  """(positions [N, 3] in mm, signed distance [N] in mm) of the prediction's border voxels:
  the distance to the truth's surface (metrics.directed_surface_distances), + where the voxel
  lies outside the truth (over-estimation), - inside: surface.py's sign convention."""
  from imask_jax import metrics

  border = metrics.surface_voxels(pred)
  distance = metrics.directed_surface_distances(pred, truth, spacing)
  index = np.argwhere(border)  # C order, as directed_surface_distances returns them
  sign = np.where(truth[border], -1.0, 1.0)
  return index * np.asarray(spacing, float), sign * distance
