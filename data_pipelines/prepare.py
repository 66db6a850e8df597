"""A public knee release, as downloaded, into a checked nnU-Net folder that training reads.

  python -m data_pipelines.prepare oaizib-cm SRC DST
  python -m data_pipelines.prepare oai-zib SRC DST [--mask_axcodes LPS]

oaizib-cm: OAIZIB-CM as released: `imagesTr/ labelsTr/ imagesTs/ labelsTs/` and no
  dataset.json; labels 1 femur, 2 femoral cartilage, 3 tibia, 4 medial and 5 lateral tibial
  cartilage. DST gets a dataset.json and a link to every file, named the nnU-Net way.
oai-zib: the original OAI-ZIB archive: ZIB's masks `segmentation_masks/<id>.segmentation_masks.mhd`
  beside the OAI DESS images converted to NIfTI, `images/<id>.nii[.gz]`. DST gets links to the
  images (imagesTr/, or imagesTs/ for an image without a mask) and each mask as a NIfTI label
  map on its image's grid (labelsTr/, aligned with `--mask_axcodes`, docs/data.md).

Every case is checked (header, scanner pose, label values, label map against its image) and
DST/prepare_report.json lists what was found: cases, label values with voxel counts, spacing
and orientation histograms, suspicious cases. A case with an error (unreadable, no pose,
values outside the release's labels, a bone-only classification mask, a label map that does
not fit its image) stops the command before anything is written, every such case named. DST
is written whole or not at all; no source file is changed. docs/data.md walks through both.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from data_pipelines.errors import EXIT_OK, EXIT_REFUSED, DataError

RELEASES = ('oaizib-cm', 'oai-zib')
REPORT_FILE = 'prepare_report.json'
# A case whose voxel size differs from the median by more than this share on an axis is listed
# as suspicious (another protocol, or a header written in other units).
SPACING_TOLERANCE = 0.2


@dataclasses.dataclass
class CaseCheck:
  """What one case holds: its files, grid and label voxel counts, and what is wrong with it."""

  case_id: str
  split: str  # 'train' (labelled, imagesTr/) or 'test' (imagesTs/)
  image: str
  label: str | None
  shape: tuple[int, ...] = ()
  spacing_mm: tuple[float, ...] = ()  # along the canonical R, A, S axes
  axcodes: str = ''
  counts: dict[int, int] = dataclasses.field(default_factory=dict)
  errors: list[str] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class SourceCase:
  case_id: str
  split: str
  image: str
  label: str | None


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m data_pipelines.prepare',
    description='Check a knee release as downloaded and make the nnU-Net folder that '
    'training reads (dataset.json, links to the images, labels); no source file is changed.',
  )
  parser.add_argument('release', choices=RELEASES, help='which release SRC holds')
  parser.add_argument('src', help='the release as downloaded (unpacked)')
  parser.add_argument('dst', help='the folder to write (must not exist yet)')
  parser.add_argument(
    '--mask_axcodes',
    default='LPS',
    help="oai-zib: the direction each MetaImage mask axis points to (default 'LPS', docs/data.md)",
  )
  parser.add_argument('--images', default='images', help='oai-zib: the images folder in SRC')
  parser.add_argument(
    '--masks', default='segmentation_masks', help='oai-zib: the masks folder in SRC'
  )
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='cases read at once')
  args = parser.parse_args(argv)

  try:
    report = prepare(
      args.release,
      args.src,
      args.dst,
      mask_axcodes=args.mask_axcodes,
      images=args.images,
      masks=args.masks,
      workers=args.workers,
    )
  except DataError as error:
    print(f'{parser.prog}: {error}', file=sys.stderr)
    return EXIT_REFUSED
  print(summary_text(report))
  if report['errors']:
    print(
      f'{parser.prog}: nothing written: {len(report["errors"])} case(s) with errors',
      file=sys.stderr,
    )
    return EXIT_REFUSED
  print(f'written to {os.path.abspath(args.dst)} (report: {REPORT_FILE})')
  return EXIT_OK


def prepare(
  release: str,
  src: str,
  dst: str,
  *,
  mask_axcodes: str = 'LPS',
  images: str = 'images',
  masks: str = 'segmentation_masks',
  workers: int = 1,
) -> dict[str, Any]:
  """Checks the release in `src` and, when no case has an error, writes `dst` (module
  docstring). Returns the report (also written to dst/prepare_report.json)."""
  from data_pipelines import readers, tissues
  from data_pipelines.atomic import atomic_dir
  from data_pipelines.errors import DataError

  if release not in RELEASES:
    raise ValueError(f'release {release!r}; expected one of {RELEASES}')
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  if os.path.exists(dst):
    raise DataError(dst, 'output folder exists', expected='a new folder (nothing is overwritten)')
  if not os.path.isdir(src):
    raise DataError(src, 'release folder not found')
  if release == 'oaizib-cm':
    scheme, root = tissues.OAIZIB_CM_LABELS, _nnunet_root(src)
    cases = _oaizib_cm_cases(root)
    alignment = None
  else:
    scheme, root = tissues.OAI_ZIB_LABELS, src
    cases = _oai_zib_cases(root, images, masks)
    alignment = readers.MaskAlignment(axcodes=tuple(mask_axcodes.upper()))
  if not any(c.label for c in cases):
    raise DataError(root, 'no labelled case found', expected='label files beside the images')
  ending = _one_ending(root, cases)
  # oai-zib's masks are written as NIfTI while they are checked (not all held in memory): into
  # the temporary folder, which is dropped unless every case passed.
  try:
    with atomic_dir(dst) as tmp:
      labels_out = os.path.join(tmp, 'labelsTr') if alignment is not None else None
      with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        checks = list(pool.map(lambda c: check_case(c, scheme, alignment, labels_out), cases))
      _flag_spacing_outliers(checks)
      report = make_report(release, root, scheme, checks, mask_axcodes if alignment else None)
      if report['errors']:
        raise _NothingWritten
      _write_folder(tmp, release, scheme, checks, report, ending)
  except _NothingWritten:
    pass
  return report


class _NothingWritten(Exception):
  """Raised inside the atomic folder to drop it: a case had an error."""


# --- finding the cases ---------------------------------------------------------------------------


def _nnunet_root(src: str) -> str:
  """`src`, or its one sub-folder holding imagesTr/ (an archive unpacked into a folder)."""
  from data_pipelines.errors import DataError

  if os.path.isdir(os.path.join(src, 'imagesTr')):
    return src
  inside = [
    os.path.join(src, n)
    for n in sorted(os.listdir(src))
    if os.path.isdir(os.path.join(src, n, 'imagesTr'))
  ]
  if len(inside) == 1:
    return inside[0]
  raise DataError(
    src,
    'no imagesTr/ folder',
    found=f'{len(inside)} sub-folders with one' if inside else sorted(os.listdir(src))[:8],
    expected='the OAIZIB-CM release unpacked: imagesTr/ labelsTr/ imagesTs/ labelsTs/',
  )


def _nifti_files(folder: str) -> dict[str, str]:
  """Name without the NIfTI suffix -> path, for the visible NIfTI files of `folder`."""
  from data_pipelines import nifti_io

  if not os.path.isdir(folder):
    return {}
  return {
    nifti_io.strip_nifti_suffix(n): os.path.join(folder, n)
    for n in sorted(os.listdir(folder))
    if nifti_io.is_nifti_path(n) and not n.startswith('.')
  }


def _oaizib_cm_cases(root: str) -> list[SourceCase]:
  from data_pipelines.errors import DataError

  cases = []
  for split, images_dir, labels_dir in (
    ('train', 'imagesTr', 'labelsTr'),
    ('test', 'imagesTs', 'labelsTs'),
  ):
    found = _nifti_files(os.path.join(root, images_dir))
    # nnU-Net names an image <case>_0000; a release may also drop the channel suffix.
    images = {(k[:-5] if k.endswith('_0000') else k): v for k, v in found.items()}
    labels = _nifti_files(os.path.join(root, labels_dir))
    orphans = sorted(set(labels) - set(images))
    if orphans:
      raise DataError(
        labels[orphans[0]],
        f'label file has no image in {images_dir}/',
        found=f'{len(orphans)} such label file(s)',
      )
    unlabelled = sorted(set(images) - set(labels))
    if labels and unlabelled:
      raise DataError(
        images[unlabelled[0]],
        f'image has no label file in {labels_dir}/',
        found=f'{len(unlabelled)} such image(s)',
        expected='one label file per image',
      )
    cases += [SourceCase(i, split, images[i], labels.get(i)) for i in sorted(images)]
  return cases


def _oai_zib_cases(root: str, images: str, masks: str) -> list[SourceCase]:
  from data_pipelines import dataset_folders, readers

  folder = dataset_folders.OaiZibFolder(root, images=images, masks=masks)
  train = [
    SourceCase(c.case_id, 'train', c.image, c.labels[readers.DEFAULT_READER])
    for c in folder.cases('train')
  ]
  test = [SourceCase(c.case_id, 'test', c.image, None) for c in folder.cases('test')]
  return train + test


# --- checking one case ---------------------------------------------------------------------------


def check_case(
  case: SourceCase, scheme: dict[str, int], alignment: Any, labels_out: str | None = None
) -> CaseCheck:
  """Reads one case's image header and label file and records what is wrong with it. With a
  MetaImage mask (`alignment` given), the mask aligned to its image is written as NIfTI into
  `labels_out`/<case id>.nii.gz."""
  import nibabel as nib
  import numpy as np

  from data_pipelines import nifti_io, orientation, readers, tissues
  from data_pipelines.errors import DataError

  check = CaseCheck(case.case_id, case.split, case.image, case.label)
  try:
    header = nifti_io.read_header(case.image)
  except DataError as error:
    check.errors.append(str(error))
    return check
  grid = orientation.SourceGrid.from_affine(header.shape, header.affine)
  check.shape = tuple(int(n) for n in header.shape)
  check.spacing_mm = tuple(round(float(z), 4) for z in grid.canonical_spacing)
  check.axcodes = ''.join(nib.aff2axcodes(header.affine))
  if header.pose_problem:
    check.errors.append(f'{case.image}: image has no scanner pose: {header.pose_problem}')
  if case.label is None:
    return check
  try:
    if alignment is not None:  # a pose-less MetaImage mask, put on the image grid
      labels = readers.aligned_mask(case.label, header, alignment)
    else:
      labels = nifti_io.load_nifti_labels(case.label)
      difference = float(np.abs(labels.affine - header.affine).max())
      if labels.shape != header.shape or difference > readers.AFFINE_ATOL_MM:
        raise DataError(
          case.label,
          f'label map does not fit its image {case.image}',
          found=f'shape {labels.shape}, affines differ by up to {difference:.3g} mm',
          expected=f'shape {header.shape} and the same affine',
        )
      labels = labels.data
  except DataError as error:
    check.errors.append(str(error))
    return check
  counts = np.bincount(labels.ravel(), minlength=256)
  check.counts = {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
  allowed = set(scheme.values())
  outside = {v: n for v, n in check.counts.items() if v not in allowed}
  if outside:
    check.errors.append(
      f"{case.label}: label values outside the release's labels {sorted(allowed)}: "
      + ', '.join(f'value {v}: {n} voxels' for v, n in sorted(outside.items()))
    )
  present = set(check.counts) - {0}
  for name, labels_of in tissues.KNOWN_SCHEMES.items():
    values = set(labels_of.values()) - {0}
    if present == values and values != allowed - {0}:
      check.errors.append(
        f'{case.label}: holds exactly the values of {name} ('
        + ', '.join(f'{v} {n}' for n, v in labels_of.items() if v)
        + '), not those of this release'
      )
  missing = [n for n, v in scheme.items() if v and v not in present]
  if missing and not check.errors:
    check.warnings.append(f'no voxel of {", ".join(missing)}')
  if labels_out is not None and not check.errors:
    nifti_io.save_nifti(labels, header.affine, os.path.join(labels_out, f'{case.case_id}.nii.gz'))
  return check


def _flag_spacing_outliers(checks: list[CaseCheck]) -> None:
  import numpy as np

  spacings = np.array([c.spacing_mm for c in checks if c.spacing_mm])
  if not len(spacings):
    return
  median = np.median(spacings, axis=0)
  for c in checks:
    if c.spacing_mm and np.any(np.abs(np.array(c.spacing_mm) / median - 1) > SPACING_TOLERANCE):
      c.warnings.append(
        f'voxel size {_mm(c.spacing_mm)} mm (R, A, S) far from the median {_mm(median)} mm'
      )


def _mm(values: Sequence[float]) -> str:
  return ' x '.join(f'{float(v):.3g}' for v in values)


# --- the report ----------------------------------------------------------------------------------


def make_report(
  release: str,
  root: str,
  scheme: dict[str, int],
  checks: Sequence[CaseCheck],
  mask_axcodes: str | None,
) -> dict[str, Any]:
  """The JSON report of a checked release (what `summary_text` prints)."""
  names = {v: n for n, v in scheme.items()}
  voxels: collections.Counter = collections.Counter()
  cases_with: collections.Counter = collections.Counter()
  for c in checks:
    for v, n in c.counts.items():
      voxels[v] += n
      cases_with[v] += 1
  labelled = [c for c in checks if c.label]
  return {
    'release': release,
    'source': root,
    'labels': scheme,
    'mask_axcodes': mask_axcodes,
    'cases': {
      split: {
        'images': sum(c.split == split for c in checks),
        'labelled': sum(c.split == split and bool(c.label) for c in checks),
      }
      for split in ('train', 'test')
    },
    'label_values': [
      {
        'value': v,
        'name': names.get(v, '?'),
        'voxels': voxels[v],
        'cases': cases_with[v],
        'of_cases': len(labelled),
      }
      for v in sorted(voxels)
    ],
    'spacing_mm': _histogram(_mm(c.spacing_mm) for c in checks if c.spacing_mm),
    'orientation': _histogram(c.axcodes for c in checks if c.axcodes),
    'shape': _histogram(' x '.join(map(str, c.shape)) for c in checks if c.shape),
    'errors': {c.case_id: c.errors for c in checks if c.errors},
    'suspicious': {c.case_id: c.warnings for c in checks if c.warnings},
  }


def _histogram(values) -> dict[str, int]:
  return dict(collections.Counter(values).most_common())


def summary_text(report: dict[str, Any]) -> str:
  """The report in a few lines for the terminal."""
  cases = report['cases']
  lines = [
    f'{report["release"]} at {report["source"]}: {cases["train"]["images"]} training case(s) '
    f'({cases["train"]["labelled"]} labelled), {cases["test"]["images"]} test case(s) '
    f'({cases["test"]["labelled"]} labelled)',
    'label values (voxels, cases holding them):',
  ]
  lines += [
    f'  {r["value"]:>3} {r["name"]:<26} {r["voxels"]:>14,} voxels in {r["cases"]}/{r["of_cases"]}'
    for r in report['label_values']
  ]
  for key, title in (
    ('spacing_mm', 'voxel size, mm (R, A, S)'),
    ('orientation', 'axes'),
    ('shape', 'shape'),
  ):
    lines.append(f'{title}: ' + '; '.join(f'{k}: {n}' for k, n in list(report[key].items())[:6]))
  for key, title in (('errors', 'errors'), ('suspicious', 'suspicious')):
    found = report[key]
    if found:
      lines.append(f'{title} ({len(found)} case(s)):')
      lines += [f'  {case}: {"; ".join(items)}' for case, items in list(found.items())[:20]]
      if len(found) > 20:
        lines.append(f'  ... {len(found) - 20} more in {REPORT_FILE}')
  return '\n'.join(lines)


# --- writing -------------------------------------------------------------------------------------


def _one_ending(root: str, cases: Sequence[SourceCase]) -> str:
  """The images' one file ending (an nnU-Net folder has one)."""
  from data_pipelines.errors import DataError

  endings = {_ending(c.image) for c in cases}
  if len(endings) != 1:
    raise DataError(root, 'images end in both .nii and .nii.gz', expected='one file ending')
  return endings.pop()


def _write_folder(
  tmp: str,
  release: str,
  scheme: dict[str, int],
  checks: Sequence[CaseCheck],
  report: dict,
  ending: str,
) -> None:
  """Links and dataset.json into the temporary folder `tmp` (oai-zib's labels are there)."""
  label_ending = '.nii.gz' if release == 'oai-zib' else ending
  for c in checks:
    images = 'imagesTr' if c.split == 'train' else 'imagesTs'
    labels = 'labelsTr' if c.split == 'train' else 'labelsTs'
    os.makedirs(os.path.join(tmp, images), exist_ok=True)
    os.symlink(c.image, os.path.join(tmp, images, f'{c.case_id}_0000{ending}'))
    if c.label is not None and release == 'oaizib-cm':
      os.makedirs(os.path.join(tmp, labels), exist_ok=True)
      os.symlink(c.label, os.path.join(tmp, labels, c.case_id + label_ending))
  meta = {
    'name': release,
    'description': f'{release} from {report["source"]} (python -m data_pipelines.prepare)',
    'channel_names': {'0': 'MRI'},
    'labels': scheme,
    'plane': 'sagittal',
    'file_ending': ending,
    'label_file_ending': label_ending,
    'numTraining': report['cases']['train']['labelled'],
  }
  for name, content in (('dataset.json', meta), (REPORT_FILE, report)):
    with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
      json.dump(content, f, indent=1)
      f.write('\n')


def _ending(path: str) -> str:
  return '.nii.gz' if path.endswith('.nii.gz') else '.nii'


if __name__ == '__main__':
  sys.exit(main())
