"""Per-scan quality flags for predict: which predictions are probably wrong and worth a look.

`quality_flags(...)` gives a report's "quality" entry (`review`, `flags` of `code` and
`message`, the mean score of the painting detections), `side_flags` the knee side's flags; each
flagged scan also gets one CHECK line on screen. The scan is compared with the training
reference of `training_reference(...)`: per canonical (RAS+) axis the range of voxel sizes (mm),
voxel counts and extents (mm), per tissue the number of training volumes holding it and the range
of its volume (mL), kept in `<workdir>/training_reference.json`. A value is far from the training
data when it lies outside [their smallest / FAR, their largest x FAR], FAR = 2.

The rules (blank_image, no_detections, low_detection_score, paint_slots_full, tissue_missing,
tissue_volume, spacing, size; side_unknown, side_disagrees, side_conflict) and how the reference
is computed, stored and reused: docs/predict.md, 'Quality flags'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import nibabel as nib
import numpy as np

from data_pipelines import metaimage, nifti_io, orientation, readers
from data_pipelines.atomic import atomic_path
from data_pipelines.datasets import params as dataset_params
from data_pipelines.datasets import sources
from data_pipelines.errors import DataError

FAR = 2.0
LOW_MEAN_SCORE = 0.75
PRESENT_FRACTION = 0.5
REFERENCE_FILE = 'training_reference.json'
REFERENCE_FORMAT = 1
AXES = ('x', 'y', 'z')


class ReferenceUnavailable(RuntimeError):
  """The training data is not on this machine and the workdir holds no stored reference."""


# --- the training reference ---------------------------------------------------------------------


def _label_path(case: readers.Case, reader: str) -> str:
  if reader:
    return case.labels[reader]
  if readers.DEFAULT_READER in case.labels:
    return case.labels[readers.DEFAULT_READER]
  return next(iter(case.labels.values()))


def _training_cases(
  config: ml_collections.ConfigDict, data_dir: str
) -> tuple[dataset_params.DatasetParams, list[readers.Case]]:
  """The training split's cases, or ReferenceUnavailable when the raw data is not here (a
  phantom folder is never generated for this)."""
  params = dataset_params.params_from_config(config, data_dir)
  root = sources.phantom_dir(params, data_dir) if params.is_phantom else params.source_dir
  if not os.path.isdir(root) or (
    params.is_phantom and not os.path.isfile(os.path.join(root, 'dataset.json'))
  ):
    raise ReferenceUnavailable(f'{root}: the training data is not on this machine')
  folder = sources.open_folder(params, data_dir)
  cases = list(sources.split_assignment(params, folder).get('train', ()))
  if not cases:
    raise ReferenceUnavailable(f'{root}: the dataset has no training split')
  return params, cases


def reference_key(params: dataset_params.DatasetParams, cases: Sequence[readers.Case]) -> str:
  """SHA-256 of the dataset settings and each training label file's path, size and mtime."""
  files = []
  for case in cases:
    path = _label_path(case, params.reader)
    stat = os.stat(path)
    files.append([case.case_id, os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
  text = json.dumps(
    {'format': REFERENCE_FORMAT, 'params': dataclasses.asdict(params), 'files': files},
    sort_keys=True,
  )
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def _range(rows: Sequence[Sequence[float]]) -> dict[str, list[float]]:
  table = np.asarray(rows, float)
  return {'min': table.min(axis=0).tolist(), 'max': table.max(axis=0).tolist()}


def compute_reference(
  params: dataset_params.DatasetParams,
  cases: Sequence[readers.Case],
  names_by_value: Mapping[int, str],
) -> dict[str, Any]:
  """The training reference (docs/predict.md, 'Quality flags') of `cases`: image headers and
  label files only.
  names_by_value: label value (every merged one) -> class name; values of one class add up."""
  spacings, shapes, extents = [], [], []
  tissue_ml: dict[str, list[float]] = {name: [] for name in names_by_value.values()}
  for case in cases:
    header = nib.load(case.image)
    affine = nifti_io.check_affine(header.affine, case.image)
    grid = orientation.SourceGrid.from_affine(header.shape[:3], affine)
    spacing = np.asarray(grid.canonical_spacing, float)
    shape = np.asarray(grid.canonical_shape, float)
    spacings.append(spacing)
    shapes.append(shape)
    extents.append(spacing * shape)
    path = _label_path(case, params.reader)
    labels = (
      metaimage.read_metaimage(path).data
      if path.endswith('.mhd')
      else nifti_io.load_nifti_labels(path).data
    )
    if labels.size != int(np.prod(shape)):
      raise DataError(
        path,
        f'label map does not match its image {case.image}',
        found=labels.shape,
        expected=tuple(int(n) for n in header.shape[:3]),
      )
    counts = np.bincount(np.asarray(labels, np.uint8).ravel(), minlength=256)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    case_ml = dict.fromkeys(tissue_ml, 0.0)
    for value, name in names_by_value.items():  # several values of one class add up
      case_ml[name] += float(counts[int(value)]) * voxel_ml
    for name, ml in case_ml.items():
      tissue_ml[name].append(ml)
  tissues = {}
  for name, values in tissue_ml.items():
    present = [v for v in values if v > 0]
    tissues[name] = {
      'present_in': len(present),
      'min_ml': min(present) if present else 0.0,
      'max_ml': max(values),
      'median_ml': float(np.median(present)) if present else 0.0,
    }
  return {
    'format': REFERENCE_FORMAT,
    'dataset': params.dataset,
    'split': 'train',
    'volumes': len(cases),
    'spacing_mm': _range(spacings),
    'shape': _range(shapes),
    'extent_mm': _range(extents),
    'tissues_ml': tissues,
  }


def training_reference(
  workdir: str, config: ml_collections.ConfigDict, data_dir: str, names_by_value: Mapping[int, str]
) -> tuple[dict[str, Any], str]:
  """(reference, where it came from) for a trained workdir: the stored one when its key still
  matches the data (or the data is not here), else computed and stored (atomically; a
  read-only workdir just keeps it in memory). ReferenceUnavailable when there is neither."""
  path = os.path.join(workdir, REFERENCE_FILE)
  stored = None
  try:
    with open(path, encoding='utf-8') as f:
      stored = json.load(f)
    if not isinstance(stored, dict) or stored.get('format') != REFERENCE_FORMAT:
      stored = None
  except (OSError, ValueError):
    stored = None
  try:
    params, cases = _training_cases(config, data_dir)
  except ReferenceUnavailable as error:
    if stored is None:
      raise
    return stored, f'{path} (stored; {error}, so it was not checked against the data)'
  key = reference_key(params, cases)
  if stored is not None and stored.get('key') == key:
    return stored, path
  reference = dict(compute_reference(params, cases, names_by_value), key=key)
  try:
    with atomic_path(path) as tmp:
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(reference, f, indent=1, allow_nan=False)
        f.write('\n')
  except OSError as error:
    return reference, (
      f'computed from {len(cases)} training volumes (not stored: {error.strerror or error})'
    )
  return reference, f'{path} (computed from {len(cases)} training volumes)'


# --- the flags ----------------------------------------------------------------------------------


def _flag(code: str, message: str) -> dict[str, str]:
  return {'code': code, 'message': message}


def _outside(value: float, low: float, high: float) -> bool:
  return value < low / FAR or value > high * FAR


def quality_flags(
  *,
  image_constant: bool,
  volumes_ml: Mapping[str, float],
  spacing: Sequence[float],
  shape: Sequence[int],
  scores: Sequence[float],
  score_threshold: float,
  reference: Mapping[str, Any] | None,
  resampled_axes: Sequence[int] = (),
  unpainted: int | None = None,
  side: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """The "quality" entry of a report (the rules: docs/predict.md, 'Quality flags').

  volumes_ml: tissue name -> predicted volume (mL); spacing (mm) and shape (voxels): along the
  canonical X, Y, Z axes; scores: every detection's score (any order); resampled_axes: the
  canonical axes the model resamples to its own pixel size (their voxel size and count are not
  checked, their extent is); unpainted: painting detections left without a mask slot
  (`VolumePrediction.unpainted_detections`; None: every detection had one); side: the report's
  "side" block (knee models; None: no side rules). Returns {"review":
  whether any flag is raised, "flags": [{"code", "message"}], "mean_detection_score" (of the
  detections >= score_threshold, or None), "painting_detections": their number}.
  """
  flags = []
  painting = [float(s) for s in scores if s >= score_threshold]
  mean_score = float(np.mean(painting)) if painting else None
  if image_constant:
    flags.append(_flag('blank_image', 'every voxel of the image has the same value'))
  if not painting:
    flags.append(
      _flag('no_detections', f'no detection scored >= {score_threshold:g}; the label map is empty')
    )
  elif mean_score < LOW_MEAN_SCORE:
    flags.append(
      _flag(
        'low_detection_score',
        f'mean detection score {mean_score:.3f} < {LOW_MEAN_SCORE} over {len(painting)} detections',
      )
    )
  if unpainted:
    flags.append(
      _flag(
        'paint_slots_full',
        f'{unpainted} detections scoring >= {score_threshold:g} found no mask slot and are '
        'missing from the label map; raise model.paint_slots_per_class',
      )
    )
  if reference is not None:
    volumes = int(reference['volumes'])
    for name, ml in volumes_ml.items():
      ref = reference['tissues_ml'].get(name)
      if ref is None:
        continue
      if ml == 0:
        if ref['present_in'] >= PRESENT_FRACTION * volumes:
          flags.append(
            _flag(
              'tissue_missing',
              f'no {name}, which {ref["present_in"]} of {volumes} training volumes hold',
            )
          )
      elif ref['present_in'] and _outside(ml, ref['min_ml'], ref['max_ml']):
        low, high = ref['min_ml'], ref['max_ml']
        flags.append(
          _flag(
            'tissue_volume',
            f'{name} {ml:.3g} mL, outside '
            f'[{low / FAR:.3g}, {high * FAR:.3g}] mL (training {low:.3g} to '
            f'{high:.3g} mL, x/{FAR:g} to x{FAR:g})',
          )
        )
    extent = [float(s) * int(n) for s, n in zip(spacing, shape)]
    for code, key, values, unit in (
      ('spacing', 'spacing_mm', spacing, ' mm'),
      ('size', 'shape', shape, ' voxels'),
      ('size', 'extent_mm', extent, ' mm'),
    ):
      low, high = reference[key]['min'], reference[key]['max']
      axes = range(3) if key == 'extent_mm' else [i for i in range(3) if i not in resampled_axes]
      bad = [i for i in axes if _outside(float(values[i]), low[i], high[i])]
      if bad:
        what = (
          'voxel size' if code == 'spacing' else ('extent' if key == 'extent_mm' else 'voxel count')
        )
        flags.append(
          _flag(
            code,
            f'{what} '
            + ', '.join(
              f'{AXES[i]} {float(values[i]):.4g}{unit} (training {low[i]:.4g} to {high[i]:.4g})'
              for i in bad
            )
            + f', beyond x/{FAR:g} to x{FAR:g}',
          )
        )
  flags += side_flags(side)
  return {
    'review': bool(flags),
    'flags': flags,
    'mean_detection_score': None if mean_score is None or math.isnan(mean_score) else mean_score,
    'painting_detections': len(painting),
  }


def side_flags(side: Mapping[str, Any] | None) -> list[dict[str, str]]:
  """The side rules (docs/predict.md, 'Quality flags') on a report's "side" block."""
  if side is None:
    return []
  flags = []
  if side.get('conflict'):
    flags.append(
      _flag('side_conflict', f"{side['conflict']}; the side reported is the anatomy's estimate")
    )
  if side['side'] is None:
    flags.append(_flag('side_unknown', f'medial and lateral are not known: {side["basis"]}'))
  elif side['declared'] and side['estimated'] and side['declared'] != side['estimated']:
    flags.append(
      _flag(
        'side_disagrees',
        f'{side["basis"]}, but the anatomy suggests a {side["estimated"]} knee '
        f'({side["estimate_basis"]})',
      )
    )
  return flags
