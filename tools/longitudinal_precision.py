"""Test-retest precision and sensitivity to change of the subregion thickness, from two cohort
tables of the same knees (imask_jax/change.py's format: subject, visit, file; files are predict
reports or knee label maps).

  python tools/longitudinal_precision.py --retest retest.csv --loss loss.csv [--regions ...]

retest: visit pairs with no change (a rescan: new noise, bias and position). Per region the
root-mean-square coefficient of variation over knees, RMS CV = sqrt(mean_i CV_i^2), with
CV_i = SD_i / mean_i of the pair (SD_i = |a - b| / sqrt(2)), the measure OA studies report for
test-retest precision.
loss: visit pairs with a drawn change (e.g. phantoms with --thinning cMF=0.1). Per region the
mean change and its SD over knees, and the standardized response mean SRM = mean / SD.
Prints one markdown table: region, retest RMS CV %, retest mean |change|, loss mean change ±
SD, SRM, and n.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from imask_jax import change
from imask_jax.evaluation.report.subregion_tables import ORDER


def pairs(table: str, **options) -> list[tuple[change.Visit, change.Visit]]:
  """(first visit, second visit) of each subject of a cohort table."""
  out = []
  for subject, visits in sorted(change.read_table(table).items()):
    if len(visits) < 2:
      continue
    try:
      out.append(tuple(change.read_visit(f, **options) for _, f in visits[:2]))
    except ValueError as error:  # a visit without subregions: say so, go on with the others
      print(f'{table}: {subject} left out: {error}', file=sys.stderr)
  return out


def values(visit_pairs, region: str, measure: str) -> np.ndarray:
  """[n, 2] the measure of `region` at both visits (rows with a missing value dropped)."""
  rows = [
    (
      a.regions.get(region, {}).get(measure, math.nan),
      b.regions.get(region, {}).get(measure, math.nan),
    )
    for a, b in visit_pairs
  ]
  table = np.asarray(rows, float).reshape(-1, 2)
  return table[np.all(np.isfinite(table), axis=1)]


def rms_cv_percent(table: np.ndarray) -> float:
  mean = table.mean(axis=1)
  sd = np.abs(table[:, 0] - table[:, 1]) / math.sqrt(2)
  ok = mean > 0
  return float(100 * np.sqrt(np.mean((sd[ok] / mean[ok]) ** 2))) if ok.any() else math.nan


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--retest', required=True, help='cohort table of rescans (no change)')
  parser.add_argument('--loss', help='cohort table of pairs with a drawn change')
  parser.add_argument('--regions', default=','.join(ORDER))
  parser.add_argument('--measure', default='thickness_cab_mm')
  parser.add_argument('--side', choices=('left', 'right'))
  args = parser.parse_args(argv)
  options = dict(side=args.side)
  retest = pairs(args.retest, **options)
  loss = pairs(args.loss, **options) if args.loss else []
  print(
    '| region | retest RMS CV (%) | retest mean abs change (mm) | drawn-loss change (mm) '
    '| SRM | n (retest / loss) |'
  )
  print('|---|---|---|---|---|---|')
  for region in args.regions.split(','):
    r = values(retest, region, args.measure)
    if not len(r):
      continue
    lost = values(loss, region, args.measure) if loss else np.zeros((0, 2))
    d = lost[:, 1] - lost[:, 0]
    loss_text, srm = 'n/a', 'n/a'
    if len(d) > 1:
      loss_text = f'{d.mean():+.3f} ± {d.std(ddof=1):.3f}'
      srm = f'{d.mean() / d.std(ddof=1):.2f}' if d.std(ddof=1) > 0 else 'inf'
    print(
      f'| {region} | {rms_cv_percent(r):.2f} | {np.mean(np.abs(r[:, 1] - r[:, 0])):.3f} '
      f'| {loss_text} | {srm} | {len(r)} / {len(d)} |'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
