"""One scan in three stages (read, segment, write) and the two ways to run them over a plan:
one after the other (`run_sequential`) or overlapped in threads (`run_pipelined`), with the
same files either way. Every file is written atomically, the report before its label map."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from data_pipelines import laterality, nifti_io, readers
from data_pipelines.atomic import atomic_path
from imask_jax.predict.plan import Job, output_stem

if TYPE_CHECKING:  # imported where used: `--help` answers without JAX and TensorFlow
  from imask_jax.inference import loading
  from imask_jax.inference.whole_volume import VolumePrediction


def write_json(path: str, obj: Any) -> str:
  with atomic_path(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=1, allow_nan=False)
      f.write('\n')
  return path


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


def read_scan(model: loading.LoadedModel, job: Job) -> Scan:
  """Stage 1 (no model, runs beside the segmentation of another scan): reads the input."""
  from imask_jax.inference import loading

  started = time.perf_counter()
  volume = loading.load_image(
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


def segment_scan(model: loading.LoadedModel, scan: Scan) -> Segmented:
  """Stage 2 (the model; in the calling thread): the label map on the input's grid."""
  from imask_jax.inference import whole_volume

  started = time.perf_counter()
  prediction = whole_volume.predict_volume(model, scan.volume, keep_instances=True)
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
  model: loading.LoadedModel, segmented: Segmented, reference: dict[str, Any] | None = None
) -> Outcome:
  """Stage 3 (no model, runs beside the segmentation of another scan): measures the report,
  then writes it and the label map, each atomically. The report goes first, so that a label
  map on disk always has its report beside it (a shard that starts while others write then
  sees their files as earlier predictions); if the label map cannot be written, the report
  path is put back as it was."""
  from imask_jax.predict import scan_report

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


def _failed(job: Job, error: Exception) -> Outcome:
  message = str(error) if job.input in str(error) else f'{job.input}: {error}'
  return Outcome(job, error=f'{type(error).__name__}: {message}')


def run_sequential(
  model: loading.LoadedModel, jobs: Sequence[Job], reference: dict[str, Any] | None = None
) -> Iterator[Outcome]:
  """Each job's outcome, in job order, one stage after the other in this thread."""
  for job in jobs:
    try:
      yield write_scan(model, segment_scan(model, read_scan(model, job)), reference)
    except Exception as error:  # noqa: BLE001 - one bad scan must not stop the others
      yield _failed(job, error)


def run_pipelined(
  model: loading.LoadedModel, jobs: Sequence[Job], reference: dict[str, Any] | None = None
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
