"""Dice and mean plate thickness of `predict` outputs against the truth of a held-out folder.

  python tools/held_out_table.py --truth DIR --pred DIR [--pred DIR ...] [--method normal]
  python tools/held_out_table.py --truth T1 --pred P1 --truth T2 --pred P2 ... --flags

DIR (truth): an nnU-Net folder with labelsTr/<case>.nii.gz (e.g. knee phantoms written with
--shape-family held_out or --contrast t1, docs/phantoms.md); DIR (pred): what
`python -m imask_jax.predict --input <truth>/imagesTr --output DIR` wrote (<case>.nii.gz and
<case>.json). Per prediction folder, one Markdown row: the mean (and lowest) Dice of femur,
femoral cartilage, tibia and tibial cartilage over the cases, and the mean plate thickness's
offset from the truth label map's, in % of the truth's, both measured the way predict
measures (imask_jax/predict/scan_report.py, on the canonical RAS+ label maps).

--flags: a second table, the calibration of predict's quality flags (imask_jax/predict/
quality.py) on these folders: how many scans each flag code marked, and how many of those
really are worse, i.e. miss an aim of issue 36 (a bone below BONE_AIM or a cartilage below
CARTILAGE_AIM Dice), beside the same counts for the unflagged scans.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

import nibabel as nib
import numpy as np

from data_pipelines import tissues
from imask_jax import metrics
from imask_jax.predict import scan_report

KNEE = tissues.KneeLabelValues()
CLASSES = {
  KNEE.femur: 'femur',
  KNEE.femoral_cartilage: 'fem. cart.',
  KNEE.tibia: 'tibia',
  KNEE.tibial_cartilage: 'tib. cart.',
}
PLATES = {'femoral': scan_report.femoral_thickness, 'tibial': scan_report.tibial_thickness}
BONE_AIM = 0.95
CARTILAGE_AIM = 0.80
AIMS = {
  'femur': BONE_AIM,
  'tibia': BONE_AIM,
  'fem. cart.': CARTILAGE_AIM,
  'tib. cart.': CARTILAGE_AIM,
}


def canonical(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
  """A label map in canonical RAS+ (nibabel's closest-axis reorientation) and its spacing."""
  image = nib.as_closest_canonical(nib.load(path))
  return np.asarray(image.dataobj).astype(np.int32), tuple(
    float(z) for z in image.header.get_zooms()[:3]
  )


def case_row(truth_path: str, pred_path: str, method: str) -> dict[str, float]:
  """Dice per class and plate thickness offset (%) of one case."""
  truth, spacing = canonical(truth_path)
  pred, pred_spacing = canonical(pred_path)
  if truth.shape != pred.shape or not np.allclose(spacing, pred_spacing):
    raise ValueError(f'{pred_path}: grid {pred.shape} {pred_spacing} is not the truth grid')
  out = {name: m.dice for name, m in metrics.overlap_per_label(pred, truth, list(CLASSES)).items()}
  out = {CLASSES[value]: dice for value, dice in out.items()}
  for plate, measure in PLATES.items():
    got = measure(pred, spacing, KNEE, method).get('mean_mm')
    want = measure(truth, spacing, KNEE, method).get('mean_mm')
    out[plate] = np.nan if not got or not want else 100.0 * (got - want) / want
  return out


def case_rows(truth_dir: str, pred_dir: str, method: str) -> list[dict[str, Any]]:
  """case_row of every prediction in `pred_dir`, with its 'case' id and its report's quality
  flag codes ('flags'; [] without a report)."""
  preds = sorted(glob.glob(os.path.join(pred_dir, '*.nii.gz')))
  if not preds:
    raise ValueError(f'{pred_dir}: no predicted label maps (*.nii.gz)')
  rows = []
  for path in preds:
    case = os.path.basename(path)[: -len('.nii.gz')]
    row = case_row(os.path.join(truth_dir, 'labelsTr', f'{case}.nii.gz'), path, method)
    report = os.path.join(pred_dir, f'{case}.json')
    flags = []
    if os.path.exists(report):
      with open(report, encoding='utf-8') as f:
        flags = [flag['code'] for flag in json.load(f)['quality']['flags']]
    rows.append(dict(row, case=case, flags=flags))
  return rows


def misses_aim(row: dict[str, Any]) -> bool:
  """Whether a case misses an aim: some class's Dice below its AIMS value (or not finite)."""
  return any(not row[name] >= aim for name, aim in AIMS.items())


def flag_table(rows: list[dict[str, Any]]) -> list[str]:
  """Markdown rows: per flag code (and 'any flag', 'no flag'), the scans it holds and how many
  of them miss an aim."""
  groups: dict[str, list[bool]] = {}
  for row in rows:
    worse = misses_aim(row)
    for code in sorted(set(row['flags'])) or ['(no flag)']:
      groups.setdefault(code, []).append(worse)
    if row['flags']:
      groups.setdefault('(any flag)', []).append(worse)
  out = ['| flag | scans | of them missing an aim | share |', '|---|---|---|---|']
  for code in sorted(groups, key=lambda c: (c.startswith('('), c)):
    worse = groups[code]
    out.append(f'| {code} | {len(worse)} | {sum(worse)} | {sum(worse) / len(worse):.0%} |')
  return out


def folder_row(truth_dir: str, pred_dir: str, method: str, rows=None) -> str:
  rows = case_rows(truth_dir, pred_dir, method) if rows is None else rows
  cells = []
  for name in CLASSES.values():
    values = np.array([r[name] for r in rows], float)
    cells.append(f'{np.nanmean(values):.3f} ({np.nanmin(values):.2f})')
  for plate in PLATES:
    values = np.array([r[plate] for r in rows], float)
    cells.append(f'{np.nanmean(values):+.0f} %')
  return f'| {pred_dir} | {len(rows)} | ' + ' | '.join(cells) + ' |'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python tools/held_out_table.py', description=__doc__)
  parser.add_argument(
    '--truth',
    required=True,
    action='append',
    help='nnU-Net folder with labelsTr/: one for every --pred, or one per --pred, in order',
  )
  parser.add_argument('--pred', required=True, action='append', help='a predict output folder')
  parser.add_argument('--method', default='normal', help='thickness method (metrics)')
  parser.add_argument(
    '--flags', action='store_true', help="also the quality flags' calibration table (module doc)"
  )
  args = parser.parse_args(argv)
  header = ['predictions', 'cases', *(f'{n} Dice (lowest)' for n in CLASSES.values())]
  header += [f'{p} thickness offset' for p in PLATES]
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  truths = args.truth * len(args.pred) if len(args.truth) == 1 else args.truth
  if len(truths) != len(args.pred):
    parser.error(f'{len(args.truth)} --truth for {len(args.pred)} --pred: give one, or one each')
  every = []
  for truth_dir, pred_dir in zip(truths, args.pred):
    rows = case_rows(truth_dir, pred_dir, args.method)
    every += rows
    print(folder_row(truth_dir, pred_dir, args.method, rows))
  if args.flags:
    print()
    print('\n'.join(flag_table(every)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
