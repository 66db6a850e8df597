"""Planning a predict run: which inputs there are (NIfTI files, DICOM series folders), where
each one's label map and report go, which shard segments which scan, and the checks that
refuse a plan before any work (outputs that would replace inputs or files predict did not
write, folders that cannot be written). The rules: docs/predict.md."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Sequence

from data_pipelines import dicom_io, nifti_io

NNUNET_CHANNEL_SUFFIX = '_0000'


@dataclasses.dataclass(frozen=True)
class Job:
  """One input scan and the two files it produces (absolute paths); side: --side, what the user
  declares of it ('left', 'right' or None)."""

  input: str
  label_map: str
  report: str
  side: str | None = None


def list_inputs(path: str) -> tuple[list[str], list[str]]:
  """(inputs, skipped names) of --input by the rules (a)-(d) of docs/predict.md: NIfTI
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


def remove_empty_folders(folders: Sequence[str]) -> None:
  for folder in reversed(folders):
    try:
      os.rmdir(folder)
    except OSError:
      return
