"""Command line: write a phantom dataset, or draw the knee + hip preview picture.

  python -m data_pipelines.phantoms knee --num 8 --seed 0 --out data/phantom_knee \
      [--preset cpu|full] [--preview knee.png]
  python -m data_pipelines.phantoms preview --seed 0 --preview docs/phantoms.png
"""

from __future__ import annotations

import argparse
import sys
import time

from data_pipelines.phantoms import writer


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
  parser.add_argument('--preview', help='PNG of a few slices of the first volume')
  args = parser.parse_args(argv)
  if args.kind == 'preview':
    if not args.preview:
      parser.error("'preview' needs --preview PNG")
  elif not args.out:
    parser.error(f'{args.kind} needs --out DIR')
  if args.num < 1:
    parser.error(f'--num {args.num}: expected at least 1')
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  if args.kind == 'preview':
    phantoms = [writer.generate(kind, args.seed, args.preset) for kind in ('knee', 'hip')]
    writer.save_preview(phantoms, args.preview)
    print(f'wrote {args.preview} ({time.perf_counter() - start:.1f} s)')
    return 0
  try:
    meta = writer.write_dataset(args.kind, args.num, args.seed, args.out, args.preset, args.preview)
  except ValueError as error:  # a refused --out: the message says why, no traceback
    print(error, file=sys.stderr)
    return 2
  print(
    f'wrote {meta["numTraining"]} {args.kind} volumes to {args.out} '
    f'({time.perf_counter() - start:.1f} s)' + (f'; preview {args.preview}' if args.preview else '')
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
