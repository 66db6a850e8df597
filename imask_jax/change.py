"""Cartilage change between visits of one knee, per femorotibial subregion.

  python -m imask_jax.change BASELINE FOLLOWUP [MORE ...]      # one knee, visits in order
  python -m imask_jax.change --table cohort.csv --out changes.csv

Each input is predict's JSON report of a scan (its "subregions" block) or a knee label map
(NIfTI; OAI-ZIB's values 1-4 unless --label_values), measured here the same way: the plates'
thickness maps (--thickness_method) and metrics/subregions.py, medial and lateral named by the
knee's side (--side, else what the file declares in a sidecar, else estimated from the
anatomy). Change is follow-up minus baseline, per region and measure (mm for thickness, mm^3
for volume, mm^2 for areas, percentage points for dAB), with the thickness change also in %.

The cohort table is a CSV with the columns subject, visit and file (any order, more columns
ignored); every subject's visits are sorted naturally (v2 before v10) and each pair of
consecutive visits is one row of the output: subject, the two visits and files, the side, and
'<region>_<measure>_change' for every region and measure (thickness_cab_mm_change_percent too).
Two visits that disagree on the side are not compared: their row says why.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipelines.errors import EXIT_OK, EXIT_REFUSED
from imask_jax.metrics.thickness import DEFAULT_THICKNESS_METHOD, THICKNESS_METHODS

REGION_MEASURES = (
  'thickness_cab_mm',
  'thickness_tab_mm',
  'volume_mm3',
  'cab_mm2',
  'tab_mm2',
  'denuded_percent',
)


@dataclasses.dataclass(frozen=True)
class Visit:
  """One visit's measures: the file, the knee's side and its basis, and per region name the
  measures (REGION_MEASURES -> value, NaN where not measured)."""

  path: str
  side: str | None
  side_basis: str
  regions: dict[str, dict[str, float]]
  maps: dict[str, Any] | None = None  # label maps: the plates' thickness maps (for figures)


def _number(value: Any) -> float:
  return math.nan if value is None else float(value)


def visit_from_report(path: str, report: Mapping[str, Any]) -> Visit:
  """A predict report's subregions (ValueError when it has none)."""
  block = report.get('subregions') or {}
  if block.get('status') != 'measured':
    raise ValueError(
      f'{path}: no subregions in the report ({block.get("reason", "a report without them")})'
    )
  side = (report.get('side') or {}).get('basis', '')
  regions = {
    name: {m: _number(values.get(m)) for m in REGION_MEASURES}
    for name, values in block['regions'].items()
  }
  return Visit(path, block['side'], side, regions)


def visit_from_label_map(
  path: str,
  *,
  label_values: Sequence[int] = (1, 2, 3, 4),
  side: str | None = None,
  thickness_method: str = DEFAULT_THICKNESS_METHOD,
) -> Visit:
  """A knee label map's subregions, measured as predict measures a scan."""
  from data_pipelines import laterality, nifti_io, orientation
  from imask_jax import metrics

  labels = nifti_io.load_nifti_labels(path)
  grid = orientation.SourceGrid.from_affine(labels.shape, labels.affine)
  canonical, spacing = grid.to_canonical(labels.data), grid.canonical_spacing
  knee = metrics.KneeLabelValues(*(int(v) for v in label_values))
  declared = laterality.declared_side(path, side)
  if declared is not None:
    side, basis = declared.side, f'declared: {declared.basis}'
  else:
    estimate = metrics.estimate_side(canonical, spacing, knee)
    side, basis = estimate.side, f'estimated from the anatomy: {estimate.basis}'
  if side is None:
    raise ValueError(f"{path}: the knee's side is not known ({basis}); give --side")
  try:
    femoral = metrics.femoral_thickness_map(
      canonical,
      spacing,
      labels=knee,
      angle_bin_deg=metrics.femoral_angle_bin_deg(spacing),
      method=thickness_method,
    )
  except ValueError:  # too little femoral cartilage to fit the cylinder: the tibia alone
    femoral = None
  tibial = metrics.tibial_thickness_map(canonical, spacing, labels=knee, method=thickness_method)
  if not len(tibial.points.thickness_mm):
    tibial = None
  regions = metrics.knee_subregions(femoral, tibial, side)
  return Visit(
    path,
    side,
    basis,
    {name: {m: float(getattr(r, m)) for m in REGION_MEASURES} for name, r in regions.items()},
    maps={'femoral': femoral, 'tibial': tibial},
  )


def read_visit(path: str, **label_map_options: Any) -> Visit:
  """A predict report (.json) or a label map (NIfTI) of one visit."""
  if path.endswith('.json'):
    with open(path, encoding='utf-8') as f:
      return visit_from_report(path, json.load(f))
  return visit_from_label_map(path, **label_map_options)


def change(baseline: Visit, followup: Visit) -> dict[str, float]:
  """'<region>_<measure>_change' (follow-up - baseline) for the regions both visits have, and
  '<region>_thickness_cab_mm_change_percent'; ValueError when their sides differ."""
  if baseline.side != followup.side:
    raise ValueError(
      f'{baseline.path} is a {baseline.side} knee and {followup.path} a {followup.side} knee'
    )
  out = {}
  for region in baseline.regions:
    if region not in followup.regions:
      continue
    a, b = baseline.regions[region], followup.regions[region]
    for m in REGION_MEASURES:
      out[f'{region}_{m}_change'] = b[m] - a[m]
    base = a['thickness_cab_mm']
    out[f'{region}_thickness_cab_mm_change_percent'] = (
      100.0 * (b['thickness_cab_mm'] - base) / base if base else math.nan
    )
  return out


def natural_key(text: str) -> list[Any]:
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', str(text))]


def read_table(path: str) -> dict[str, list[tuple[str, str]]]:
  """subject -> [(visit, file)] sorted by visit, from a CSV with subject, visit, file columns
  (relative files are read from the table's folder)."""
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    missing = {'subject', 'visit', 'file'} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(
        f'{path}: the table lacks the columns {sorted(missing)}; expected subject, visit, file'
      )
    rows = list(reader)
  folder = os.path.dirname(os.path.abspath(path))
  out: dict[str, list[tuple[str, str]]] = {}
  for row in rows:
    file = row['file'] if os.path.isabs(row['file']) else os.path.join(folder, row['file'])
    out.setdefault(row['subject'], []).append((row['visit'], file))
  for subject, visits in out.items():
    names = [v for v, _ in visits]
    if len(set(names)) != len(names):
      raise ValueError(f'{path}: subject {subject!r} has a visit twice: {sorted(names)}')
    visits.sort(key=lambda v: natural_key(v[0]))
  return out


def cohort_rows(
  table: Mapping[str, Sequence[tuple[str, str]]], **options: Any
) -> list[dict[str, Any]]:
  """One row per subject and pair of consecutive visits (module docstring)."""
  rows = []
  for subject in sorted(table, key=natural_key):
    visits = table[subject]
    measured = {}
    for visit, file in visits:
      try:
        measured[visit] = read_visit(file, **options)
      except (ValueError, OSError) as error:  # one bad file must not stop the cohort
        measured[visit] = error
    for (va, fa), (vb, fb) in zip(visits, visits[1:]):
      row: dict[str, Any] = {
        'subject': subject,
        'visit_from': va,
        'visit_to': vb,
        'file_from': fa,
        'file_to': fb,
      }
      a, b = measured[va], measured[vb]
      try:
        for x in (a, b):
          if isinstance(x, Exception):
            raise ValueError(str(x))
        row.update(side=a.side, note='', **change(a, b))
      except ValueError as error:
        row.update(side='', note=str(error))
      rows.append(row)
  return rows


LEAD_COLUMNS = ('subject', 'visit_from', 'visit_to', 'file_from', 'file_to', 'side', 'note')


def write_rows(stream: Any, rows: Sequence[Mapping[str, Any]]) -> None:
  """The cohort rows as CSV: the lead columns, then every change column in region order."""
  columns = list(LEAD_COLUMNS) + sorted(
    {k for r in rows for k in r} - set(LEAD_COLUMNS), key=_column_order
  )
  writer = csv.DictWriter(stream, fieldnames=columns, restval='')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def _column_order(column: str) -> tuple[int, str]:
  from imask_jax.evaluation.report.subregion_tables import ORDER

  region = column.split('_', 1)[0]
  return (ORDER.index(region) if region in ORDER else len(ORDER), column)


def pair_text(baseline: Visit, followup: Visit) -> str:
  """The per-region table of one interval, for the terminal."""
  from imask_jax.evaluation.report.subregion_tables import ORDER

  delta = change(baseline, followup)
  lines = [
    f'{baseline.path} -> {followup.path}: {baseline.side} knee ({baseline.side_basis})',
    f'{"region":<6} {"baseline mm":>12} {"follow-up mm":>13} {"change mm":>10} {"change %":>9}',
  ]
  for region in ORDER:
    if f'{region}_thickness_cab_mm_change' not in delta:
      continue
    a = baseline.regions[region]['thickness_cab_mm']
    b = followup.regions[region]['thickness_cab_mm']
    lines.append(
      f'{region:<6} {a:>12.3f} {b:>13.3f} {delta[f"{region}_thickness_cab_mm_change"]:>+10.3f} '
      f'{delta[f"{region}_thickness_cab_mm_change_percent"]:>+9.2f}'
    )
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m imask_jax.change',
    description='Cartilage change between visits of one knee (or a cohort), per femorotibial '
    'subregion, from predict reports or knee label maps.',
  )
  parser.add_argument('files', nargs='*', help='visits of one knee, in order')
  parser.add_argument('--table', help='cohort CSV with columns subject, visit, file')
  parser.add_argument('--out', help='CSV to write (cohort mode; default: print the rows)')
  parser.add_argument('--side', choices=('left', 'right'), help='label maps: the knee side')
  parser.add_argument(
    '--label_values',
    default='1,2,3,4',
    help='label maps: femur, femoral cartilage, tibia, tibial cartilage values',
  )
  parser.add_argument(
    '--thickness_method',
    default=DEFAULT_THICKNESS_METHOD,
    choices=THICKNESS_METHODS,
  )
  parser.add_argument(
    '--figure',
    help='one knee: a PNG of the baseline maps with each subregion filled with its change '
    '(label-map inputs; the first interval)',
  )
  args = parser.parse_args(argv)
  if bool(args.files) == bool(args.table):
    parser.error('give the visits of one knee, or --table')
  try:
    values = tuple(int(v) for v in args.label_values.split(','))
  except ValueError:
    parser.error(f'--label_values {args.label_values!r}: expected four integers')
  if len(values) != 4:
    parser.error(f'--label_values {args.label_values!r}: expected four integers')
  options = dict(label_values=values, side=args.side, thickness_method=args.thickness_method)
  try:
    if args.table:
      rows = cohort_rows(read_table(args.table), **options)
      if not args.out:
        write_rows(sys.stdout, rows)
        return EXIT_OK
      from data_pipelines.atomic import atomic_path

      with atomic_path(args.out) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        write_rows(f, rows)
      print(f'{len(rows)} interval(s) written to {args.out}')
      return EXIT_OK
    if len(args.files) < 2:
      parser.error('give at least two visits')
    visits = [read_visit(f, **options) for f in args.files]
    print('\n\n'.join(pair_text(a, b) for a, b in zip(visits, visits[1:])))
    if args.figure:
      if visits[0].maps is None:
        parser.error('--figure needs label-map inputs (reports hold no thickness maps)')
      from imask_jax.evaluation import viz

      delta = change(visits[0], visits[1])
      per_region = {
        k[: -len('_thickness_cab_mm_change')]: v
        for k, v in delta.items()
        if k.endswith('_thickness_cab_mm_change')
      }
      title = f'{os.path.basename(visits[0].path)} -> {os.path.basename(visits[1].path)}'
      viz.save_change_figure(args.figure, visits[0].maps, visits[0].side, per_region, title)
      print(f'figure written to {args.figure}')
    return EXIT_OK
  except (ValueError, OSError) as error:  # a file that cannot be read or measured
    print(f'{parser.prog}: {error}', file=sys.stderr)
    return EXIT_REFUSED


if __name__ == '__main__':
  sys.exit(main())
