"""Checkpoint-based evaluation: whole held-out volumes -> metrics, paper-style tables, figures.

  python -m imask_jax.evaluate --workdir DIR [--checkpoint STEP] [--split test]

Reads DIR/config.json, restores the checkpoint (latest by default), segments every volume of
the split slice by slice (`whole_volume.predict_volume`), puts the label maps back on each
file's grid, and measures them against the truth (the config's reader) with `imask_jax.metrics`.
Everything is a function of the checkpoint, the config and the data: run it again and the
same files come out.

Outputs, written into DIR/eval/<step>/ as a whole or not at all (a split other than the
config's eval.split goes to DIR/eval/<step>_<split>/); docs/evaluation.md describes every
column:
  metrics.csv    a row per volume and tissue (METRICS_COLUMNS)
  ap.csv         COCO mask AP per class, over all slices ('all') and per volume (AP_COLUMNS)
  thickness.csv  knee: per volume and plate, truth / prediction mean thickness and the
                 prediction - truth difference map's mean and SD (THICKNESS_COLUMNS)
  volumes.csv    effusion: per volume and rater (readers and model), right / left / total mL
  summary.md     mean +- SD tables laid out like the paper's Tables 3-7
  eval.json      what was evaluated (workdir, step, split, cases, conventions)
  labels/        the predicted label maps, <case>.nii.gz, on the input's grid
  figures/       overlays, thickness and difference maps, Bland-Altman plots (PNG)

Mask AP is computed at SOURCE slice resolution: detections are pasted into the original slice
(`whole_volume.detections_to_source`) and compared with the truth instances of that slice
(`instances.extract_instances` with the config's instance mode, every truth pixel kept).

This module is the command; the work is `evaluation.held_out` (a split), `evaluation.case_metrics`
(one volume) and `evaluation.report` (the tables).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_pipelines.datasets import params as params_lib
from imask_jax import errors
from imask_jax.evaluation.held_out import evaluate_workdir


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m imask_jax.evaluate',
    description='Evaluate a checkpoint on whole held-out volumes: metrics.csv, summary.md '
    'and figures in WORKDIR/eval/<step>/.',
  )
  parser.add_argument('--workdir', required=True, help='training workdir (has config.json)')
  parser.add_argument(
    '--checkpoint', type=int, default=None, help='checkpoint step (default: the latest)'
  )
  parser.add_argument(
    '--split',
    default=None,
    choices=params_lib.SPLITS,
    help="split to evaluate (default: the config's eval.split, 'test')",
  )
  parser.add_argument(
    '--verbose',
    action='store_true',
    help='show the traceback of a user mistake, not only its message',
  )
  args = parser.parse_args(argv)
  try:
    report = evaluate_workdir(
      args.workdir,
      args.checkpoint,
      args.split,
      progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
  except errors.USER_ERRORS as error:
    if args.verbose:
      raise
    # One line (no workdir, no such checkpoint, one that cannot be restored, bad data).
    print(f'{parser.prog}: {type(error).__name__}: {error}', file=sys.stderr)
    return errors.EXIT_REFUSED
  print(report.summary)
  print(f'written to {report.out_dir}')
  return errors.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
