"""Writes phantoms as an nnU-Net style dataset (NIfTI, dataset.json, truth sidecars, preview).

Layout of `out`:
  imagesTr/<id>_0000.nii.gz   image, int16 scanner-like units
  labelsTr/<id>.nii.gz        truth label map, uint8
  labelsTr_<reader>/<id>.nii.gz  simulated reader label maps (hip)
  truth/<id>.json             the truth sidecar
  dataset.json                nnU-Net v2 keys plus "plane", "readers", "training"
  .phantoms_generator.json    the generator's marker: only a folder holding it is ever replaced

Every file's bytes depend only on (kind, seed, preset) and the optional in-plane overrides
(spacing_mm, fov_mm; recorded in dataset.json when given): gzip headers carry no time or name,
JSON is written with a fixed key order, and the PNG carries no metadata.

A longitudinal knee dataset (`visits` >= 2) holds each knee at visits 0 .. visits - 1 as cases
'<kind>_<i:04d>_v<visit>' (one subject per knee under data.subject_pattern's
SUBJECT_VISIT_PATTERN); visit 0's image and label map are the single-visit dataset's.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from data_pipelines.atomic import atomic_dir, atomic_path, remove_stale_temporaries
from data_pipelines.datasets import params
from data_pipelines.phantoms import contrast as contrast_lib
from data_pipelines.phantoms import hip, knee, knee_regions, knee_shapes, mri, scene

KINDS = {'knee': knee, 'hip': hip}
# Written into every dataset folder the generator makes; a folder is replaced only if it holds
# this file, so a user's own dataset (with a dataset.json of its own) is never deleted.
MARKER = '.phantoms_generator.json'
MARKER_TEXT = 'written by python -m data_pipelines.phantoms; replaced whole by its next run'
# Display orientation per acquisition plane: rows run superior -> inferior; columns run
# anterior -> posterior (sagittal) or patient right -> left (coronal, radiological view).
DISPLAY = {'sagittal': ('I', 'P'), 'coronal': ('I', 'L')}
OVERLAY_COLOURS = np.array(
  [
    [0, 0, 0],
    [0.95, 0.85, 0.2],
    [0.2, 0.85, 0.35],
    [0.3, 0.55, 1.0],
    [0.95, 0.35, 0.8],
    [1.0, 0.25, 0.15],
  ],
  np.float32,
)


def generate(
  kind: str,
  seed: int,
  preset: str = 'cpu',
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
  visit: int | None = None,
  thinning: Mapping[str, float] | None = None,
  contrast: str | None = None,
  shape_family: str | None = None,
) -> scene.Phantom:
  """The phantom of `kind` ('knee' or 'hip') for one seed.

  spacing_mm, fov_mm: optional in-plane pixel spacing and field of view (mm) instead of the
  preset's (see `mri.acquisition`; ValueError when out of range). visit, thinning (knees only):
  that visit of the knee, thinned (knee.generate_knee). contrast (knees only): the tissue
  signal table (`contrast.CONTRASTS`; None: the generator's default, DESS). shape_family
  (knees only): `knee_shapes.FAMILIES` (None: the default family).
  """
  if kind not in KINDS:
    raise ValueError(f'phantoms: kind={kind!r}; expected one of {sorted(KINDS)}')
  if kind == 'knee':
    extra = {} if visit is None else dict(visit=visit, thinning=thinning)
    if contrast is not None:
      extra['contrast'] = contrast
    if shape_family is not None:
      extra['shape_family'] = shape_family
    return knee.generate_knee(seed, preset, spacing_mm=spacing_mm, fov_mm=fov_mm, **extra)
  if visit is not None or thinning:
    raise ValueError('phantoms: visits and thinning are drawn for knees only')
  if contrast is not None or shape_family is not None:
    raise ValueError('phantoms: contrasts and shape families are drawn for knees only')
  return hip.generate_hip(seed, preset, spacing_mm=spacing_mm, fov_mm=fov_mm)


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
  """A gzipped NIfTI-1 file as bytes, with sform = qform = affine (scanner), units mm.

  gzip.compress with mtime=0 writes neither a time stamp nor a file name, so equal arrays give
  equal bytes.
  """
  img = nib.Nifti1Image(array, affine)
  img.header.set_xyzt_units('mm')
  img.set_sform(affine, code=1)
  img.set_qform(affine, code=1)
  return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _write_bytes(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _json_bytes(obj: Any, indent: int | None = 1) -> bytes:
  """Deterministic JSON (insertion-ordered keys, no NaN)."""
  separators = (',', ': ') if indent is not None else (',', ':')
  return (json.dumps(obj, indent=indent, separators=separators, allow_nan=False) + '\n').encode()


def write_case(root: str, case_id: str, ph: scene.Phantom) -> dict[str, str]:
  """Writes one case's files under root; returns their paths relative to root."""
  files = {
    'image': f'imagesTr/{case_id}_0000.nii.gz',
    'label': f'labelsTr/{case_id}.nii.gz',
    'truth': f'truth/{case_id}.json',
  }
  image = np.asarray(ph.image)
  if image.min() < np.iinfo(np.int16).min or image.max() > np.iinfo(np.int16).max:
    raise ValueError(f'{case_id}: image range [{image.min()}, {image.max()}] does not fit int16')
  _write_bytes(
    os.path.join(root, files['image']), nifti_bytes(np.rint(image).astype(np.int16), ph.affine)
  )
  _write_bytes(
    os.path.join(root, files['label']), nifti_bytes(ph.labels.astype(np.uint8), ph.affine)
  )
  for reader, labels in ph.reader_labels.items():
    files[reader] = f'labelsTr_{reader}/{case_id}.nii.gz'
    _write_bytes(os.path.join(root, files[reader]), nifti_bytes(labels.astype(np.uint8), ph.affine))
  truth = dict(ph.truth, case_id=case_id)
  # Compact: the thickness grids make an indented file several times larger.
  _write_bytes(os.path.join(root, files['truth']), _json_bytes(truth, indent=None))
  return files


def dataset_json(
  kind: str,
  cases: list[tuple[str, dict[str, str]]],
  seed: int,
  preset: str,
  readers: list[str],
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
  visits: int = 1,
  thinning: Mapping[str, float] | None = None,
  contrast: str | None = None,
  shape_family: str | None = None,
) -> dict[str, Any]:
  """nnU-Net v2 dataset.json plus our keys (plane, readers, the case list, provenance).

  The in-plane overrides are recorded (as 'spacing_mm', 'fov_mm', after 'preset') only when
  given, 'visits', 'thinning_mm_per_visit' only for a longitudinal dataset and 'contrast',
  'shape_family' only when given, so a preset's dataset.json is what it was before they existed.
  """
  module = KINDS[kind]
  sequence = module.SEQUENCE if contrast is None else contrast_lib.SEQUENCE_NAMES[contrast]
  out = {
    'name': f'phantom_{kind}',
    'description': f'Procedural {sequence} {module.PLANE} {kind} MRI phantoms '
    '(data_pipelines.phantoms).',
    'channel_names': {'0': module.SEQUENCE},
    'labels': dict(module.LABELS),
    'numTraining': len(cases),
    'file_ending': '.nii.gz',
    'plane': module.PLANE,
    'readers': list(readers),
    'generator_version': module.GENERATOR_VERSION,
    'seed': int(seed),
    'preset': preset,
  }
  if spacing_mm is not None:
    out['spacing_mm'] = float(spacing_mm)
  if fov_mm is not None:
    out['fov_mm'] = float(fov_mm)
  if contrast is not None:
    out['contrast'] = contrast
    out['channel_names'] = {'0': sequence}
  if shape_family is not None:
    out['shape_family'] = shape_family
  if visits > 1:
    out['visits'] = int(visits)
    out['thinning_mm_per_visit'] = dict(thinning or {})
    # The config data.subject_pattern that reads '<knee>_v<visit>' as one subject per knee.
    out['subject_pattern'] = params.SUBJECT_VISIT_PATTERN
  out['training'] = [
    dict(id=cid, **{k: './' + v for k, v in files.items()}) for cid, files in cases
  ]
  return out


def write_dataset(
  kind: str,
  num: int,
  seed: int,
  out: str,
  preset: str = 'cpu',
  preview: str | None = None,
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
  indices: Sequence[int] | None = None,
  visits: int = 1,
  thinning: Mapping[str, float] | None = None,
  contrast: str | None = None,
  shape_family: str | None = None,
) -> dict[str, Any]:
  """Writes `num` phantoms (volume i from seed + i, id '<kind>_<i:04d>') into folder `out`.

  indices: write only these volumes of the `num` (their ids and seeds unchanged), e.g. the test
  split of a dataset again at another resolution.

  visits (knees only): >= 2 writes a longitudinal dataset, each knee at visits 0 .. visits - 1
  with ids '<kind>_<i:04d>_v<visit>' (knee.generate_knee's `visit`); visit v's cartilage is
  thinned by v x `thinning` ({region: mm per visit}, e.g. {'cMF': 0.1}; needs visits >= 2).

  spacing_mm, fov_mm: optional in-plane pixel spacing and field of view (mm) instead of the
  preset's; checked (> 0, 16 to 2048 pixels in-plane) before anything is written.

  contrast (knees only): the tissue signal table (`contrast.CONTRASTS`, e.g. 'iw_fs', a
  held-out contrast for judging); shape_family (knees only): `knee_shapes.FAMILIES` ('varied'
  for training, 'held_out' for judging); each recorded in dataset.json when given.

  The folder is assembled beside `out` and moved into place whole. An existing `out` is
  replaced only when the generator wrote it (it holds the MARKER file) or it is an empty
  folder; anything else (a user's dataset, any other folder or file) is refused with a
  ValueError and left as it is. Temporaries of a killed earlier run beside `out` are removed.
  `preview`, if given, is a PNG of a few slices of the first volume. Returns the dataset.json
  content.
  """
  if kind not in KINDS:
    raise ValueError(f'phantoms: kind={kind!r}; expected one of {sorted(KINDS)}')
  if int(num) < 1:
    raise ValueError(f'phantoms: num={num}; expected at least 1 volume')
  if preset not in KINDS[kind].PRESETS:
    raise ValueError(f'phantoms: preset={preset!r}; expected one of {sorted(KINDS[kind].PRESETS)}')
  mri.acquisition(KINDS[kind].PRESETS, preset, spacing_mm, fov_mm)  # ValueError if out of range
  if isinstance(visits, bool) or int(visits) != visits or visits < 1:
    raise ValueError(f'phantoms: visits={visits!r}; expected a whole number >= 1')
  visits = int(visits)
  if visits > 1 and kind != 'knee':
    raise ValueError(f'phantoms: visits={visits} are drawn for knees only, not {kind!r}')
  if thinning and visits < 2:
    raise ValueError(f'phantoms: thinning={dict(thinning)} needs visits >= 2 (a follow-up)')
  if contrast is not None:
    if kind != 'knee':
      raise ValueError(f'phantoms: contrast={contrast!r} is drawn for knees only, not {kind!r}')
    contrast_lib.signal_table(contrast)  # ValueError naming the choices
  if shape_family is not None:
    if kind != 'knee':
      raise ValueError(
        f'phantoms: shape_family={shape_family!r} is drawn for knees only, not {kind!r}'
      )
    knee_shapes.draw_shape(0, shape_family)  # ValueError naming the choices
  thinning = knee_regions.check_thinning(thinning, 'phantoms')
  # The last visit's thinning must be in range too; checked before anything is written.
  knee_regions.check_thinning({k: v * (visits - 1) for k, v in thinning.items()}, 'phantoms')
  chosen = range(int(num)) if indices is None else sorted({int(i) for i in indices})
  if not chosen or not all(0 <= i < int(num) for i in chosen):
    raise ValueError(f'phantoms: indices={indices}; expected some of 0 .. {int(num) - 1}')
  check_replaceable(out)
  remove_stale_temporaries(out)
  first = None
  cases = []
  readers: list[str] = []
  with atomic_dir(out) as tmp:
    for i in chosen:
      for v in range(visits):
        if visits == 1:
          ph = generate(
            kind,
            int(seed) + i,
            preset,
            spacing_mm,
            fov_mm,
            contrast=contrast,
            shape_family=shape_family,
          )
          case_id = f'{kind}_{i:04d}'
        else:
          drawn = {k: round(mm * v, 6) for k, mm in thinning.items()} if v else None
          ph = generate(
            kind, int(seed) + i, preset, spacing_mm, fov_mm, v, drawn, contrast, shape_family
          )
          case_id = f'{kind}_{i:04d}_v{v}'
        cases.append((case_id, write_case(tmp, case_id, ph)))
        readers = sorted(ph.reader_labels)
        if first is None:
          first = ph
    meta = dataset_json(
      kind,
      cases,
      seed,
      preset,
      readers,
      spacing_mm,
      fov_mm,
      visits,
      thinning,
      contrast,
      shape_family,
    )
    _write_bytes(os.path.join(tmp, 'dataset.json'), _json_bytes(meta))
    _write_bytes(os.path.join(tmp, MARKER), _json_bytes({'generator': MARKER_TEXT, 'kind': kind}))
  if preview:
    save_preview([first], preview)
  return meta


def check_replaceable(out: str) -> None:
  """ValueError unless `out` is absent, an empty folder, or a folder the generator wrote."""
  if os.path.lexists(out) and not os.path.isdir(out):
    raise ValueError(
      f'phantoms: output path {out!r} exists and is not a folder; refusing to '
      'replace it (choose a new or empty folder)'
    )
  if not os.path.isdir(out) or not os.listdir(out):
    return
  if not os.path.isfile(os.path.join(out, MARKER)):
    what = (
      'holds a dataset.json the generator did not write'
      if os.path.exists(os.path.join(out, 'dataset.json'))
      else 'is not empty'
    )
    raise ValueError(
      f'phantoms: output folder {out!r} {what} (no {MARKER}); refusing to '
      'replace it (choose a new or empty folder)'
    )


# ---- preview -----------------------------------------------------------------------------------


def display_volume(ph: scene.Phantom) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
  """Image and labels reoriented to (rows, columns, slices) for display; in-plane spacing."""
  plane = ph.truth['plane']
  rows, cols = DISPLAY[plane]
  current = nib.orientations.io_orientation(ph.affine)
  codes = nib.orientations.aff2axcodes(ph.affine)
  pairs = {'L': 'R', 'R': 'L', 'A': 'P', 'P': 'A', 'S': 'I', 'I': 'S'}
  used = {rows, pairs[rows], cols, pairs[cols]}
  slice_code = next(c for c in codes if c not in used)
  target = nib.orientations.axcodes2ornt((rows, cols, slice_code))
  transform = nib.orientations.ornt_transform(current, target)
  image = nib.orientations.apply_orientation(ph.image, transform)
  labels = nib.orientations.apply_orientation(ph.labels, transform)
  spacing = np.linalg.norm(ph.affine[:3, :3], axis=0)
  order = transform[:, 0].astype(int)  # source axis i goes to output axis order[i]
  out_spacing = np.empty(3)
  out_spacing[order] = spacing
  return image, labels, (float(out_spacing[0]), float(out_spacing[1]))


def preview_slices(labels: np.ndarray, kind: str) -> list[int]:
  """Three informative slice indices (last axis): through the labelled anatomy."""
  if kind == 'knee':
    femur = np.nonzero((labels == 2).any(axis=(0, 1)))[0]
    if femur.size == 0:
      femur = np.arange(labels.shape[2])
    lo, hi = femur.min(), femur.max()
    return [int(lo + f * (hi - lo)) for f in (0.2, 0.5, 0.8)]
  n = labels.shape[2]
  fluid = np.nonzero((labels > 0).any(axis=(0, 1)))[0]
  mid = int(np.median(fluid)) if fluid.size else n // 2
  return [max(mid - 2, 0), mid, min(mid + 2, n - 1)]


def save_preview(phantoms: list[scene.Phantom], path: str) -> None:
  """PNG: one row per phantom, three slices raw and the same three with labels overlaid.

  Truth labels are filled in colour; simulated readers (hip) are drawn as outlines. The
  picture is quantised to 256 colours so that it stays small.
  """
  import io

  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  from PIL import Image

  n = len(phantoms)
  fig, axes = plt.subplots(
    n, 6, figsize=(17, 3.15 * n), squeeze=False, gridspec_kw=dict(wspace=0.03, hspace=0.12)
  )
  for r, ph in enumerate(phantoms):
    image, labels, (sr, sc_) = display_volume(ph)
    readers = {
      name: display_volume(dataclasses.replace(ph, labels=lab))[1]
      for name, lab in sorted(ph.reader_labels.items())
    }
    kind = ph.truth['kind']
    idx = preview_slices(labels, kind)
    # Window like a reading station: black at 0, white a little below the brightest fluid.
    lo, hi = 0.0, 0.75 * float(np.percentile(image, 99.8))
    for k, z in enumerate(idx):
      grey = np.clip((image[:, :, z] - lo) / (hi - lo), 0, 1)
      rgb = np.repeat(grey[..., None], 3, axis=-1)
      lab = labels[:, :, z]
      colour = OVERLAY_COLOURS[np.minimum(lab, len(OVERLAY_COLOURS) - 1)]
      alpha = np.where(lab > 0, 0.45, 0.0)[..., None]
      over = rgb * (1 - alpha) + colour * alpha
      for c, picture in ((k, rgb), (k + 3, over)):
        ax = axes[r, c]
        ax.imshow(picture, aspect=sr / sc_, interpolation='bilinear')
        ax.set_xticks([])
        ax.set_yticks([])
        title = f'{kind} {ph.truth["plane"]} slice {z}'
        if c >= 3:
          title += ' + truth' + (', readers' if readers else '')
          for rl, col in zip(readers.values(), ('cyan', 'magenta')):
            if (rl[:, :, z] > 0).any():
              ax.contour(rl[:, :, z], [0.5], colors=col, linewidths=0.6)
        ax.set_title(title, fontsize=8)
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=80, bbox_inches='tight', format='png')
  plt.close(fig)
  buffer.seek(0)
  picture = (
    Image.open(buffer)
    .convert('RGB')
    .quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
  )
  with atomic_path(path) as tmp:
    picture.save(tmp, format='PNG', optimize=True)
