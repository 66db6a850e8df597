"""The predict command: NIfTI or DICOM in -> label NIfTI on the input's exact grid + a JSON
report per scan. What it reads, writes and refuses: docs/predict.md."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from data_pipelines import laterality
from data_pipelines.atomic import remove_stale_temporaries
from data_pipelines.errors import DataError
from imask_jax import errors
from imask_jax.predict import quality
from imask_jax.predict.plan import (
  check_overwrites,
  list_inputs,
  parse_shard,
  plan_jobs,
  prepare_output_folders,
  remove_empty_folders,
  shard_jobs,
)
from imask_jax.predict.stages import run_pipelined, run_sequential

if TYPE_CHECKING:  # imported where used: `--help` answers without JAX and TensorFlow
  from imask_jax.inference import loading


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


def load_reference(model: loading.LoadedModel, stream: TextIO) -> dict[str, Any] | None:
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
  model: loading.LoadedModel | None = None,
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
    return errors.EXIT_REFUSED
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
    from imask_jax.inference import loading

    try:
      # The mask head on the painting detections only (model.paint_slots_per_class).
      model = loading.load_model(workdir, checkpoint, paint_only=True)
    except errors.USER_ERRORS as error:
      # No workdir there, no such checkpoint, or one that cannot be restored: refused, in one
      # line (predict's main shows the traceback with --verbose).
      remove_empty_folders(created)
      if verbose:
        raise
      stream.write(f'predict: refused: {type(error).__name__}: {error}\n')
      return errors.EXIT_REFUSED
    except BaseException:
      remove_empty_folders(created)
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
    return errors.EXIT_FAILED
  return errors.EXIT_OK


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
    return errors.EXIT_REFUSED
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
