"""Which knee a scan declares itself to be, left or right, and what declares it.

Medial and lateral follow from the side: in canonical RAS+ arrays (axis 0 points to the
patient's right) a right knee's lateral side is at larger R and its medial side at smaller R; a
left knee's the other way round. A NIfTI file does not record the side, so it is read from, in
this order of trust:

1. an explicit value: predict's `--side left|right`, for every input of the run;
2. a DICOM series' tags, every file's: Laterality (0020,0060), ImageLaterality (0020,0062),
   FrameLaterality (0020,9072) ('R' or 'L'; 'B' both and 'U' unpaired declare no side), then
   the series description (0008,103E) and protocol name (0018,1030) as OAI writes them,
   "SAG_3D_DESS_RIGHT" (`side_in_text`);
3. a JSON sidecar beside a NIfTI file, of the same stem (`scan.nii.gz` -> `scan.json`, as
   dcm2niix writes them): our key "side" ("left" / "right", or "L" / "R"; any other value is a
   DataError naming the file, as is a sidecar that is not a JSON object), then the keys of a
   BIDS / dcm2niix sidecar "Laterality" ('R' / 'L' or a word), "SeriesDescription",
   "ProtocolName".

`declared_side` returns the side with its basis (one line naming the source and the value), or
None when nothing declares one. Contradictions: the explicit value wins over whatever the scan
says (its basis names what it overrides); within a scan, two sources that disagree (Laterality
'R' and a series description "..._LEFT", two files of one series, a sidecar's "side" and its
"SeriesDescription") raise `SideConflict`, one line naming both. predict does not fail the scan
for that: it records the conflict, takes the anatomical estimate and flags the scan
(imask_jax/predict/quality.py, `side_conflict`); `--side` settles it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from data_pipelines import dicom_io, nifti_io
from data_pipelines.errors import DataError

SIDES = ('left', 'right')
# DICOM tags that declare a side by a code, then texts that may name it; SimpleITK's keys.
DICOM_CODE_TAGS = {
  '0020|0060': 'Laterality (0020,0060)',
  '0020|0062': 'ImageLaterality (0020,0062)',
  '0020|9072': 'FrameLaterality (0020,9072)',
}
DICOM_TEXT_TAGS = {
  '0008|103e': 'SeriesDescription (0008,103E)',
  '0018|1030': 'ProtocolName (0018,1030)',
}
SIDECAR_CODE_KEYS = ('side', 'Laterality')
SIDECAR_TEXT_KEYS = ('SeriesDescription', 'ProtocolName')
_WORDS = {'RIGHT': 'right', 'LEFT': 'left'}
_LETTERS = {'R': 'right', 'L': 'left'}


class SideConflict(ValueError):
  """Two sources of one scan declare different sides (the message names both)."""


@dataclasses.dataclass(frozen=True)
class DeclaredSide:
  """side: 'left' or 'right'; basis: one line, the source and its value."""

  side: str
  basis: str


def explicit_side(value: str) -> str:
  """A `--side` value, 'left' or 'right' (any case); ValueError otherwise."""
  side = str(value).strip().lower()
  if side not in SIDES:
    raise ValueError(f'--side {value!r}: expected left or right')
  return side


def side_of_code(value: Any) -> str | None:
  """The side a laterality value names: 'R' / 'L' (DICOM's codes) or the words right / left,
  any case; None for anything else ('B', 'U', empty, not a string)."""
  if not isinstance(value, str):
    return None
  text = value.strip().upper()
  return _LETTERS.get(text) or _WORDS.get(text)


def side_in_text(text: Any) -> str | None:
  """The side a series description or protocol name names, or None. The text is cut into words
  at every character that is not a letter or digit ('_' included: "SAG_3D_DESS_RIGHT" holds
  the word RIGHT; "UPRIGHT" and "BRIGHT" hold none). The words RIGHT and LEFT (any case) decide;
  the single letters R and L only where no such word is present; a text naming both sides names
  none."""
  if not isinstance(text, str):
    return None
  words = re.split(r'[^A-Z0-9]+', text.upper())
  named = {_WORDS[w] for w in words if w in _WORDS}
  if not named:
    named = {_LETTERS[w] for w in words if w in _LETTERS}
  return named.pop() if len(named) == 1 else None


def _one_side(declarations: list[DeclaredSide]) -> DeclaredSide | None:
  """The first declaration, or SideConflict when any other names the other side."""
  if not declarations:
    return None
  first = declarations[0]
  for other in declarations[1:]:
    if other.side != first.side:
      raise SideConflict(
        f'{first.basis} says {first.side}, but {other.basis} says {other.side}; give the side '
        'with --side left|right'
      )
  return first


def dicom_side(folder: str | os.PathLike) -> DeclaredSide | None:
  """The side the series in `folder` declares (module docstring, source 2), or None;
  SideConflict when its tags or its files disagree."""
  folder = os.fspath(folder)
  values = dicom_io.series_tags(folder, [*DICOM_CODE_TAGS, *DICOM_TEXT_TAGS])
  declarations = []
  for tags, read in ((DICOM_CODE_TAGS, side_of_code), (DICOM_TEXT_TAGS, side_in_text)):
    for tag, name in tags.items():
      for value, file in values[tag].items():
        side = read(value)
        if side is not None:
          declarations.append(DeclaredSide(side, f'DICOM {name} {value!r} in {file}'))
  return _one_side(declarations)


def sidecar_path(nifti_path: str | os.PathLike) -> str:
  """The JSON sidecar's path of a NIfTI file: 'scan.nii.gz' -> 'scan.json'."""
  return nifti_io.strip_nifti_suffix(os.fspath(nifti_path)) + '.json'


def sidecar_side(nifti_path: str | os.PathLike) -> DeclaredSide | None:
  """The side the JSON sidecar of a NIfTI file declares (module docstring, source 3), or None
  (no sidecar, or none of its keys names a side); SideConflict when its keys disagree, a
  DataError when it is not a JSON object or its "side" is not left or right."""
  path = sidecar_path(nifti_path)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError) as error:
    raise DataError(path, f'cannot read the JSON sidecar of {nifti_path}: {error}') from error
  if not isinstance(meta, dict):
    raise DataError(path, 'a JSON sidecar that is not an object', found=type(meta).__name__)
  if meta.get('side') is not None and side_of_code(meta['side']) is None:
    raise DataError(
      path,
      'the sidecar\'s "side" is not a side',
      found=repr(meta['side']),
      expected='"left" or "right"',
    )
  name = os.path.basename(path)
  declarations = []
  for keys, read in ((SIDECAR_CODE_KEYS, side_of_code), (SIDECAR_TEXT_KEYS, side_in_text)):
    for key in keys:
      side = read(meta.get(key))
      if side is not None:
        declarations.append(DeclaredSide(side, f'sidecar {name} "{key}": {meta[key]!r}'))
  return _one_side(declarations)


def declared_side(path: str | os.PathLike, explicit: str | None = None) -> DeclaredSide | None:
  """The side declared for the scan at `path` (a NIfTI file or a DICOM series folder), by the
  first source of the module docstring that names one; None when none does. `explicit`:
  predict's --side, which wins over the scan (its basis then names what the scan says)."""
  path = os.fspath(path)
  read = dicom_side if os.path.isdir(path) else sidecar_side
  if explicit is None:
    return read(path)
  side = explicit_side(explicit)
  try:
    own = read(path)
  except (SideConflict, DataError) as error:
    return DeclaredSide(side, f"--side {side} (the scan's own declaration is unusable: {error})")
  if own is None:
    return DeclaredSide(side, f'--side {side}')
  if own.side == side:
    return DeclaredSide(side, f'--side {side} ({own.basis} agrees)')
  return DeclaredSide(side, f'--side {side} (overrides {own.basis}, which says {own.side})')


def sources_read(path: str | os.PathLike) -> str:
  """What `declared_side` looked at for `path`, for a report that found no side there."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return "no side in the series' " + ', '.join(
      n.split(' ')[0] for n in (*DICOM_CODE_TAGS.values(), *DICOM_TEXT_TAGS.values())
    )
  sidecar = sidecar_path(path)
  if not os.path.isfile(sidecar):
    return f'no sidecar {os.path.basename(sidecar)}'
  return f'no side in sidecar {os.path.basename(sidecar)}'
