"""Prediction on new scans: NIfTI or DICOM in -> label NIfTI on the input's exact grid + report.

  python -m imask_jax.predict --workdir DIR --input IN --output OUT [--checkpoint STEP]
      [--overwrite]

IN is, by the first rule that applies:
  (a) a NIfTI file (.nii / .nii.gz): one input;
  (b) a folder holding NIfTI files: each is an input (hidden and other files and subfolders
      are skipped and named);
  (c) a folder that directly holds DICOM files (files SimpleITK reads as DICOM): it is one
      input, the series in it (a folder of several series is refused when read: one series
      per folder);
  (d) a folder whose subfolders hold DICOM files: each such subfolder is an input, one series
      each (other entries are skipped and named).
A DICOM series is read as data_pipelines/dicom_io.py states (its checks, the RAS+ affine of its
geometry). OUT is a folder: each input `<name>.nii.gz` (an nnU-Net channel suffix `_0000` is
dropped from the name) or series folder `<name>` gets
  OUT/<name>.nii.gz   the label map: exactly the input's shape and affine (a series: [columns,
                      rows, slices] and its geometry in RAS+, so it overlays the series in
                      ITK-SNAP or 3D Slicer), the input NIfTI's header otherwise, uint8 label
                      values of the config (data.class_label_values)
  OUT/<name>.json     the report: tissue volumes in mL; knee: mean and regional cartilage
                      thickness; hip: effusion volume (right, left, total); "quality": flags
                      of a probably wrong prediction (imask_jax/quality.py states the rules:
                      blank image, no or low-scoring detections, a tissue missing or far
                      outside the training volumes, spacing or size far from the training
                      data), also printed as one CHECK line per flagged scan; the scan's
                      in-plane pixel spacing beside the one the network ran at
                      (slice_pixel_spacing_mm, network_pixel_spacing_mm, resampling)
For a single input file or series folder (a, c) OUT may instead be the label map's own name
(ending in .nii or .nii.gz); the report then goes beside it, with .json in place of the NIfTI
suffix.

Refused before any work, in one line with exit status 2: a workdir without config.json, a
--checkpoint that is not stored, a checkpoint that cannot be restored (--verbose adds the
traceback of these three), an output path that is one of the inputs, an OUT that is the input
folder, an output inside a DICOM series folder of the inputs (a later run would read the folder
as NIfTI), two inputs that would write the same output, an output folder that cannot be created
or written, and an existing file at an output path that predict did not write: that is
replaced only when the report beside it (OUT/<name>.json) names the same input and that label
map, i.e. it is an earlier prediction of this scan, or with --overwrite. An input that cannot
be read, or fails, is reported by its name and the others still run; the exit status is then 1.
Every file is written atomically (a failure leaves no half-written output); hidden temporaries
that a killed run left beside this run's outputs are removed first.

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

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, TextIO

import nibabel as nib
import numpy as np

from data_pipelines import dicom_io, nifti_io, orientation
from data_pipelines.atomic import atomic_path, remove_stale_temporaries
from data_pipelines.errors import DataError
from data_pipelines.tissues import LabelScheme
from imask_jax import configs, inference, metrics, quality
from imask_jax import workdir as workdir_lib
from imask_jax.inference import VolumePrediction

NNUNET_CHANNEL_SUFFIX = '_0000'
FEMORAL_BANDS_DEG = {
  'posterior': (-180.0, -45.0),
  'central': (-45.0, 45.0),
  'anterior': (45.0, 180.0),
}
EXIT_OK, EXIT_FAILED_INPUTS, EXIT_REFUSED = 0, 1, 2


# --- what goes where ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  """One input scan and the two files it produces (absolute paths)."""

  input: str
  label_map: str
  report: str


def list_inputs(path: str) -> tuple[list[str], list[str]]:
  """(inputs, skipped names) of --input by the rules (a)-(d) of the module docstring: NIfTI
  files or DICOM series folders; raises ValueError when there is none."""
  path = os.path.abspath(path)
  if os.path.isfile(path):
    if not nifti_io.is_nifti_path(path):
      raise ValueError(
        f'--input {path}: not a NIfTI file name (expected {" or ".join(nifti_io.NIFTI_SUFFIXES)};'
        ' a DICOM series is given by its folder)'
      )
    return [path], []
  if not os.path.isdir(path):
    raise ValueError(f'--input {path}: no such file or folder')
  names = sorted(n for n in os.listdir(path) if not n.startswith('.'))
  inputs = [
    os.path.join(path, n)
    for n in names
    if nifti_io.is_nifti_path(n) and os.path.isfile(os.path.join(path, n))
  ]
  if not inputs:
    if dicom_io.holds_dicom_files(path):
      return [path], []
    inputs = [
      os.path.join(path, n)
      for n in names
      if os.path.isdir(os.path.join(path, n)) and dicom_io.holds_dicom_files(os.path.join(path, n))
    ]
  skipped = [n for n in names if os.path.join(path, n) not in inputs]
  if not inputs:
    raise ValueError(
      f'--input {path}: the folder holds no NIfTI file (.nii or .nii.gz), no DICOM files and '
      'no subfolder of DICOM files'
    )
  return inputs, skipped


def output_stem(input_path: str) -> str:
  """'knee_0001_0000.nii.gz' -> 'knee_0001' (nnU-Net channel suffix dropped); a DICOM series
  folder -> its name."""
  if os.path.isdir(input_path):
    return os.path.basename(os.path.normpath(input_path))
  stem = nifti_io.strip_nifti_suffix(os.path.basename(input_path))
  if stem.endswith(NNUNET_CHANNEL_SUFFIX) and len(stem) > len(NNUNET_CHANNEL_SUFFIX):
    stem = stem[: -len(NNUNET_CHANNEL_SUFFIX)]
  return stem


def plan_jobs(input_path: str, inputs: Sequence[str], output: str) -> list[Job]:
  """The output files of every input; ValueError (nothing written yet) when an output would
  overwrite an input, OUT is the input folder, an output would land in a DICOM series folder
  of the inputs, or two inputs would share an output."""
  output = os.path.abspath(output)
  # One NIfTI file (a) or one series folder (c): OUT may be the label map's name.
  single = os.path.isfile(input_path) or list(inputs) == [input_path]
  if single and nifti_io.is_nifti_path(output):
    jobs = [Job(inputs[0], output, nifti_io.strip_nifti_suffix(output) + '.json')]
  else:
    if os.path.isfile(output):
      raise ValueError(
        f'--output {output} is a file; expected a folder (or, for a single '
        'input file, the label map name ending in .nii.gz)'
      )
    if not single and os.path.realpath(output) == os.path.realpath(input_path):
      raise ValueError(
        f'--output {output} is the input folder; refusing to write label maps '
        'among the scans (a later run would read them as inputs)'
      )
    jobs = [
      Job(
        p,
        os.path.join(output, output_stem(p) + '.nii.gz'),
        os.path.join(output, output_stem(p) + '.json'),
      )
      for p in inputs
    ]
  by_output: dict[str, str] = {}
  for job in jobs:
    if job.label_map in by_output:
      raise ValueError(
        f'inputs {by_output[job.label_map]} and {job.input} would both write '
        f'{job.label_map}; rename one of them'
      )
    by_output[job.label_map] = job.input
  sources = {os.path.realpath(p): p for p in inputs}
  for job in jobs:
    for path in (job.label_map, job.report):
      if os.path.realpath(path) in sources:
        raise ValueError(
          f'output {path} is the input {sources[os.path.realpath(path)]}; '
          'refusing to overwrite an input (choose another --output)'
        )
  series = {os.path.realpath(p): p for p in inputs if os.path.isdir(p)}
  for job in jobs:
    folder = os.path.realpath(os.path.dirname(job.label_map))
    if folder in series:
      raise ValueError(
        f'output {job.label_map} is inside the DICOM series folder {series[folder]}; refusing '
        'to write among the slices (a later run would read the folder as NIfTI; choose '
        'another --output)'
      )
  return jobs


def earlier_prediction(job: Job) -> bool:
  """Whether the report at `job.report` is predict's report of this very input and label map
  (so the two files there are an earlier prediction of the same scan, safe to replace)."""
  try:
    with open(job.report, encoding='utf-8') as f:
      report = json.load(f)
  except (OSError, ValueError):
    return False
  if not isinstance(report, dict) or not all(
    isinstance(report.get(k), str) for k in ('input', 'label_map')
  ):
    return False
  return os.path.realpath(report['input']) == os.path.realpath(job.input) and os.path.realpath(
    report['label_map']
  ) == os.path.realpath(job.label_map)


def check_overwrites(jobs: Sequence[Job], overwrite: bool = False) -> None:
  """ValueError unless every existing output is an earlier prediction of its own input
  (`earlier_prediction`); `overwrite` allows replacing any file (never a folder, never an
  input: plan_jobs refuses those)."""
  for job in jobs:
    for path in (job.label_map, job.report):
      if os.path.isdir(path):
        raise ValueError(
          f'output {path} is a folder; refusing to replace it (choose another --output)'
        )
    existing = [p for p in (job.label_map, job.report) if os.path.lexists(p)]
    if not existing or overwrite or earlier_prediction(job):
      continue
    raise ValueError(
      f'output {existing[0]} exists and is not an earlier prediction of {job.input} (no '
      f'report {job.report} naming that input and label map); refusing to overwrite it '
      '(choose another --output, or pass --overwrite to replace it)'
    )


def prepare_output_folders(jobs: Sequence[Job]) -> list[str]:
  """Creates the output folders and proves each writable by creating and removing a hidden
  file in it; ValueError naming the folder otherwise. Returns the folders it created
  (outermost first), so that a run that writes nothing can remove them again."""
  created: list[str] = []
  for folder in dict.fromkeys(os.path.dirname(j.label_map) for j in jobs):
    missing = []
    parent = folder
    while not os.path.lexists(parent):
      missing.append(parent)
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise ValueError(
        f'--output {folder}: cannot create the output folder, {parent} is a file, not a folder'
      )
    try:
      os.makedirs(folder, exist_ok=True)
      created += missing[::-1]
      fd, probe = tempfile.mkstemp(prefix=f'.predict-write-test.{os.getpid()}-', dir=folder)
      os.close(fd)
      os.remove(probe)
    except OSError as error:
      raise ValueError(
        f'--output {folder}: cannot write into the output folder ({error.strerror or error})'
      ) from error
  return created


def _remove_empty_folders(folders: Sequence[str]) -> None:
  for folder in reversed(folders):
    try:
      os.rmdir(folder)
    except OSError:
      return


# --- the report ---------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
  return float(value) if math.isfinite(value) else None


def _mean_cells(cells: np.ndarray) -> float | None:
  filled = cells[np.isfinite(cells)]
  return float(filled.mean()) if filled.size else None


def femoral_thickness(
  label_map: np.ndarray,
  spacing: Sequence[float],
  knee: metrics.KneeLabelValues,
  method: str = 'nearest',
) -> dict[str, Any]:
  """Mean and regional femoral cartilage thickness (mm) of a canonical label map, measured
  with thickness `method` (metrics.interface_thickness)."""
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
  method: str = 'nearest',
) -> dict[str, Any]:
  """Mean and right/left tibial cartilage thickness (mm) of a canonical label map, measured
  with thickness `method` (metrics.interface_thickness)."""
  m = metrics.tibial_thickness_map(label_map, spacing, labels=knee, method=method)
  if len(m.points.thickness_mm) == 0:
    return {
      'status': 'not_measured',
      'reason': f'no tibial cartilage (label {knee.tibial_cartilage}) touches the tibia '
      f'(label {knee.tibia})',
    }
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
  scheme: LabelScheme,
  job: Job,
  model: inference.LoadedModel,
  *,
  image_constant: bool = False,
  reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The JSON report of one predicted volume (see the module docstring). `reference`: the
  training reference of quality.py (None skips the checks that need it); image_constant:
  whether every voxel of the input has one value."""
  spacing = prediction.spacing
  volumes = metrics.volumes_ml_per_label(prediction.canonical, spacing, scheme.label_values)
  report: dict[str, Any] = {
    'input': job.input,
    'label_map': job.label_map,
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
    method = configs.thickness_method(model.config)
    report['cartilage_thickness'] = {
      'femoral': femoral_thickness(prediction.canonical, spacing, scheme.knee, method),
      'tibial': tibial_thickness(prediction.canonical, spacing, scheme.knee, method),
      'method': method,
      'regions': 'patient right/left (not medial/lateral); see imask_jax/predict.py',
    }
  if scheme.effusion_value is not None:
    report['effusion_ml'] = metrics.effusion_ml_by_side(
      prediction.canonical, spacing, scheme.effusion_value
    )
  scores = [inst.score for slice_ in prediction.instances or () for inst in slice_]
  report['quality'] = quality.quality_flags(
    image_constant=image_constant,
    volumes_ml=report['volumes_ml'],
    spacing=spacing,
    shape=prediction.canonical.shape,
    scores=scores,
    score_threshold=float(model.config.model.label_score_threshold),
    reference=reference,
    resampled_axes=resampled_axes(model.config),
  )
  return report


def resampled_axes(config: Any) -> tuple[int, ...]:
  """The canonical axes a scale-true model resamples to its pixel size: the slice plane's rows
  and columns (none when it resizes to fit)."""
  if not config.data.get('pixel_spacing_mm'):
    return ()
  axes = orientation.plane_axes(str(config.data.plane))
  return (axes.row_axis, axes.col_axis)


def write_json(path: str, obj: Any) -> str:
  with atomic_path(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=1, allow_nan=False)
      f.write('\n')
  return path


# --- the command --------------------------------------------------------------------------------


class ProgressBar:
  """A one-line bar over volumes on a terminal; one line per volume otherwise (logs)."""

  def __init__(self, total: int, stream: TextIO, width: int = 28):
    self.total, self.stream, self.width = total, stream, width
    self.live = hasattr(stream, 'isatty') and stream.isatty()

  def show(self, done: int, text: str) -> None:
    filled = round(self.width * done / max(self.total, 1))
    line = f'[{"#" * filled}{"." * (self.width - filled)}] {done}/{self.total} {text}'
    if self.live:
      self.stream.write('\r' + line + ('\n' if done == self.total else ''))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def note(self, text: str) -> None:
    """A message on its own line (errors), leaving the bar intact below it."""
    self.stream.write(('\n' if self.live else '') + text + '\n')
    self.stream.flush()


def predict_one(
  model: inference.LoadedModel, job: Job, reference: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Reads, segments and writes one scan; returns its report."""
  volume = inference.load_image(
    job.input, str(model.config.data.plane), case_id=output_stem(job.input)
  )
  prediction = inference.predict_volume(model, volume, keep_instances=True)
  if prediction.label_map.shape != volume.grid.shape:
    raise AssertionError(
      f'{job.input}: label map shape {prediction.label_map.shape} differs '
      f'from the input grid {volume.grid.shape}'
    )
  nifti_io.save_nifti(
    prediction.label_map, volume.grid.affine, job.label_map, like=header_template(job.input)
  )
  report = volume_report(
    prediction,
    model.scheme,
    job,
    model,
    reference=reference,
    image_constant=bool(volume.image.min() == volume.image.max()),
  )
  write_json(job.report, report)
  return report


def header_template(input_path: str) -> str | nib.Nifti1Image:
  """The header a label map copies: the input NIfTI's own; for a DICOM series folder a blank
  NIfTI-1 header in mm with scanner coordinates (qform and sform code 1, as dcm2niix writes;
  save_nifti sets the affine)."""
  if not os.path.isdir(input_path):
    return input_path
  template = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4))
  template.header.set_xyzt_units('mm')
  template.set_sform(np.eye(4), code=1)
  template.set_qform(np.eye(4), code=1)
  return template


def load_reference(model: inference.LoadedModel, stream: TextIO) -> dict[str, Any] | None:
  """The training reference of quality.py for `model`, saying on `stream` where it came from;
  None (and why) when there is none."""
  try:
    data_dir = workdir_lib.data_dir_for(model.config, model.workdir)
    reference, where = quality.training_reference(
      model.workdir, model.config, data_dir, model.scheme.names_by_value
    )
  except (quality.ReferenceUnavailable, DataError, OSError) as error:
    stream.write(
      f'predict: no training reference ({error}); the tissue, spacing and size checks are skipped\n'
    )
    return None
  stream.write(f'predict: quality checks against the training reference {where}\n')
  return reference


def predict_command(
  workdir: str,
  input_path: str,
  output: str,
  *,
  checkpoint: int | None = None,
  overwrite: bool = False,
  model: inference.LoadedModel | None = None,
  stream: TextIO | None = None,
  verbose: bool = False,
) -> int:
  """Runs the whole command; returns the exit status (0 all written, 1 some inputs failed,
  2 refused before any work). `model`: an already loaded checkpoint of `workdir`.
  `overwrite`: replace existing files at the output paths even if predict did not write them.
  `verbose`: raise a workdir or checkpoint mistake (with its traceback) instead of the
  one-line refusal. `stream`: where progress and messages go (default: sys.stderr)."""
  stream = sys.stderr if stream is None else stream
  try:
    inputs, skipped = list_inputs(input_path)
    jobs = plan_jobs(os.path.abspath(input_path), inputs, output)
    check_overwrites(jobs, overwrite)
    created = prepare_output_folders(jobs)
  except ValueError as error:
    stream.write(f'predict: refused: {error}\n')
    return EXIT_REFUSED
  kind = 'a DICOM series folder' if os.path.isdir(inputs[0]) else 'a NIfTI file'
  for name in skipped:
    stream.write(f'predict: skipped {name} (not {kind})\n')
  for job in jobs:
    for leftover in remove_stale_temporaries(job.label_map) + remove_stale_temporaries(job.report):
      stream.write(f'predict: removed {leftover} (the temporary of a run that was killed)\n')
  if model is None:
    try:
      model = inference.load_model(workdir, checkpoint)
    except workdir_lib.USER_ERRORS as error:
      # No workdir there, no such checkpoint, or one that cannot be restored: refused, in one
      # line (predict's main shows the traceback with --verbose).
      _remove_empty_folders(created)
      if verbose:
        raise
      stream.write(f'predict: refused: {type(error).__name__}: {error}\n')
      return EXIT_REFUSED
    except BaseException:
      _remove_empty_folders(created)
      raise
  reference = load_reference(model, stream)
  bar = ProgressBar(len(jobs), stream)
  failures: list[tuple[str, str]] = []
  flagged: list[str] = []
  for done, job in enumerate(jobs, start=1):
    started = time.time()
    try:
      report = predict_one(model, job, reference)
      status = f'{os.path.basename(job.input)} ({time.time() - started:.1f} s)'
      if report['quality']['review']:
        flagged.append(os.path.basename(job.input))
        bar.note(
          f'predict: CHECK {job.input}: '
          + '; '.join(f'{f["code"]}: {f["message"]}' for f in report['quality']['flags'])
        )
    except Exception as error:  # noqa: BLE001 - one bad scan must not stop the others
      message = str(error) if job.input in str(error) else f'{job.input}: {error}'
      failures.append((job.input, f'{type(error).__name__}: {message}'))
      bar.note(f'predict: FAILED {failures[-1][1]}')
      status = f'{os.path.basename(job.input)} FAILED'
    bar.show(done, status)
  written = len(jobs) - len(failures)
  stream.write(
    f'predict: {written} of {len(jobs)} volumes written to {os.path.dirname(jobs[0].label_map)}\n'
  )
  if flagged:
    stream.write(
      f'predict: {len(flagged)} of {written} flagged for review ("quality" in their '
      f'reports): {", ".join(flagged)}\n'
    )
  if failures:
    stream.write(
      f'predict: {len(failures)} failed:\n' + ''.join(f'  {message}\n' for _, message in failures)
    )
    return EXIT_FAILED_INPUTS
  return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m imask_jax.predict',
    description='Segment NIfTI scans or DICOM series with a trained checkpoint: a label map '
    "on each input's grid and a JSON report of volumes, cartilage thickness or effusion.",
  )
  parser.add_argument('--workdir', required=True, help='training workdir (has config.json)')
  parser.add_argument(
    '--input',
    required=True,
    help='a NIfTI file or a folder of them, a DICOM series folder, or a folder of series folders',
  )
  parser.add_argument(
    '--output',
    required=True,
    help='output folder (or, for one input file or series, the label map file name)',
  )
  parser.add_argument(
    '--checkpoint', type=int, default=None, help='checkpoint step (default: the latest)'
  )
  parser.add_argument(
    '--overwrite',
    action='store_true',
    help='replace files at the output paths even when they are not earlier '
    'predictions of the same inputs (inputs are never replaced)',
  )
  parser.add_argument(
    '--verbose', action='store_true', help='show the traceback of a workdir or checkpoint mistake'
  )
  args = parser.parse_args(argv)
  return predict_command(
    args.workdir,
    args.input,
    args.output,
    checkpoint=args.checkpoint,
    overwrite=args.overwrite,
    verbose=args.verbose,
  )


if __name__ == '__main__':
  sys.exit(main())
