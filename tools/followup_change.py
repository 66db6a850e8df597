"""Measured against drawn change of the femorotibial subregions on knee phantom follow-ups.

  python tools/followup_change.py [--seeds 0:3] [--preset cpu] [--spacing MM] [--fov MM]
      [--thinning cMF=0.1] [--regions cMF,cLF,MT,LT] [--method normal]

For each seed the knee is generated at visit 0 and visit 1 with the thinning (data_pipelines/
phantoms/knee.py, docs/phantoms.md "Follow-ups"); both truth label maps are read in canonical
RAS+ as evaluate reads a scan, measured with metrics' thickness maps (--method, 'normal' by
default) and metrics.knee_subregions with the sidecar's side. Prints, per seed and region, the
measured change (visit 1 - visit 0, mm) of ThCcAB (mean over the covered cells) and ThCtAB
(over the footprint, denuded cells 0) beside the drawn (analytic) change of the sidecar, then
per region and measure the mean, SD and largest |measured - drawn| over the seeds.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from data_pipelines import orientation
from data_pipelines.phantoms import generate_knee
from data_pipelines.phantoms.__main__ import parse_thinning
from imask_jax import metrics


def measured_regions(phantom, method: str = 'normal') -> dict[str, metrics.RegionMeasures]:
  """metrics.knee_subregions of a phantom's truth label map (canonical RAS+, the sidecar's
  side), with the thickness maps evaluate uses."""
  grid = orientation.SourceGrid.from_affine(phantom.labels.shape, phantom.affine)
  labels = grid.to_canonical(phantom.labels)
  spacing = grid.canonical_spacing
  femoral = metrics.femoral_thickness_map(
    labels, spacing, angle_bin_deg=metrics.femoral_angle_bin_deg(spacing), method=method
  )
  tibial = metrics.tibial_thickness_map(labels, spacing, method=method)
  return metrics.knee_subregions(femoral, tibial, phantom.truth['anatomy']['side'])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0:3', help='START:STOP (STOP excluded)')
  parser.add_argument('--preset', default='cpu')
  parser.add_argument('--spacing', type=float, default=None, help='in-plane spacing (mm)')
  parser.add_argument('--fov', type=float, default=None, help='in-plane field of view (mm)')
  parser.add_argument('--thinning', default='cMF=0.1', help="REGION=MM[,...]; '' for none")
  parser.add_argument('--regions', default='cMF,ccMF,cLF,pMF,TrF,MT,cMT,LT,cLT')
  parser.add_argument('--method', default='normal', choices=['normal', 'nearest'])
  args = parser.parse_args(argv)
  start, stop = (int(v) for v in args.seeds.split(':'))
  thinning = parse_thinning(args.thinning)
  names = args.regions.split(',')
  measures = ('thickness_cab_mm', 'thickness_tab_mm')
  errors = {(n, k): [] for n in names for k in measures}
  changes = {(n, k): [] for n in names for k in measures}
  print(f'thinning {thinning}; preset {args.preset}, spacing {args.spacing}, fov {args.fov}')
  print('seed side  OA    region  ThCcAB: measured drawn   ThCtAB: measured drawn  (change, mm)')
  for seed in range(start, stop):
    began = time.perf_counter()
    kw = dict(spacing_mm=args.spacing, fov_mm=args.fov)
    base = generate_knee(seed, args.preset, visit=0, **kw)
    follow = generate_knee(seed, args.preset, visit=1, thinning=thinning, **kw)
    before, after = measured_regions(base, args.method), measured_regions(follow, args.method)
    drawn = follow.truth['subregion_thickness']['drawn_change']
    side = base.truth['anatomy']['side']
    oa = base.truth['anatomy']['oa_thinning']
    for name in names:
      line = f'{seed:4d} {side:5s} {oa:4.2f}  {name:6s}'
      for k in measures:
        measured = getattr(after[name], k) - getattr(before[name], k)
        want = drawn[name][k]
        changes[name, k].append(measured)
        errors[name, k].append(measured - want)
        line += f'   {measured:+8.4f} {want:+8.4f}'
      print(line)
    print(f'     ({time.perf_counter() - began:.1f} s)')
  print('region  measure           mean measured   SD     max |measured - drawn|')
  for name in names:
    for k in measures:
      c = np.array(changes[name, k])
      print(
        f'{name:6s}  {k:16s}  {c.mean():+8.4f}  {c.std(ddof=1) if c.size > 1 else 0.0:7.4f}'
        f'  {np.max(np.abs(errors[name, k])):.4f}'
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
