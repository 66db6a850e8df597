"""Prediction on new scans: NIfTI or DICOM in -> label NIfTI on the input's exact grid + report.

  python -m imask_jax.predict --workdir DIR --input IN --output OUT [--checkpoint STEP]
      [--overwrite] [--shard K/N] [--sequential] [--side left|right]

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
  OUT/<name>.json     the report (imask_jax/scan_report.py): tissue volumes in mL; knee:
                      mean and regional cartilage thickness; hip: effusion volume (right,
                      left, total); "quality": flags of a probably wrong prediction
                      (imask_jax/quality.py states the rules: blank image, no or low-scoring
                      detections, a tissue missing or far outside the training volumes,
                      spacing or size far from the training data), also printed as one
                      CHECK line per flagged scan; the scan's in-plane pixel spacing beside
                      the one the network ran at (slice_pixel_spacing_mm,
                      network_pixel_spacing_mm, resampling); knee: "side", left or right
                      knee and its basis (scan_report.side_report): what --side (for every
                      input of the run) or the scan declares (data_pipelines/laterality.py:
                      DICOM Laterality tags or series description, a JSON sidecar
                      <stem>.json beside a NIfTI file) beside the anatomical estimate
                      (imask_jax/metrics/side.py); a scan whose declarations contradict each
                      other is not failed but flagged (side_conflict) and takes the estimate
For a single input file or series folder (a, c) OUT may instead be the label map's own name
(ending in .nii or .nii.gz); the report then goes beside it, with .json in place of the NIfTI
suffix.

Refused before any work, in one line with exit status 2: a --shard that is not K/N with
0 <= K < N, a workdir without config.json, a --checkpoint that is not stored, a checkpoint that
cannot be restored (--verbose adds the traceback of these three), an output path that is one of
the inputs, an OUT that is the input folder, an output inside a DICOM series folder of the
inputs (a later run would read the folder as NIfTI), two inputs that would write the same
output, an output folder that cannot be created or written, and an existing file at an output
path that predict did not write: that is replaced only when the report beside it
(OUT/<name>.json) names the same input and that label map, i.e. it is an earlier prediction of
this scan, or with --overwrite. An input that cannot be read, segmented or written is reported
by its name and the others still run; the exit status is then 1. Every file is written
atomically (a failure leaves no half-written output), a scan's report before its label map (so a
label map on disk always has its report; a label map that cannot be written puts the report path
back as it was); hidden temporaries that a killed run left beside this run's outputs are removed
first.

Cohorts. While the model segments scan i, one background thread reads scan i+1 and another
writes scan i-1's report and label map (at most one scan read ahead and one write pending, so
at most three scans are in memory); progress, CHECK and FAILED lines come in the inputs' order,
and the files are those of --sequential, which runs the three stages one after the other.
--shard K/N (K counts from 0) makes this process segment only the scans at positions K, K+N,
K+2N, ... of the sorted inputs: N processes, on one machine or on hosts sharing the folders,
started with the same arguments and K = 0 .. N-1 write every scan exactly once, e.g.
  for k in 0 1 2 3; do python -m imask_jax.predict ... --shard $k/4 & done; wait
(with a SLURM array of N tasks: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT for
--array=0-(N-1)). Every shard lists and checks the whole plan (the refusals above), so all
shards refuse or none does, and a shard that starts late sees the others' files as earlier
predictions; it removes stale temporaries of, and writes, only its own scans. The inputs must
not change while the shards start: each lists them itself. Throughput on 2 CPU cores:
benchmarks/README.md ("Predict throughput").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TextIO

import nibabel as nib
import numpy as np

from data_pipelines import dicom_io, laterality, nifti_io, readers
from data_pipelines.atomic import atomic_path, remove_stale_temporaries
from data_pipelines.errors import DataError
from imask_jax import quality

if TYPE_CHECKING:  # imported where used: `--help` answers without JAX and TensorFlow
  from imask_jax import inference
  from imask_jax.inference import VolumePrediction

NNUNET_CHANNEL_SUFFIX = '_0000'
EXIT_OK, EXIT_FAILED_INPUTS, EXIT_REFUSED = 0, 1, 2


# --- what goes where ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  """One input scan and the two files it produces (absolute paths); side: --side, what the user
  declares of it ('left', 'right' or None)."""

  input: str
  label_map: str
  report: str
  side: str | None = None


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


def parse_shard(text: str) -> tuple[int, int]:
  """'K/N' -> (K, N): this process's share of the plan, K counted from 0 (0 <= K < N, so the N
  shards are 0/N ... N-1/N); ValueError, in one line, otherwise."""
  match = re.fullmatch(r'(\d+)/(\d+)', text.strip())
  if match:
    k, n = int(match.group(1)), int(match.group(2))
    if 0 <= k < n:
      return k, n
  raise ValueError(
    f'--shard {text!r}: expected K/N with 0 <= K < N (K counts from 0: the shards of N=2 are '
    '0/2 and 1/2)'
  )


def shard_jobs(jobs: Sequence[Job], shard: tuple[int, int] | None) -> list[Job]:
  """Shard (K, N)'s jobs: those at positions K, K+N, K+2N, ... of the plan (sorted by input
  name). The N shards of one plan are disjoint and together are the whole plan; spreading
  them round-robin keeps the shards' sizes within one scan of each other."""
  if shard is None:
    return list(jobs)
  k, n = parse_shard(f'{shard[0]}/{shard[1]}')
  return list(jobs[k::n])


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


# --- files ---------------------------------------------------------------------------------------


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


# --- one scan in three stages: read, segment, write ---------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Scan:
  """A job's input, read: the canonical volume and whether every voxel has one value; knee
  models: the side declared (laterality.declared_side) or the contradiction of its sources."""

  job: Job
  volume: readers.Volume
  image_constant: bool
  read_s: float
  declared_side: laterality.DeclaredSide | None = None
  side_conflict: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Segmented:
  """A job's prediction and what the write stage needs (not the image: it is dropped here)."""

  job: Job
  prediction: VolumePrediction
  image_constant: bool
  read_s: float
  segment_s: float
  declared_side: laterality.DeclaredSide | None = None
  side_conflict: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Outcome:
  """What became of one job: its report, or `error` (one line naming the input) if it failed.
  The seconds each stage took (stages of different scans overlap when pipelined)."""

  job: Job
  report: dict[str, Any] | None = None
  error: str | None = None
  read_s: float = 0.0
  segment_s: float = 0.0
  write_s: float = 0.0


def read_scan(model: inference.LoadedModel, job: Job) -> Scan:
  """Stage 1 (no model, runs beside the segmentation of another scan): reads the input."""
  from imask_jax import inference

  started = time.perf_counter()
  volume = inference.load_image(
    job.input,
    str(model.config.data.plane),
    case_id=output_stem(job.input),
    allow_missing_pose=bool(model.config.data.get('allow_missing_pose', False)),
  )
  constant = bool(volume.image.min() == volume.image.max())
  declared, conflict = None, None
  if model.scheme.knee is not None:
    try:
      declared = laterality.declared_side(job.input, job.side)
    except laterality.SideConflict as error:  # reported and flagged, not a failed scan
      conflict = str(error)
  return Scan(job, volume, constant, time.perf_counter() - started, declared, conflict)


def segment_scan(model: inference.LoadedModel, scan: Scan) -> Segmented:
  """Stage 2 (the model; in the calling thread): the label map on the input's grid."""
  from imask_jax import inference

  started = time.perf_counter()
  prediction = inference.predict_volume(model, scan.volume, keep_instances=True)
  if prediction.label_map.shape != scan.volume.grid.shape:
    raise AssertionError(
      f'{scan.job.input}: label map shape {prediction.label_map.shape} differs '
      f'from the input grid {scan.volume.grid.shape}'
    )
  return Segmented(
    scan.job,
    prediction,
    scan.image_constant,
    scan.read_s,
    time.perf_counter() - started,
    scan.declared_side,
    scan.side_conflict,
  )


def write_scan(
  model: inference.LoadedModel, segmented: Segmented, reference: dict[str, Any] | None = None
) -> Outcome:
  """Stage 3 (no model, runs beside the segmentation of another scan): measures the report,
  then writes it and the label map, each atomically. The report goes first, so that a label
  map on disk always has its report beside it (a shard that starts while others write then
  sees their files as earlier predictions); if the label map cannot be written, the report
  path is put back as it was."""
  from imask_jax import scan_report

  started = time.perf_counter()
  job, prediction = segmented.job, segmented.prediction
  report = scan_report.volume_report(
    prediction,
    model,
    input_path=job.input,
    label_map_path=job.label_map,
    reference=reference,
    image_constant=segmented.image_constant,
    declared_side=segmented.declared_side,
    side_conflict=segmented.side_conflict,
  )
  previous = _read_bytes(job.report)
  write_json(job.report, report)
  try:
    nifti_io.save_nifti(
      prediction.label_map, prediction.grid.affine, job.label_map, like=header_template(job.input)
    )
  except BaseException:
    _put_back(job.report, previous)
    raise
  return Outcome(
    job,
    report,
    read_s=segmented.read_s,
    segment_s=segmented.segment_s,
    write_s=time.perf_counter() - started,
  )


def _read_bytes(path: str) -> bytes | None:
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError:
    return None


def _put_back(path: str, content: bytes | None) -> None:
  """Restores `path` to `content` (None: no file), atomically; best effort."""
  try:
    if content is None:
      os.remove(path)
    else:
      with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(content)
  except OSError:
    pass


def predict_one(
  model: inference.LoadedModel, job: Job, reference: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Reads, segments and writes one scan; returns its report."""
  outcome = write_scan(model, segment_scan(model, read_scan(model, job)), reference)
  assert outcome.report is not None
  return outcome.report


def _failed(job: Job, error: Exception) -> Outcome:
  message = str(error) if job.input in str(error) else f'{job.input}: {error}'
  return Outcome(job, error=f'{type(error).__name__}: {message}')


def run_sequential(
  model: inference.LoadedModel, jobs: Sequence[Job], reference: dict[str, Any] | None = None
) -> Iterator[Outcome]:
  """Each job's outcome, in job order, one stage after the other in this thread."""
  for job in jobs:
    try:
      yield write_scan(model, segment_scan(model, read_scan(model, job)), reference)
    except Exception as error:  # noqa: BLE001 - one bad scan must not stop the others
      yield _failed(job, error)


def run_pipelined(
  model: inference.LoadedModel, jobs: Sequence[Job], reference: dict[str, Any] | None = None
) -> Iterator[Outcome]:
  """Each job's outcome, in job order, from the same three stages as `run_sequential` (so the
  same files), overlapped: while this thread segments scan i, one background thread reads
  scan i+1 and another writes scan i-1. At most one scan is read ahead and one write pending
  (scan i's write starts after scan i-1's has finished), so at most three scans are held."""
  reader = ThreadPoolExecutor(1, thread_name_prefix='predict-read')
  writer = ThreadPoolExecutor(1, thread_name_prefix='predict-write')
  try:
    reading: Future[Scan] | None = reader.submit(read_scan, model, jobs[0]) if jobs else None
    writing: tuple[Job, Future[Outcome]] | None = None
    for i, job in enumerate(jobs):
      current, reading = reading, None
      if i + 1 < len(jobs):
        reading = reader.submit(read_scan, model, jobs[i + 1])
      try:
        segmented, failure = segment_scan(model, current.result()), None
      except Exception as error:  # noqa: BLE001 - one bad scan must not stop the others
        segmented, failure = None, _failed(job, error)
      current = None  # the volume is not needed any more
      if writing is not None:
        yield _written(*writing)
        writing = None
      if failure is not None:
        yield failure
      else:
        writing = (job, writer.submit(write_scan, model, segmented, reference))
      segmented = None
    if writing is not None:
      yield _written(*writing)
  finally:
    # Stopped early (an interrupt): the read ahead is dropped, a write under way finishes.
    reader.shutdown(wait=True, cancel_futures=True)
    writer.shutdown(wait=True, cancel_futures=True)


def _written(job: Job, writing: Future[Outcome]) -> Outcome:
  try:
    return writing.result()
  except Exception as error:  # noqa: BLE001 - one bad scan must not stop the others
    return _failed(job, error)


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
  from imask_jax import workdir as workdir_lib

  try:
    data_dir = workdir_lib.data_dir_for(model.config, model.workdir)
    reference, where = quality.training_reference(
      model.workdir, model.config, data_dir, model.scheme.names_by_merged_value
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
  shard: tuple[int, int] | None = None,
  pipeline: bool = True,
  model: inference.LoadedModel | None = None,
  stream: TextIO | None = None,
  verbose: bool = False,
  allow_missing_pose: bool = False,
  side: str | None = None,
) -> int:
  """Runs the whole command; returns the exit status (0 all written, 1 some inputs failed,
  2 refused before any work). `model`: an already loaded checkpoint of `workdir`.
  `overwrite`: replace existing files at the output paths even if predict did not write them.
  `shard`: (K, N), segment only shard K of N of the plan (`shard_jobs`); the plan is still
  listed and checked whole. `pipeline`: read the next scan and write the previous one while
  the model runs (`run_pipelined`); False runs one stage after the other (`run_sequential`);
  the same files either way. `verbose`: raise a workdir or checkpoint mistake (with its
  traceback) instead of the one-line refusal. `stream`: where progress and messages go
  (default: sys.stderr). `allow_missing_pose`: read NIfTI inputs whose header lost the
  scanner pose (refused by default, unless the workdir's data.allow_missing_pose) with their
  array axes as R, A, S. `side`: 'left' or 'right', the knee of every input (over what the
  scans declare)."""
  stream = sys.stderr if stream is None else stream
  try:
    if shard is not None:
      parse_shard(f'{shard[0]}/{shard[1]}')
    side = None if side is None else laterality.explicit_side(side)
    inputs, skipped = list_inputs(input_path)
    # The whole plan is checked in every shard, so that all of them refuse or none does.
    plan = plan_jobs(os.path.abspath(input_path), inputs, output)
    check_overwrites(plan, overwrite)
    created = prepare_output_folders(plan)
  except ValueError as error:
    stream.write(f'predict: refused: {error}\n')
    return EXIT_REFUSED
  jobs = [dataclasses.replace(job, side=side) for job in shard_jobs(plan, shard)]
  kind = 'a DICOM series folder' if os.path.isdir(inputs[0]) else 'a NIfTI file'
  for name in skipped:
    stream.write(f'predict: skipped {name} (not {kind})\n')
  if shard is not None:
    k, n = shard
    stream.write(
      f'predict: shard {k}/{n}: {len(jobs)} of the {len(plan)} scans (those at positions '
      f'{k}, {k + n}, {k + 2 * n}, ... of the sorted inputs, counting from 0)\n'
    )
  # Only this shard's own outputs: another shard may be writing the others right now.
  for job in jobs:
    for leftover in remove_stale_temporaries(job.label_map) + remove_stale_temporaries(job.report):
      stream.write(f'predict: removed {leftover} (the temporary of a run that was killed)\n')
  if model is None:
    from imask_jax import inference
    from imask_jax import workdir as workdir_lib

    try:
      # The mask head on the painting detections only (model.paint_slots_per_class).
      model = inference.load_model(workdir, checkpoint, paint_only=True)
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
  if allow_missing_pose and not model.config.data.get('allow_missing_pose', False):
    # This run's reading setting, on a copy: the model given may be shared.
    config = copy.deepcopy(model.config)
    config.data.allow_missing_pose = True
    model = dataclasses.replace(model, config=config)
  if side is not None and model.scheme.knee is None:
    stream.write(f'predict: --side {side} ignored: the model does not segment knees\n')
  reference = load_reference(model, stream)
  bar = ProgressBar(len(jobs), stream)
  failures: list[str] = []
  flagged: list[str] = []
  run = run_pipelined if pipeline else run_sequential
  for done, outcome in enumerate(run(model, jobs, reference), start=1):
    name = os.path.basename(outcome.job.input)
    if outcome.error is not None:
      failures.append(outcome.error)
      bar.note(f'predict: FAILED {outcome.error}')
      status = f'{name} FAILED'
    else:
      report = outcome.report
      status = (
        f'{name} (read {outcome.read_s:.1f} s, segment {outcome.segment_s:.1f} s, '
        f'write {outcome.write_s:.1f} s)'
      )
      if report['quality']['review']:
        flagged.append(name)
        bar.note(
          f'predict: CHECK {outcome.job.input}: '
          + '; '.join(f'{f["code"]}: {f["message"]}' for f in report['quality']['flags'])
        )
    bar.show(done, status)
  written = len(jobs) - len(failures)
  stream.write(
    f'predict: {written} of {len(jobs)} volumes written to {os.path.dirname(plan[0].label_map)}'
    + (f' (shard {shard[0]}/{shard[1]})' if shard is not None else '')
    + '\n'
  )
  if flagged:
    stream.write(
      f'predict: {len(flagged)} of {written} flagged for review ("quality" in their '
      f'reports): {", ".join(flagged)}\n'
    )
  if failures:
    stream.write(
      f'predict: {len(failures)} failed:\n' + ''.join(f'  {message}\n' for message in failures)
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
    '--shard',
    default=None,
    metavar='K/N',
    help='segment only shard K of N (K counts from 0: 0/2 and 1/2): the inputs at positions '
    'K, K+N, ... in sorted order; N processes with the same arguments and K = 0 .. N-1 write '
    'every scan once',
  )
  parser.add_argument(
    '--sequential',
    action='store_true',
    help='read, segment and write one scan after the other (default: read the next scan and '
    'write the previous one while the model runs; the same outputs)',
  )
  parser.add_argument(
    '--allow_missing_pose',
    action='store_true',
    help='read NIfTI inputs whose header lost the scanner pose (identity or no affine) with '
    'their array axes as R, A, S (refused by default: the slices may be cut along the wrong '
    'axis)',
  )
  parser.add_argument(
    '--side',
    choices=laterality.SIDES,
    default=None,
    help='knee models: every input is a left (or right) knee, over what the scans declare '
    '(default: DICOM laterality tags or series description, a JSON sidecar <stem>.json beside '
    'a NIfTI file, else the anatomical estimate; the report\'s "side")',
  )
  parser.add_argument(
    '--verbose', action='store_true', help='show the traceback of a workdir or checkpoint mistake'
  )
  args = parser.parse_args(argv)
  try:
    shard = None if args.shard is None else parse_shard(args.shard)
  except ValueError as error:
    sys.stderr.write(f'predict: refused: {error}\n')
    return EXIT_REFUSED
  return predict_command(
    args.workdir,
    args.input,
    args.output,
    checkpoint=args.checkpoint,
    overwrite=args.overwrite,
    shard=shard,
    pipeline=not args.sequential,
    verbose=args.verbose,
    allow_missing_pose=args.allow_missing_pose,
    side=args.side,
  )


if __name__ == '__main__':
  sys.exit(main())
