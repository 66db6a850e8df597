"""What a stored slice dataset depends on, taken from the experiment config, and its splits.

`DatasetParams` (`params_from_config`) holds every setting that changes the stored examples;
its `config_name` (a readable prefix plus a digest of all fields) names the TFDS builder config,
so two settings never share a cache. Settings the input pipeline applies on the fly (image size,
augmentation, normalisation range) are not part of it. `assign_splits` cuts the case ids into
splits by subject (a stable hash of the subject ids, no seed); `subject_and_timepoint` reads a
case id's subject and time point with `data.subject_pattern`; a split file (`data.split_file`,
`split_file.py`) replaces the computed split, its ids (not its path) part of the digest.

Over 500 lines because `DatasetParams` validates each of its fields where it is defined (so a
stored dataset's name never comes from a setting that was not checked), and the split rules
live beside it. The split rules, the subject patterns and the warnings: docs/data.md, 'Splits
by subject' and 'Split files'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from absl import logging

from data_pipelines import instances, orientation, tissues

SPLITS = ('train', 'validation', 'test')
PHANTOM_DATASETS = {'phantom_knee': 'knee', 'phantom_hip': 'hip'}
MANUAL_DATASETS = ('oai_zib', 'nifti_folder')
DATASETS = tuple(PHANTOM_DATASETS) + MANUAL_DATASETS
_SPLIT_SALT = 'imask-split-v1/'
# The OAI-ZIB masks' axes (readers.MaskAlignment; derived in docs/data.md).
DEFAULT_MASK_AXCODES = 'LPS'
# Case ids named <subject>_<timepoint>, all of them: the time point is the text after the last
# underscore (single-visit names too: 'HIP_001' -> subject 'HIP', time point '001').
SUBJECT_TIMEPOINT_PATTERN = r'(?P<subject>.+)_(?P<timepoint>[^_]+)'
# What reads as a visit in a case id's last token (any case): OAI's V00 / V01 and 00m / 12m,
# v2, visit1, tp0, t1, m12, month24, y1, year2, w8, week8, bl, baseline, fu, fu1, followup,
# pre, post.
VISIT_CODE = (
  r'(?:v|visit|tp|t|m|month|y|year|w|week)\d+|\d+m|bl|baseline|fu\d*|follow-?up\d*|pre|post'
)
# <subject>_<visit> where the last token is a visit code, else the whole case id is the
# subject of a single-visit scan ('stiho_017_v2' -> 'stiho_017', 'v2'; 'HIP_001' -> 'HIP_001').
SUBJECT_VISIT_PATTERN = rf'(?P<subject>.+?)(?:_(?P<timepoint>(?i:{VISIT_CODE})))?'
# More cases than this in one subject is warned about: scans of one person, or a pattern that
# puts several people into one subject? The OAI scanned knees at up to nine visits (00m to
# 96m), so a longitudinal OAI set stays below it.
MAX_CASES_PER_SUBJECT = 10


@dataclasses.dataclass(frozen=True)
class DatasetParams:
  """The settings that determine a stored slice dataset.

  dataset: builder name (DATASETS). plane: anatomical slicing plane. class_label_values: the label
  value of each class, in class order (class id = position + 1); a tuple for a class that merges
  several values (its first is the canonical one, tissues.LabelScheme). reader: label reader ('' =
  the reference labels). instance_mode / min_instance_pixels: instance extraction.
  empty_slice_rate: fraction of instance-free slices kept. context_slices: 2.5D neighbours per
  side. seed: phantom generation and empty-slice sampling. split_fractions: train, validation,
  test. phantom_preset / num_volumes: phantoms only (None otherwise); phantom_spacing_mm /
  phantom_fov_mm: the phantoms' in-plane spacing and field of view when not the preset's (None:
  the preset's); phantom_generator_version: the generator's GENERATOR_VERSION, so that phantoms of
  a changed generator never reuse a stored dataset. phantom_shape_family / phantom_contrast:
  knee phantoms only, the shape family (knee_shapes.FAMILIES) and the signal table
  (contrast.CONTRASTS) when not the generator's default ('default', 'dess'; None then).
  source_dir: the raw folder of a manual dataset, absolute (None for phantoms, whose folder
  lives in the data_dir). subject_pattern: how a case id names its subject (docs/data.md,
  'Splits by subject'; '' = one case per subject). allow_missing_pose:
  read images whose affine is missing or the identity (a converter that lost the scanner pose)
  instead of refusing them. mask_axcodes: oai_zib only, the anatomical direction each MetaImage
  mask axis points to (readers.MaskAlignment). official_test: an nnU-Net folder's labelled
  `imagesTs/` + `labelsTs/` is the test split (sources.split_assignment); False cuts every split
  from `imagesTr/`. split_file / split_ids: a split file (`split_file.py`, config
  `data.split_file`): its absolute path and its case ids per split (SPLITS order, sorted), which
  replace the computed split (split_fractions and official_test then have no effect); None when
  the splits are computed.
  """

  dataset: str
  plane: str
  class_label_values: tuple[int | tuple[int, ...], ...]
  reader: str
  instance_mode: str
  min_instance_pixels: int
  empty_slice_rate: float
  context_slices: int
  seed: int
  split_fractions: tuple[float, float, float]
  phantom_preset: str | None = None
  num_volumes: int | None = None
  source_dir: str | None = None
  subject_pattern: str = ''
  phantom_spacing_mm: float | None = None
  phantom_fov_mm: float | None = None
  phantom_generator_version: str | None = None
  allow_missing_pose: bool = False
  mask_axcodes: str = DEFAULT_MASK_AXCODES
  official_test: bool = True
  split_file: str | None = None
  split_ids: tuple[tuple[str, ...], ...] | None = None
  phantom_shape_family: str | None = None
  phantom_contrast: str | None = None

  def __post_init__(self):
    if self.dataset not in DATASETS:
      raise ValueError(f'config data.dataset={self.dataset!r}; expected one of {DATASETS}')
    if self.plane not in orientation.PLANES:
      raise ValueError(f'config data.plane={self.plane!r}; expected one of {orientation.PLANES}')
    object.__setattr__(
      self, 'class_label_values', tissues.normalized_class_values(self.class_label_values)
    )
    values = self.all_label_values
    if not values or len(set(values)) != len(values) or any(not 1 <= v <= 255 for v in values):
      raise ValueError(
        f'config data.class_label_values={self.class_label_values}; expected distinct label '
        'values in 1..255, one per class (or a tuple of them, merged into the class)'
      )
    axcodes = self.mask_axcodes.upper()
    if sorted(axcodes.replace('L', 'R').replace('P', 'A').replace('I', 'S')) != ['A', 'R', 'S']:
      raise ValueError(
        f'config data.mask_axcodes={self.mask_axcodes!r}; expected three letters naming the '
        "direction of each mask axis, one of L/R, P/A and I/S each (e.g. 'LPS')"
      )
    if self.instance_mode not in instances.MODES:
      raise ValueError(
        f'config data.instance_mode={self.instance_mode!r}; expected one of {instances.MODES}'
      )
    if self.min_instance_pixels < 1:
      raise ValueError(f'config data.min_instance_pixels={self.min_instance_pixels}; expected >= 1')
    if not 0.0 <= self.empty_slice_rate <= 1.0:
      raise ValueError(
        f'config data.empty_slice_rate={self.empty_slice_rate}; expected a fraction in [0, 1]'
      )
    if self.context_slices < 0:
      raise ValueError(f'config data.context_slices={self.context_slices}; expected >= 0')
    check_fractions(self.split_fractions)
    check_subject_pattern(self.subject_pattern)
    if (self.split_file is None) != (self.split_ids is None) or (
      self.split_ids is not None and len(self.split_ids) != len(SPLITS)
    ):
      raise ValueError(
        f'split_file={self.split_file!r} with split_ids of {self.split_ids and len(self.split_ids)}'
        f' splits; expected both None, or a path and one tuple of case ids per split {SPLITS}'
      )
    if self.is_phantom:
      if self.phantom_preset is None or self.num_volumes is None or self.num_volumes < 1:
        raise ValueError(
          f'{self.dataset}: config data.phantom_preset={self.phantom_preset!r} '
          f'and data.num_volumes={self.num_volumes}; expected a preset and >= 1 '
          'volumes'
        )
      for name in ('phantom_spacing_mm', 'phantom_fov_mm'):
        value = getattr(self, name)
        if value is not None and not value > 0:
          raise ValueError(f'config data.{name}={value}; expected mm > 0, or 0 for the preset')
    elif not self.source_dir:
      raise ValueError(f'{self.dataset}: no raw data folder; set config data.manual_dir')
    for name in ('phantom_shape_family', 'phantom_contrast'):
      value = getattr(self, name)
      if value is None:
        continue
      choices = phantom_choices(name)
      if self.dataset != 'phantom_knee':
        raise ValueError(
          f"{self.dataset}: config data.{name}={value!r}; only phantom_knee draws one (leave it '')"
        )
      if value not in choices:
        raise ValueError(
          f"config data.{name}={value!r}; expected one of {list(choices)}, or '' for the "
          "generator's default"
        )

  @property
  def is_phantom(self) -> bool:
    return self.dataset in PHANTOM_DATASETS

  @property
  def label_scheme(self) -> tissues.LabelScheme:
    """The classes' label values (names are the config's business: class i is 'class_i')."""
    return tissues.LabelScheme.from_values(
      [f'class_{i + 1}' for i in range(len(self.class_label_values))], self.class_label_values
    )

  @property
  def all_label_values(self) -> tuple[int, ...]:
    """Every label value a class is read from (merged ones included), in class order."""
    return tuple(v for entry in self.class_label_values for v in tissues.class_values(entry))

  @property
  def class_map(self) -> dict[int, int]:
    """Label value (merged ones included) -> class id (1-based, in config order)."""
    return self.label_scheme.class_map

  @property
  def canonical_map(self) -> dict[int, int]:
    """Merged label value -> its class's canonical (first) value."""
    return self.label_scheme.canonical_map

  @property
  def channels(self) -> int:
    return 2 * self.context_slices + 1

  @property
  def config_name(self) -> str:
    """A deterministic TFDS config name, e.g. 'sagittal_ctx0_3f9a0c2b51de': a readable prefix
    and the first 12 hex digits of the SHA-256 of every field."""
    fields = dataclasses.asdict(self)
    if not fields['subject_pattern']:
      # One case per subject splits exactly as before the field existed: keep those names
      # (and their stored datasets) valid.
      del fields['subject_pattern']
    # likewise: the preset's grid; a manual dataset has no generator
    for key in (
      'phantom_spacing_mm',
      'phantom_fov_mm',
      'phantom_generator_version',
      'phantom_shape_family',
      'phantom_contrast',
    ):
      if fields[key] is None:
        del fields[key]
    # likewise: fields added later, at the values that read as before
    if not fields['allow_missing_pose']:
      del fields['allow_missing_pose']
    if fields['mask_axcodes'] == DEFAULT_MASK_AXCODES:
      del fields['mask_axcodes']
    if self.is_phantom:  # phantom folders have no imagesTs/; a manual one may have gained it
      del fields['official_test']
    # A split file: its case ids decide the splits (not its path: a moved or copied file
    # names the same slices), and the computed split's settings have no effect.
    del fields['split_file']
    if self.split_ids is None:
      del fields['split_ids']
    else:
      fields.pop('official_test', None)
      del fields['split_fractions']
    fields = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(fields.encode('utf-8')).hexdigest()[:12]
    return f'{self.plane}_ctx{self.context_slices}_{digest}'

  def describe(self) -> str:
    out = ', '.join(
      f'{k}={v!r}'
      for k, v in dataclasses.asdict(self).items()
      if v is not None
      and k != 'split_ids'  # hundreds of ids: the counts below say enough
      and not (k == 'subject_pattern' and not v)
      and not (k == 'allow_missing_pose' and not v)
      and not (k == 'mask_axcodes' and v == DEFAULT_MASK_AXCODES)
      and not (k == 'official_test' and self.is_phantom)
    )
    if self.split_ids is not None:
      counts = ' / '.join(f'{len(ids)} {name}' for name, ids in zip(SPLITS, self.split_ids))
      out += f', split file cases: {counts}'
    return out


def params_from_config(config: Any, data_dir: str | os.PathLike) -> DatasetParams:
  """The DatasetParams of an experiment config (`config.data`).

  A manual dataset's raw folder is `data.manual_dir`, or by TFDS convention
  `<data_dir>/downloads/manual` when that is empty.
  """
  d = config.data
  dataset = str(d.dataset)
  phantom = dataset in PHANTOM_DATASETS
  source_dir = None
  if not phantom:
    source_dir = os.path.abspath(
      os.fspath(d.manual_dir)
      if d.manual_dir
      else os.path.join(os.fspath(data_dir), 'downloads', 'manual')
    )
  return DatasetParams(
    dataset=dataset,
    plane=str(d.plane),
    class_label_values=tissues.normalized_class_values(d.class_label_values),
    reader=str(d.reader),
    instance_mode=str(d.instance_mode),
    min_instance_pixels=int(d.min_instance_pixels),
    empty_slice_rate=float(d.empty_slice_rate),
    context_slices=int(d.context_slices),
    seed=int(d.seed),
    split_fractions=tuple(float(f) for f in d.split_fractions),
    phantom_preset=str(d.phantom_preset) if phantom else None,
    num_volumes=int(d.num_volumes) if phantom else None,
    source_dir=source_dir,
    subject_pattern=str(d.get('subject_pattern', '') or ''),
    phantom_spacing_mm=(float(d.get('phantom_spacing_mm') or 0) or None) if phantom else None,
    phantom_fov_mm=(float(d.get('phantom_fov_mm') or 0) or None) if phantom else None,
    phantom_generator_version=generator_version(dataset) if phantom else None,
    phantom_shape_family=_phantom_choice(d, 'phantom_shape_family', 'default'),
    phantom_contrast=_phantom_choice(d, 'phantom_contrast', 'dess'),
    allow_missing_pose=bool(d.get('allow_missing_pose', False)),
    mask_axcodes=str(d.get('mask_axcodes', '') or DEFAULT_MASK_AXCODES).upper(),
    official_test=bool(d.get('official_test', True)),
    **split_file_fields(d),
  )


def _phantom_choice(d: Any, name: str, default: str) -> str | None:
  """Config data.<name> as a DatasetParams field: None when unset ('') or the generator's
  default, so that datasets made before the field existed keep their digest."""
  value = str(d.get(name, '') or '')
  return None if value in ('', default) else value


def split_file_fields(d: Any) -> dict[str, Any]:
  """DatasetParams' split_file and split_ids from config `data` (read and checked now, so a
  bad split file stops a job before any work)."""
  path = str(d.get('split_file', '') or '')
  if not path:
    return {}
  from data_pipelines.datasets import split_file  # it imports this module

  read = split_file.read(path, str(d.get('subject_pattern', '') or ''))
  return {'split_file': read.path, 'split_ids': read.splits}


def phantom_choices(name: str) -> tuple[str, ...]:
  """The values of DatasetParams.phantom_shape_family or .phantom_contrast (the knee
  generator's modules, imported only when asked for)."""
  if name == 'phantom_shape_family':
    from data_pipelines.phantoms import knee_shapes

    return tuple(knee_shapes.FAMILIES)
  from data_pipelines.phantoms import contrast

  return tuple(contrast.CONTRASTS)


def generator_version(dataset: str) -> str:
  """GENERATOR_VERSION of a phantom dataset's generator (imported only when asked for)."""
  import importlib

  module = importlib.import_module(f'data_pipelines.phantoms.{PHANTOM_DATASETS[dataset]}')
  return str(module.GENERATOR_VERSION)


def check_fractions(fractions: Sequence[float]) -> None:
  if (
    len(fractions) != len(SPLITS)
    or any(not 0.0 <= f <= 1.0 for f in fractions)
    or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
  ):
    raise ValueError(
      f'config data.split_fractions={tuple(fractions)}; expected three fractions '
      f'{SPLITS} in [0, 1] summing to 1'
    )


def split_sizes(num_cases: int, fractions: Sequence[float]) -> tuple[int, int, int]:
  """How many cases each split gets: the largest-remainder rounding of num_cases * fraction,
  and at least one case for every split with a positive fraction while there are cases enough
  (taken from the largest split)."""
  check_fractions(fractions)
  exact = [num_cases * f for f in fractions]
  sizes = [math.floor(x) for x in exact]
  by_remainder = sorted(range(len(SPLITS)), key=lambda i: (-(exact[i] - sizes[i]), i))
  for i in by_remainder[: num_cases - sum(sizes)]:
    sizes[i] += 1
  wanted = [i for i, f in enumerate(fractions) if f > 0]
  if num_cases >= len(wanted):
    for i in wanted:
      if sizes[i] == 0:
        sizes[max(range(len(SPLITS)), key=lambda j: sizes[j])] -= 1
        sizes[i] = 1
  return tuple(sizes)


def check_subject_pattern(pattern: str) -> None:
  if not pattern:
    return
  try:
    compiled = re.compile(pattern)
  except re.error as error:
    raise ValueError(
      f'config data.subject_pattern={pattern!r} is not a regular expression: {error}'
    ) from error
  if 'subject' not in compiled.groupindex:
    raise ValueError(
      f'config data.subject_pattern={pattern!r} has no named group "subject"; '
      f'expected e.g. {SUBJECT_TIMEPOINT_PATTERN!r} for <subject>_<timepoint>'
    )


def subject_and_timepoint(case_id: str, pattern: str = '') -> tuple[str, str | None]:
  """(subject id, time point or None) of a case id under `subject_pattern` (docs/data.md,
  'Splits by subject'); with no pattern the case is its own subject with no time point."""
  if not pattern:
    return case_id, None
  check_subject_pattern(pattern)
  match = re.fullmatch(pattern, case_id)
  if match is None or not match.group('subject'):
    raise ValueError(
      f'case id {case_id!r} does not match config data.subject_pattern='
      f'{pattern!r}; expected every case id to name its subject (e.g. '
      '<subject>_<timepoint>), so that no subject straddles two splits'
    )
  timepoint = match.groupdict().get('timepoint')
  return match.group('subject'), timepoint or None


def assign_splits(
  case_ids: Iterable[str], fractions: Sequence[float], subject_pattern: str = ''
) -> dict[str, tuple[str, ...]]:
  """Split name -> the case ids in it (sorted). Every case lands in exactly one split, and
  all cases of one subject (`subject_and_timepoint`) in the same one.

  Subjects are ordered by SHA-256 of a fixed salt and the subject id, and the order is cut
  into `split_sizes` pieces (counted in subjects): train first, then validation, then test.
  With no pattern each case is its own subject, so the split is that of the case ids.
  """
  case_ids = list(case_ids)
  if len(set(case_ids)) != len(case_ids):
    duplicates = sorted({c for c in case_ids if case_ids.count(c) > 1})
    raise ValueError(f'duplicate case ids {duplicates}; a case must appear once')
  by_subject: dict[str, list[str]] = {}
  for case_id in case_ids:
    by_subject.setdefault(subject_and_timepoint(case_id, subject_pattern)[0], []).append(case_id)
  order = sorted(
    by_subject, key=lambda s: hashlib.sha256((_SPLIT_SALT + s).encode('utf-8')).hexdigest()
  )
  sizes = split_sizes(len(order), fractions)
  out, start = {}, 0
  for name, size in zip(SPLITS, sizes):
    out[name] = tuple(sorted(c for s in order[start : start + size] for c in by_subject[s]))
    start += size
  for warning in split_warnings(by_subject, out, fractions, subject_pattern):
    logging.warning('%s', warning)
  return out


def pattern_note(pattern: str) -> str:
  """How a message about splits names the subject pattern it used."""
  if pattern:
    return f'data.subject_pattern={pattern!r}'
  return "data.subject_pattern='' (one case per subject)"


def split_note(d: Any) -> str:
  """How a message names what decided a config's splits (config `data`): its split file, or
  its fractions and subject pattern."""
  if d.get('split_file'):
    return f'data.split_file={d.split_file!r}'
  return f'data.split_fractions={tuple(d.split_fractions)}, ' + pattern_note(
    str(d.get('subject_pattern', '') or '')
  )


def split_warnings(
  by_subject: dict[str, Sequence[str]],
  splits: dict[str, Sequence[str]],
  fractions: Sequence[float],
  pattern: str,
) -> list[str]:
  """One-line warnings about a split (`assign_splits`) that the subject pattern may have
  made wrong: every case in one subject, subjects of more than MAX_CASES_PER_SUBJECT cases,
  and splits with a positive fraction left without a case. Each names the pattern."""
  note = pattern_note(pattern)
  check = 'is the pattern right for these case ids?'
  out = []
  total = sum(len(cases) for cases in by_subject.values())
  if len(by_subject) == 1 and total > 1:
    (subject,) = by_subject
    out.append(f'{note}: every case ({total}) falls into one subject {subject!r}; {check}')
  else:
    big = sorted(
      (s for s, cases in by_subject.items() if len(cases) > MAX_CASES_PER_SUBJECT),
      key=lambda s: (-len(by_subject[s]), s),
    )
    if big:
      named = '; '.join(f'subject {s!r} holds {len(by_subject[s])} cases' for s in big[:3])
      more = f'; {len(big) - 3} more subjects do' if len(big) > 3 else ''
      out.append(
        f'{note}: {named}{more} (more than {MAX_CASES_PER_SUBJECT} scans of one person); {check}'
      )
  empty = [(name, f) for name, f in zip(SPLITS, fractions) if f > 0 and not splits[name]]
  if empty:
    listed = '; '.join(f'split {name!r} (fraction {f:g}) is empty' for name, f in empty)
    wanted = sum(f > 0 for f in fractions)
    out.append(
      f'{note}: {listed}: {len(by_subject)} subject(s) for {wanted} splits; give it subjects '
      '(another data.subject_pattern, more cases) or a 0 in data.split_fractions'
    )
  return out
