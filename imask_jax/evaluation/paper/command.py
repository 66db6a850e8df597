"""python -m imask_jax.evaluation.paper: one of the paper's tables or figures from evaluated runs.

  python -m imask_jax.evaluation.paper --table 3 --run mask_rcnn=runs/oai_standard \\
      --run imask=runs/oai_imask --out paper/
  python -m imask_jax.evaluation.paper --table 7 --run mask_rcnn=runs/hip_standard \\
      --run imask=runs/hip_imask --out paper/
  python -m imask_jax.evaluation.paper --figure 8 --run mask_rcnn=... --run imask=... --out paper/

Each --run NAME=PATH names a workdir evaluated by `python -m imask_jax.evaluate` (its newest
evaluation of --split) or one evaluation folder; a NAME given several times is one model at
several seeds, pooled. `mask_rcnn` and `imask` are shown as the paper names them. Tables go to
OUT/table<N>.md (and are printed), figures to OUT/figure<N>_<case>.png."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from data_pipelines.errors import EXIT_OK, EXIT_REFUSED

TABLES = (3, 4, 5, 6, 7)
FIGURES = (6, 7, 8)
CONVENTIONS = ('paper', 'ours')  # thickness.CONVENTIONS, without importing it for --help


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog='python -m imask_jax.evaluation.paper',
    description="One of the paper's Tables 3-7 or Figures 6-8, the models side by side, from "
    'workdirs evaluated by python -m imask_jax.evaluate (docs/reproducing.md).',
  )
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument('--table', type=int, choices=TABLES, help="the paper's table number")
  what.add_argument('--figure', type=int, choices=FIGURES, help="the paper's figure number")
  p.add_argument(
    '--run',
    action='append',
    default=[],
    metavar='NAME=PATH',
    help='an evaluated workdir (or eval/<step>/ folder) and its model name; mask_rcnn and '
    'imask print as Mask R-CNN and iMaskRCNN; repeat a name for more seeds',
  )
  p.add_argument('--out', required=True, help='folder for table<N>.md or figure<N>_<case>.png')
  p.add_argument('--split', default='test', help='the evaluated split to read (default: test)')
  p.add_argument(
    '--convention',
    choices=CONVENTIONS,
    default='paper',
    help="Table 5 and Figures 7-8: 'paper' (default) truth - prediction, red = "
    "under-estimation, femoral maps against the slice number; 'ours' prediction - truth, red "
    "= over-estimation, against mm along the cylinder axis (evaluate's figures)",
  )
  p.add_argument(
    '--readers',
    default='',
    help='Table 7: comma-separated readers of volumes.csv (default: every labelsTr_<name> '
    'reader, else the reference labels)',
  )
  p.add_argument('--case', default='', help='Figures: the case to draw (default: the first)')
  p.add_argument(
    '--verbose', action='store_true', help='show the traceback of a refusal, not only its message'
  )
  return p


def make_table(number: int, runs, convention: str, readers: Sequence[str]) -> str:
  from imask_jax.evaluation.paper import raters, segmentation, thickness

  if number == 3:
    return segmentation.table3(runs)
  if number == 4:
    return segmentation.table4(runs)
  if number == 5:
    return thickness.table5(runs, convention)
  if number == 6:
    return segmentation.table6(runs)
  return raters.table7(runs, readers or None)


def make_figure(number: int, runs, out: str, convention: str, case: str) -> str:
  from imask_jax.evaluation.paper import figures, label_maps
  from imask_jax.evaluation.paper.runs import RunError, by_model

  several = [name for name, group in by_model(runs).items() if len(group) > 1]
  if several:
    raise RunError(
      f'a figure draws one run per model; {", ".join(several)} is given more than once'
    )
  maps = label_maps.load_case(runs, case or None)
  comparisons = None if number == 6 else label_maps.thickness_comparisons(maps)
  return figures.write(out, number, maps, comparisons, convention)


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  args = p.parse_args(argv)
  from imask_jax import errors
  from imask_jax.evaluation.paper.runs import RunError, load_runs

  try:
    runs = load_runs(args.run, args.split)
    os.makedirs(args.out, exist_ok=True)
    if args.table is not None:
      from imask_jax.evaluation.report import write_text

      readers = [r.strip() for r in args.readers.split(',') if r.strip()]
      text = make_table(args.table, runs, args.convention, readers)
      path = write_text(os.path.join(args.out, f'table{args.table}.md'), text + '\n')
      print(text)
    else:
      path = make_figure(args.figure, runs, args.out, args.convention, args.case)
  except (RunError, OSError, *errors.USER_ERRORS) as error:
    if args.verbose:
      raise
    print(f'{p.prog}: {type(error).__name__}: {error}', file=sys.stderr)
    return EXIT_REFUSED
  print(f'written: {path}')
  return EXIT_OK
