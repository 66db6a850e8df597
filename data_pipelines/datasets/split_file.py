"""Split files: the case ids of each split, named by the researcher instead of computed.

A split file (config `data.split_file`) is one JSON object with a list of case ids per split:

  {"description": "the paper's 470 / 30 OAI scans (optional, any text)",
   "train": ["9001104", "9002116", ...],
   "validation": [],
   "test": ["9003406", ...]}

Keys are 'train', 'validation', 'test' (each optional, missing = empty) and 'description';
anything else is refused, so a misspelt split name cannot silently empty a split. A case id is
the file name without its suffixes (`imagesTr/<case id>_0000.nii.gz`, OAI-ZIB's
`images/<case id>.nii.gz`). An id may appear once in the whole file; under a subject pattern
(`data.subject_pattern`) all scans of one subject must be in the same split. Which of the
folder's cases the ids must name, and what happens to cases no split names, is the business of
`sources.split_assignment`.

Every problem is one `DataError` line that names the file, the id and the split. `write` makes
such a file (tools/write_split_file.py: the split a run used).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence

from data_pipelines import atomic
from data_pipelines.datasets.params import SPLITS, subject_and_timepoint
from data_pipelines.errors import DataError

KEYS = (*SPLITS, 'description')


@dataclasses.dataclass(frozen=True)
class SplitFile:
  """A read and checked split file. path: absolute. splits: the case ids of each split in
  SPLITS order, each sorted (the order in the file carries no meaning)."""

  path: str
  splits: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]

  def as_dict(self) -> dict[str, tuple[str, ...]]:
    return dict(zip(SPLITS, self.splits))

  @property
  def sha256(self) -> str:
    """Digest of the split contents (not of the file's bytes: order, spacing and the
    description do not change which cases are where)."""
    return splits_sha256(self.splits)


def splits_sha256(splits: tuple[tuple[str, ...], ...]) -> str:
  text = json.dumps([list(ids) for ids in splits])
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def read(path: str | os.PathLike, subject_pattern: str = '') -> SplitFile:
  """Reads and checks the split file at `path` (relative paths from the working directory).

  Raises DataError (one line, naming the file) when the file is missing or not JSON, a key is
  not a split name, a split is not a list of non-empty strings, an id appears twice, or, under
  `subject_pattern`, one subject's scans are in two splits (or an id names no subject).
  """
  path = os.path.abspath(os.fspath(path))
  expected_form = (
    'a JSON object {"train": [case ids], "validation": [...], "test": [...]} (docs/data.md)'
  )
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise DataError(
      path, 'split file not found', expected='the file named by config data.split_file'
    ) from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise DataError(
      path, 'split file is not readable JSON', found=str(error), expected=expected_form
    ) from None
  if not isinstance(raw, dict):
    raise DataError(
      path, 'split file is not a JSON object', found=type(raw).__name__, expected=expected_form
    )
  unknown = sorted(set(raw) - set(KEYS))
  if unknown:
    raise DataError(
      path, f'split file has unknown key(s) {unknown}', expected=f'keys among {list(KEYS)}'
    )
  if not isinstance(raw.get('description', ''), str):
    raise DataError(path, 'split file "description" is not a string')
  split_of: dict[str, str] = {}
  splits = []
  for split in SPLITS:
    ids = raw.get(split, [])
    if not isinstance(ids, list) or not all(isinstance(i, str) and i.strip() for i in ids):
      raise DataError(
        path,
        f'split {split!r} is not a list of case ids',
        found=repr(ids)[:80],
        expected='a JSON list of non-empty strings',
      )
    for case_id in ids:
      if case_id in split_of:
        where = 'twice' if split_of[case_id] == split else f'also in {split_of[case_id]!r}'
        raise DataError(
          path,
          f'case id {case_id!r} of split {split!r} is listed {where}',
          expected='every case id once in the whole file',
        )
      split_of[case_id] = split
    splits.append(tuple(sorted(ids)))
  if subject_pattern:
    check_subjects(path, split_of, subject_pattern)
  return SplitFile(path=path, splits=tuple(splits))


def write(
  path: str | os.PathLike, splits: Mapping[str, Sequence[str]], description: str = ''
) -> str:
  """Writes a split file (atomically: whole or not at all) with the case ids of each split in
  SPLITS order, sorted, one id per line; returns the absolute path. Checked as `read` checks:
  an id in two splits or a split name not in SPLITS is a ValueError, nothing written."""
  unknown = sorted(set(splits) - set(SPLITS))
  if unknown:
    raise ValueError(f'split file {path}: unknown split(s) {unknown}; expected {list(SPLITS)}')
  seen: dict[str, str] = {}
  for split in SPLITS:
    for case_id in splits.get(split, ()):
      if seen.setdefault(case_id, split) != split:
        raise ValueError(
          f'split file {path}: case id {case_id!r} in {seen[case_id]!r} and {split!r}'
        )
  content = {'description': description} if description else {}
  content.update({split: sorted(splits.get(split, ())) for split in SPLITS})
  path = os.path.abspath(os.fspath(path))
  with atomic.atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    json.dump(content, f, indent=1)
    f.write('\n')
  return path


def check_subjects(path: str, split_of: dict[str, str], subject_pattern: str) -> None:
  """DataError when one subject's scans (under `subject_pattern`) are in two splits: a person
  seen in training would then be 'held out' in test."""
  first: dict[str, str] = {}  # subject -> a case id of it already placed
  for case_id in sorted(split_of, key=lambda c: (SPLITS.index(split_of[c]), c)):
    try:
      subject = subject_and_timepoint(case_id, subject_pattern)[0]
    except ValueError as error:
      raise DataError(path, f'case id {case_id!r} names no subject', found=str(error)) from None
    other = first.setdefault(subject, case_id)
    if split_of[other] != split_of[case_id]:
      raise DataError(
        path,
        f'subject {subject!r} is in two splits: case id {other!r} in {split_of[other]!r} and '
        f'{case_id!r} in {split_of[case_id]!r}',
        expected=f'all scans of a subject in one split (config data.subject_pattern='
        f'{subject_pattern!r})',
      )
