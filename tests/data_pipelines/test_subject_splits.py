"""Splits by subject: scans of one person (several time points, `<subject>_<timepoint>` case
ids) never straddle two splits; without a subject pattern the split is exactly the per-case
split it always was, and the dataset config names do not change."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from data_pipelines.errors import DataError
from imask_jax import configs

PATTERN = params_lib.SUBJECT_TIMEPOINT_PATTERN


def test_subject_and_timepoint_from_case_ids():
  assert params_lib.subject_and_timepoint('stiho_017_v2', PATTERN) == ('stiho_017', 'v2')
  assert params_lib.subject_and_timepoint('17_baseline', PATTERN) == ('17', 'baseline')
  assert params_lib.subject_and_timepoint('knee_0003') == ('knee_0003', None)  # no pattern
  with pytest.raises(
    ValueError,
    match=r"case id 'p17' does not match config "
    r'data.subject_pattern',
  ):
    params_lib.subject_and_timepoint('p17', PATTERN)
  own = r'(?P<subject>[A-Z]\d+)-(?P<timepoint>pre|post)'
  assert params_lib.subject_and_timepoint('H12-post', own) == ('H12', 'post')
  with pytest.raises(ValueError, match='has no named group "subject"'):
    params_lib.subject_and_timepoint('a_b', r'(.+)_(.+)')


@settings(max_examples=30, deadline=None)
@given(
  subjects=st.dictionaries(
    st.text('abc01_', min_size=1, max_size=6).filter(lambda s: not s.endswith('_')),
    st.sets(st.sampled_from(['v0', 'v1', 'v2', 'w8']), min_size=1, max_size=3),
    min_size=1,
    max_size=25,
  ),
  fractions=st.sampled_from([(0.7, 0.1, 0.2), (0.67, 0.05, 0.28), (1 / 3, 1 / 3, 1 / 3)]),
)
def test_two_time_points_of_one_person_never_straddle_splits(subjects, fractions):
  case_ids = sorted(f'{s}_{t}' for s, points in subjects.items() for t in points)
  splits = params_lib.assign_splits(case_ids, fractions, PATTERN)
  assert sorted(itertools.chain(*splits.values())) == case_ids  # each scan exactly once
  split_of_subject = {}
  for split, ids in splits.items():
    for case_id in ids:
      subject = case_id.rsplit('_', 1)[0]  # the subject, written plainly
      assert split_of_subject.setdefault(subject, split) == split, (
        f'subject {subject!r} in {split_of_subject[subject]!r} and {split!r}'
      )
  # Sizes are counted in subjects; the split does not depend on the order of the case ids.
  per_split = [len({c.rsplit('_', 1)[0] for c in splits[s]}) for s in params_lib.SPLITS]
  assert tuple(per_split) == params_lib.split_sizes(len(subjects), fractions)
  assert params_lib.assign_splits(reversed(case_ids), fractions, PATTERN) == splits


def plain_per_case_split(case_ids, fractions):
  """The split as it was before subjects: case ids ordered by SHA-256(salt + id), cut."""
  order = sorted(
    case_ids, key=lambda c: hashlib.sha256(('imask-split-v1/' + c).encode('utf-8')).hexdigest()
  )
  sizes = params_lib.split_sizes(len(order), fractions)
  cuts = np.cumsum((0,) + sizes)
  return {
    name: tuple(sorted(order[cuts[i] : cuts[i + 1]])) for i, name in enumerate(params_lib.SPLITS)
  }


def test_without_a_pattern_every_case_is_its_own_subject_as_before():
  case_ids = [f'knee_{i:04d}' for i in range(24)] + ['s1_v1', 's1_v2']
  assert params_lib.assign_splits(case_ids, (0.7, 0.1, 0.2)) == plain_per_case_split(
    case_ids, (0.7, 0.1, 0.2)
  )


def test_config_names_keep_their_digest_without_a_pattern_and_change_with_one(tmp_path):
  config = configs.default_config()
  config.data.dataset = 'nifti_folder'
  config.data.manual_dir = str(tmp_path)
  params = params_lib.params_from_config(config, tmp_path)
  assert params.subject_pattern == ''
  # The digest of the fields as they were before subject_pattern (and the phantom grid
  # overrides and generator version) existed.
  newer = ('subject_pattern', 'phantom_spacing_mm', 'phantom_fov_mm', 'phantom_generator_version')
  old_fields = {k: v for k, v in dataclasses.asdict(params).items() if k not in newer}
  digest = hashlib.sha256(json.dumps(old_fields, sort_keys=True).encode('utf-8')).hexdigest()
  assert params.config_name.endswith(digest[:12])
  assert 'subject_pattern' not in params.describe()
  config.data.subject_pattern = PATTERN
  with_pattern = params_lib.params_from_config(config, tmp_path)
  assert with_pattern.subject_pattern == PATTERN
  assert with_pattern.config_name != params.config_name
  config.data.subject_pattern = r'(\w+)_(\w+)'
  with pytest.raises(ValueError, match='data.subject_pattern=.* has no named group'):
    params_lib.params_from_config(config, tmp_path)


def write_visits_folder(root, visits: dict[str, tuple[str, ...]]) -> None:
  """A tiny nnU-Net folder with one scan per (subject, visit): <subject>_<visit>."""
  os.makedirs(root / 'imagesTr')
  os.makedirs(root / 'labelsTr')
  (root / 'dataset.json').write_text(
    json.dumps(
      {
        'channel_names': {'0': 'STIR'},
        'labels': {'background': 0, 'effusion': 1},
        'file_ending': '.nii.gz',
        'plane': 'coronal',
      }
    )
  )
  labels = np.zeros((4, 4, 3), np.uint8)
  labels[1:3, 1:3, 1] = 1
  for subject, points in visits.items():
    for point in points:
      case_id = f'{subject}_{point}'
      nib.save(
        nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4)),
        root / 'imagesTr' / f'{case_id}_0000.nii.gz',
      )
      nib.save(nib.Nifti1Image(labels, np.eye(4)), root / 'labelsTr' / f'{case_id}.nii.gz')


def test_a_stiho_style_folder_is_split_by_subject(tmp_path):
  visits = {f'stiho_{i:03d}': ('v1', 'v2') for i in range(12)}
  visits['stiho_012'] = ('v1',)  # one time point only
  write_visits_folder(tmp_path / 'raw', visits)
  config = configs.default_config()
  config.data.dataset = 'nifti_folder'
  config.data.manual_dir = str(tmp_path / 'raw')
  config.data.plane = 'coronal'
  config.data.class_label_values = (1,)
  config.data.split_fractions = (0.67, 0.05, 0.28)
  config.data.subject_pattern = PATTERN
  split_cases = sources.volume_sources(params_lib.params_from_config(config, tmp_path), tmp_path)
  subjects = {
    split: {c.case_id.rsplit('_', 1)[0] for c in source.cases}
    for split, source in split_cases.items()
  }
  for a, b in itertools.combinations(params_lib.SPLITS, 2):
    assert not subjects[a] & subjects[b], f'{a} and {b} share {subjects[a] & subjects[b]}'
  assert sum(len(s.cases) for s in split_cases.values()) == 25
  assert tuple(len(subjects[s]) for s in params_lib.SPLITS) == params_lib.split_sizes(
    13, (0.67, 0.05, 0.28)
  )
  # Split per case, the same folder puts some person's two visits on both sides.
  per_case = params_lib.assign_splits(
    [c.case_id for s in split_cases.values() for c in s.cases], (0.67, 0.05, 0.28)
  )
  split_of = {c: s for s, ids in per_case.items() for c in ids}
  assert any(split_of[f'{p}_v1'] != split_of[f'{p}_v2'] for p in visits if p != 'stiho_012')
  # A scan whose id names no time point is refused, with the folder named.
  nib.save(
    nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4)),
    tmp_path / 'raw' / 'imagesTr' / 'odd_0000.nii.gz',
  )
  nib.save(
    nib.Nifti1Image(np.zeros((4, 4, 3), np.uint8), np.eye(4)),
    tmp_path / 'raw' / 'labelsTr' / 'odd.nii.gz',
  )
  with pytest.raises(DataError, match=r"cannot split the cases by subject .*case id 'odd'"):
    sources.volume_sources(params_lib.params_from_config(config, tmp_path), tmp_path)


def test_the_stiho_experiment_splits_by_subject_and_its_phantom_smoke_by_scan():
  import importlib.util

  path = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'stiho.py')
  spec = importlib.util.spec_from_file_location('stiho_experiment', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config().data.subject_pattern == PATTERN
  # Phantom ids such as 'hip_0003' name no visit: read as <subject>_<timepoint> they would
  # all be subject 'hip', one split holding everything.
  assert module.get_config('smoke').data.subject_pattern == ''
