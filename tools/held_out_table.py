"""Dice and mean plate thickness of `predict` outputs against the truth of a held-out folder.

  python tools/held_out_table.py --truth DIR --pred DIR [--pred DIR ...] [--method normal]

DIR (truth): an nnU-Net folder with labelsTr/<case>.nii.gz (e.g. knee phantoms written with
--shape-family held_out or --contrast t1, docs/phantoms.md); DIR (pred): what
`python -m imask_jax.predict --input <truth>/imagesTr --output DIR` wrote (<case>.nii.gz and
<case>.json). Per prediction folder, one Markdown row: the mean (and lowest) Dice of femur,
femoral cartilage, tibia and tibial cartilage over the cases, and the mean plate thickness's
offset from the truth label map's, in % of the truth's, both measured the way predict
measures (imask_jax/predict/scan_report.py, on the canonical RAS+ label maps).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

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


def folder_row(truth_dir: str, pred_dir: str, method: str) -> str:
  preds = sorted(glob.glob(os.path.join(pred_dir, '*.nii.gz')))
  if not preds:
    raise ValueError(f'{pred_dir}: no predicted label maps (*.nii.gz)')
  rows = []
  for path in preds:
    case = os.path.basename(path)[: -len('.nii.gz')]
    rows.append(case_row(os.path.join(truth_dir, 'labelsTr', f'{case}.nii.gz'), path, method))
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
  parser.add_argument('--truth', required=True, help='nnU-Net folder with labelsTr/')
  parser.add_argument('--pred', required=True, action='append', help='a predict output folder')
  parser.add_argument('--method', default='normal', help='thickness method (metrics)')
  args = parser.parse_args(argv)
  header = ['predictions', 'cases', *(f'{n} Dice (lowest)' for n in CLASSES.values())]
  header += [f'{p} thickness offset' for p in PLATES]
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for pred_dir in args.pred:
    print(folder_row(args.truth, pred_dir, args.method))
  return 0


if __name__ == '__main__':
  sys.exit(main())
