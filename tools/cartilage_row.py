"""One row of docs/results/cartilage.md from an evaluation folder (evaluate's or
resolution_table's output: metrics.csv and thickness.csv).

  python tools/cartilage_row.py EVAL_DIR [EVAL_DIR ...] [--label NAME ...]

Per plate (femoral, tibial), means over the volumes: Dice and HD95 (metrics.csv), the mean
thickness offset in % of the truth's mean plate thickness (mean over volumes of the predicted
and true plate means), the per-cell SD of the prediction - truth difference map (mean over
volumes of its SD over the cells both maps cover) and the coverage (share of the truth's cells
the prediction also covers). Prints a markdown table, one row per folder.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

PLATES = (('femoral', 'femoral_cartilage'), ('tibial', 'tibial_cartilage'))
COLUMNS = (
  'fem. Dice',
  'tib. Dice',
  'fem. HD95 (mm)',
  'tib. HD95 (mm)',
  'fem. offset',
  'tib. offset',
  'fem. cell SD (mm)',
  'tib. cell SD (mm)',
  'fem. coverage',
  'tib. coverage',
)


def _rows(path: str) -> list[dict[str, str]]:
  if not os.path.isfile(path):
    raise SystemExit(f'{path}: missing (an evaluation folder holds metrics.csv and thickness.csv)')
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _mean(rows, key) -> float:
  values = [float(r[key]) for r in rows if r[key] not in ('', 'nan')]
  return float(np.mean(values)) if values else float('nan')


def plate_figures(folder: str) -> dict[str, dict[str, float]]:
  """{plate: {dice, hd95, offset_pct, cell_sd, coverage}} of one evaluation folder."""
  metrics = _rows(os.path.join(folder, 'metrics.csv'))
  thickness = _rows(os.path.join(folder, 'thickness.csv'))
  out = {}
  for plate, tissue in PLATES:
    m = [r for r in metrics if r['tissue'] == tissue and r['status'] == 'ok']
    t = [r for r in thickness if r['plate'] == plate and r['status'] == 'ok']
    truth, pred = _mean(t, 'truth_mean_mm'), _mean(t, 'pred_mean_mm')
    out[plate] = dict(
      dice=_mean(m, 'dice'),
      hd95=_mean(m, 'hd95_mm'),
      offset_pct=100.0 * (pred - truth) / truth,
      cell_sd=_mean(t, 'difference_sd_mm'),
      coverage=100.0 * _mean(t, 'fraction_compared'),
      truth_mm=truth,
      pred_mm=pred,
    )
  return out


def markdown_row(label: str, figures: dict[str, dict[str, float]]) -> str:
  f, t = figures['femoral'], figures['tibial']
  cells = (
    f'{f["dice"]:.3f}',
    f'{t["dice"]:.3f}',
    f'{f["hd95"]:.2f}',
    f'{t["hd95"]:.2f}',
    f'{f["offset_pct"]:+.0f} %',
    f'{t["offset_pct"]:+.0f} %',
    f'{f["cell_sd"]:.2f}',
    f'{t["cell_sd"]:.2f}',
    f'{f["coverage"]:.0f} %',
    f'{t["coverage"]:.0f} %',
  )
  return '| ' + ' | '.join((label,) + cells) + ' |'


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('folders', nargs='+')
  parser.add_argument('--label', nargs='*', default=None, help='row names (default: folders)')
  args = parser.parse_args(argv)
  labels = args.label or args.folders
  if len(labels) != len(args.folders):
    raise SystemExit(f'{len(labels)} labels for {len(args.folders)} folders')
  print('| row | ' + ' | '.join(COLUMNS) + ' |')
  print('|---' * (len(COLUMNS) + 1) + '|')
  for label, folder in zip(labels, args.folders):
    figures = plate_figures(folder)
    print(markdown_row(label, figures))
    print(
      f'  ({folder}: thickness femoral {figures["femoral"]["pred_mm"]:.2f} / '
      f'{figures["femoral"]["truth_mm"]:.2f} mm, tibial {figures["tibial"]["pred_mm"]:.2f} / '
      f'{figures["tibial"]["truth_mm"]:.2f} mm)',
      file=sys.stderr,
    )


if __name__ == '__main__':
  main(sys.argv[1:])
