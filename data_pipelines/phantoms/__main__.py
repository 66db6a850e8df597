"""Command line: write a phantom dataset, or draw the knee + hip preview picture.

  python -m data_pipelines.phantoms knee --num 8 --seed 0 --out data/phantom_knee \
      [--preset cpu|full] [--spacing MM] [--fov MM] [--preview knee.png]
  python -m data_pipelines.phantoms preview --seed 0 --preview docs/phantoms.png

--spacing and --fov set the in-plane pixel spacing and field of view (mm; slice plane, both
in-plane axes) instead of the preset's, e.g. knees at 0.365, 0.5 and 0.8 mm, all 140 mm wide:
  python -m data_pipelines.phantoms knee --num 4 --spacing 0.5 --fov 140 --out data/knee_0p5

--visits N (knees) writes a longitudinal dataset: each knee at visits 0 .. N-1 (case ids
knee_0000_v0, knee_0000_v1, ...), rescanned with new noise and a small repositioning; with
--thinning REGION=MM[,REGION=MM ...] visit v's cartilage is v x MM thinner in those subregions
(docs/phantoms.md, "Follow-ups"), e.g. a 0.1 mm loss in the medial weight-bearing condyle:
  python -m data_pipelines.phantoms knee --num 4 --visits 2 --thinning cMF=0.1 --out data/knee_fu
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from data_pipelines.errors import EXIT_OK, EXIT_REFUSED
from data_pipelines.phantoms import contrast as contrast_lib
from data_pipelines.phantoms import knee_shapes, writer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog='python -m data_pipelines.phantoms',
    description='Procedural knee (sagittal DESS-like) and hip (coronal STIR-like) MRI '
    'phantoms in the nnU-Net layout.',
  )
  parser.add_argument(
    'kind',
    choices=['knee', 'hip', 'preview'],
    help="dataset kind, or 'preview' for a knee + hip picture only",
  )
  parser.add_argument('--num', type=int, default=1, help='number of volumes (default 1)')
  parser.add_argument(
    '--seed',
    type=int,
    default=0,
    help='seed of the first volume; volume i uses seed + i (default 0)',
  )
  parser.add_argument(
    '--out',
    help='dataset folder to write: a new or empty folder, or one '
    'this command wrote before (replaced as a whole); anything else is refused',
  )
  parser.add_argument(
    '--preset',
    choices=['cpu', 'full'],
    default='cpu',
    help='grid size: cpu (small, default) or full (scanner-like)',
  )
  parser.add_argument(
    '--spacing',
    type=float,
    metavar='MM',
    help="in-plane pixel spacing in mm (both in-plane axes; default: the preset's); the slices "
    "stay the preset's",
  )
  parser.add_argument(
    '--fov',
    type=float,
    metavar='MM',
    help="in-plane field of view in mm (both in-plane axes; default: the preset's); the "
    'in-plane size becomes round(fov / spacing) pixels',
  )
  parser.add_argument('--preview', help='PNG of a few slices of the first volume')
  parser.add_argument(
    '--contrast',
    choices=list(contrast_lib.CONTRASTS),
    help="knees: the tissue signal table (default: the generator's, dess); iw_fs and t1 are "
    'held-out contrasts for judging a model, never for training (docs/phantoms.md)',
  )
  parser.add_argument(
    '--shape-family',
    choices=list(knee_shapes.FAMILIES),
    help="knees: the anatomy's shape family (default: the generator's, default); varied "
    'widens the shapes for training, held_out draws them outside those ranges for judging',
  )
  parser.add_argument(
    '--visits',
    type=int,
    default=1,
    metavar='N',
    help='knees: write each knee at visits 0 .. N-1 (ids <knee>_v<visit>), a longitudinal '
    'dataset (default 1: one scan per knee)',
  )
  parser.add_argument(
    '--thinning',
    default='',
    metavar='REGION=MM[,...]',
    help='with --visits >= 2: cartilage thinned by MM per visit in each femorotibial '
    'subregion named (e.g. cMF=0.1,cMT=0.05; docs/phantoms.md "Follow-ups")',
  )
  args = parser.parse_args(argv)
  if args.kind == 'preview':
    if not args.preview:
      parser.error("'preview' needs --preview PNG")
  elif not args.out:
    parser.error(f'{args.kind} needs --out DIR')
  if args.num < 1:
    parser.error(f'--num {args.num}: expected at least 1')
  for flag, value in (('--spacing', args.spacing), ('--fov', args.fov)):
    if value is not None and not (math.isfinite(value) and value > 0):
      parser.error(f'{flag} {value}: expected a number of mm > 0')
  if args.visits < 1:
    parser.error(f'--visits {args.visits}: expected at least 1')
  if args.contrast is not None and args.kind != 'knee':
    parser.error(f'--contrast {args.contrast}: contrasts are drawn for knees only')
  if args.shape_family is not None and args.kind != 'knee':
    parser.error(f'--shape-family {args.shape_family}: shape families are drawn for knees only')
  if args.visits > 1 and args.kind != 'knee':
    parser.error(f'--visits {args.visits}: follow-ups are drawn for knees only')
  try:
    args.thinning = parse_thinning(args.thinning)
  except ValueError as error:
    parser.error(str(error))
  if args.thinning and args.visits < 2:
    parser.error('--thinning needs --visits 2 or more (visit 0 is the baseline)')
  return args


def parse_thinning(text: str) -> dict[str, float]:
  """'cMF=0.1,cMT=0.05' -> {'cMF': 0.1, 'cMT': 0.05} (ValueError naming what is wrong)."""
  out: dict[str, float] = {}
  for item in (part.strip() for part in text.split(',')):
    if not item:
      continue
    name, sep, mm = item.partition('=')
    try:
      value = float(mm)
    except ValueError:
      value = math.nan
    if not sep or not name.strip() or not math.isfinite(value):
      raise ValueError(f'--thinning {text!r}: expected REGION=MM[,REGION=MM ...], e.g. cMF=0.1')
    out[name.strip()] = value
  return out


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  try:
    if args.kind == 'preview':
      phantoms = [
        writer.generate(kind, args.seed, args.preset, args.spacing, args.fov)
        for kind in ('knee', 'hip')
      ]
      writer.save_preview(phantoms, args.preview)
      print(f'wrote {args.preview} ({time.perf_counter() - start:.1f} s)')
      return EXIT_OK
    meta = writer.write_dataset(
      args.kind,
      args.num,
      args.seed,
      args.out,
      args.preset,
      args.preview,
      spacing_mm=args.spacing,
      fov_mm=args.fov,
      visits=args.visits,
      thinning=args.thinning,
      contrast=args.contrast,
      shape_family=args.shape_family,
    )
  except ValueError as error:  # a refused --out or grid: the message says why, no traceback
    print(error, file=sys.stderr)
    return EXIT_REFUSED
  print(
    f'wrote {meta["numTraining"]} {args.kind} volumes to {args.out} '
    f'({time.perf_counter() - start:.1f} s)' + (f'; preview {args.preview}' if args.preview else '')
  )
  return EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
