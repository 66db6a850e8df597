"""How often the anatomical side estimate (imask_jax/metrics/side.py) is right on knee phantoms.

  python tools/side_accuracy.py [--seeds 0:20] [--preset cpu] [--spacing MM] [--fov MM]

Each seed is generated twice, as a left and as a right knee (data_pipelines/phantoms/knee.py
draws a left knee as the mirror image of the right one's model, then poses it); the estimate is
taken on the truth label map read in canonical RAS+ as predict reads a scan, and compared with
the side the truth sidecar records (anatomy.side). Prints one line per phantom that is wrong
or has no estimate, then the count right, without an estimate and wrong, and the margins
(smallest, median, largest).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from data_pipelines import orientation
from data_pipelines.phantoms import generate_knee
from imask_jax.metrics import side as side_lib


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0:20', help='START:STOP (STOP excluded)')
  parser.add_argument('--preset', default='cpu')
  parser.add_argument('--spacing', type=float, default=None, help='in-plane spacing (mm)')
  parser.add_argument('--fov', type=float, default=None, help='in-plane field of view (mm)')
  args = parser.parse_args(argv)
  start, stop = (int(v) for v in args.seeds.split(':'))
  right, unknown, wrong, margins = 0, 0, 0, []
  for seed in range(start, stop):
    for side in ('left', 'right'):
      phantom = generate_knee(
        seed, args.preset, spacing_mm=args.spacing, fov_mm=args.fov, side=side
      )
      truth = phantom.truth['anatomy']['side']
      grid = orientation.SourceGrid.from_affine(phantom.labels.shape, phantom.affine)
      estimate = side_lib.estimate_side(grid.to_canonical(phantom.labels), grid.canonical_spacing)
      if estimate.side == truth:
        right += 1
        margins.append(estimate.margin)
        continue
      if estimate.side is None:
        unknown += 1
      else:
        wrong += 1
      print(f'seed {seed} {truth}: estimated {estimate.side} ({estimate.basis})')
  total = right + unknown + wrong
  print(
    f'{right} of {total} right, {unknown} without an estimate, {wrong} wrong '
    f'({args.preset} preset, seeds {start} to {stop - 1}, both sides)'
  )
  if margins:
    low, mid, high = np.percentile(margins, [0, 50, 100])
    print(
      f'margin (log ratio, medial over lateral), smallest / median / largest: '
      f'{low:.3f} / {mid:.3f} / {high:.3f}'
    )
  return 0 if wrong == 0 else 1


if __name__ == '__main__':
  sys.exit(main())
