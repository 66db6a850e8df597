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
from data_pipelines.errors import EXIT_REFUSED, DataError
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
  # A manual dataset's digest also names official_test (whether imagesTs/ + labelsTs/ are the
  # test split): a folder that gained labelsTs/ must not reuse slices stored before.
  newer = (
    'subject_pattern',
    'phantom_spacing_mm',
    'phantom_fov_mm',
    'phantom_generator_version',
    'allow_missing_pose',
    'mask_axcodes',
    'split_file',
    'split_ids',
    'phantom_shape_family',
    'phantom_contrast',
  )
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
  from conftest import experiment_config

  assert experiment_config('stiho').data.subject_pattern == params_lib.SUBJECT_VISIT_PATTERN
  # Phantom ids such as 'hip_0003' name no visit: read as <subject>_<timepoint> they would
  # all be subject 'hip', one split holding everything.
  assert experiment_config('stiho', 'smoke').data.subject_pattern == ''


# --- issue 30.5: single-visit names, split warnings, an empty split in one line ------------------

HIPS = tuple(f'HIP_{i:03d}' for i in range(1, 7))


def hip_phantoms_named(root, case_ids) -> str:
  """Small hip phantoms (8 mm pixels) as an nnU-Net folder whose cases are called `case_ids`,
  as in a user's own folder (the files renamed; the generator's own ids are hip_0000...)."""
  from data_pipelines import phantoms

  phantoms.write_dataset('hip', len(case_ids), 0, str(root), spacing_mm=8.0)
  for i, case_id in enumerate(case_ids):
    old = f'hip_{i:04d}'
    for sub in os.listdir(root):
      if os.path.isdir(root / sub):
        for name in os.listdir(root / sub):
          if name.startswith(old):
            os.rename(root / sub / name, root / sub / (case_id + name[len(old) :]))
  return str(root)


def stiho_config(manual_dir, data_dir, arg=None):
  from tests.conftest import experiment_config

  config = experiment_config('stiho', arg)
  config.data.manual_dir = str(manual_dir)
  config.data.data_dir = str(data_dir)
  return config


def split_warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']


@pytest.mark.parametrize(
  'case_id, subject, timepoint',
  [
    ('HIP_001', 'HIP_001', None),  # single-visit names: every scan its own subject
    ('hip_0003', 'hip_0003', None),
    ('stiho_017', 'stiho_017', None),
    ('stiho_017_v2', 'stiho_017', 'v2'),
    ('stiho_017_V00', 'stiho_017', 'V00'),  # OAI visit codes
    ('9001104_00m', '9001104', '00m'),
    ('9001104_12M', '9001104', '12M'),
    ('p3_visit1', 'p3', 'visit1'),
    ('p3_tp0', 'p3', 'tp0'),
    ('p3_t1', 'p3', 't1'),
    ('p3_m12', 'p3', 'm12'),
    ('p3_month24', 'p3', 'month24'),
    ('p3_y1', 'p3', 'y1'),
    ('p3_w8', 'p3', 'w8'),
    ('17_baseline', '17', 'baseline'),
    ('17_BL', '17', 'BL'),
    ('17_fu', '17', 'fu'),
    ('17_fu1', '17', 'fu1'),
    ('17_followup', '17', 'followup'),
    ('a_v1_v2', 'a_v1', 'v2'),  # only the last token is the time point
    ('knee_left', 'knee_left', None),
    ('case_12', 'case_12', None),
  ],
)
def test_the_visit_pattern_reads_single_visit_names_as_their_own_subject(
  case_id, subject, timepoint
):
  pattern = params_lib.SUBJECT_VISIT_PATTERN
  assert params_lib.subject_and_timepoint(case_id, pattern) == (subject, timepoint)


def test_stiho_default_splits_single_visit_hips_into_every_split(tmp_path, caplog):
  """HIP_001 ... HIP_006 under stiho.py's default pattern: six subjects, so every split with a
  positive fraction gets a case (the old <subject>_<timepoint> default made them one subject
  'HIP': everything in train, no validation, an empty test split)."""
  raw = hip_phantoms_named(tmp_path / 'raw', HIPS)
  config = stiho_config(raw, tmp_path / 'tfds')
  assert config.data.subject_pattern == params_lib.SUBJECT_VISIT_PATTERN
  with caplog.at_level('WARNING'):
    by_split = sources.volume_sources(params_lib.params_from_config(config, tmp_path), tmp_path)
  assert tuple(len(by_split[s].cases) for s in params_lib.SPLITS) == params_lib.split_sizes(
    6, config.data.split_fractions
  )
  assert all(by_split[s].cases for s in params_lib.SPLITS)
  assert not split_warnings(caplog)


def test_one_subject_holding_every_case_is_warned_about_with_the_pattern(tmp_path, caplog):
  raw = hip_phantoms_named(tmp_path / 'raw', HIPS)
  config = stiho_config(raw, tmp_path / 'tfds')
  config.data.subject_pattern = params_lib.SUBJECT_TIMEPOINT_PATTERN  # the old default
  with caplog.at_level('WARNING'):
    by_split = sources.volume_sources(params_lib.params_from_config(config, tmp_path), tmp_path)
  assert len(by_split['train'].cases) == 6 and not by_split['test'].cases
  warnings = split_warnings(caplog)
  named = f'data.subject_pattern={params_lib.SUBJECT_TIMEPOINT_PATTERN!r}'
  assert all(named in w and '\n' not in w for w in warnings), warnings
  assert any("every case (6) falls into one subject 'HIP'" in w for w in warnings), warnings
  for split, fraction in (('validation', 0.05), ('test', 0.28)):
    assert any(f'split {split!r} (fraction {fraction}) is empty' in w for w in warnings), warnings


def test_a_subject_with_many_cases_is_warned_about(caplog):
  many = params_lib.MAX_CASES_PER_SUBJECT + 2
  case_ids = [f'p{i}_v{t}' for i in range(8) for t in range(2)]
  case_ids += [f'big_v{t}' for t in range(many)]
  with caplog.at_level('WARNING'):
    splits = params_lib.assign_splits(
      case_ids, (0.7, 0.1, 0.2), params_lib.SUBJECT_TIMEPOINT_PATTERN
    )
  assert all(splits.values())
  (warning,) = split_warnings(caplog)
  assert f"subject 'big' holds {many} cases" in warning
  assert f'data.subject_pattern={params_lib.SUBJECT_TIMEPOINT_PATTERN!r}' in warning
  caplog.clear()
  with caplog.at_level('WARNING'):  # up to MAX_CASES_PER_SUBJECT visits per person: silence
    params_lib.assign_splits(case_ids[:16], (0.7, 0.1, 0.2), params_lib.SUBJECT_TIMEPOINT_PATTERN)
    params_lib.assign_splits([f'knee_{i:04d}' for i in range(24)], (0.7, 0.1, 0.2))
  assert not split_warnings(caplog)


def test_an_empty_split_without_a_pattern_says_one_case_per_subject(caplog):
  with caplog.at_level('WARNING'):
    splits = params_lib.assign_splits(['knee_0000', 'knee_0001'], (0.67, 0.05, 0.28))
  assert not splits['validation']
  (warning,) = split_warnings(caplog)
  assert "split 'validation' (fraction 0.05) is empty" in warning
  assert "data.subject_pattern='' (one case per subject)" in warning


def test_a_case_id_the_pattern_does_not_match_names_the_pattern(tmp_path):
  raw = hip_phantoms_named(tmp_path / 'raw', HIPS)
  config = stiho_config(raw, tmp_path / 'tfds')
  config.data.subject_pattern = r'(?P<subject>H\d+)'
  with pytest.raises(DataError) as error:
    sources.volume_sources(params_lib.params_from_config(config, tmp_path), tmp_path)
  assert str(error.value).count(r"data.subject_pattern='(?P<subject>H\\d+)'") >= 1
  assert '\n' not in str(error.value)


def test_evaluate_on_an_empty_split_is_one_line(tmp_path, capsys, monkeypatch):
  """`python -m imask_jax.evaluate` on a split without cases: one line naming the split, the
  cases of every split, the subject pattern and what to change; exit status 1, no traceback."""
  from imask_jax import evaluate
  from imask_jax import workdir as workdir_lib
  from imask_jax.inference import loading

  raw = hip_phantoms_named(tmp_path / 'raw', HIPS)
  config = stiho_config(raw, tmp_path / 'tfds')
  config.data.subject_pattern = params_lib.SUBJECT_TIMEPOINT_PATTERN  # one subject 'HIP'
  workdir = str(tmp_path / 'run')
  workdir_lib.save_config(config, workdir)
  # No model is run: the split is refused first. A stand-in for the restored checkpoint.
  monkeypatch.setattr(
    loading,
    'load_model',
    lambda wd, step=None, **kw: loading.LoadedModel(
      workdir=wd,
      config=workdir_lib.load_config(wd),
      scheme=None,
      step=6,
      variables=None,
      detect=None,
      mesh=None,
      batch_size=1,
    ),
  )
  assert evaluate.main(['--workdir', workdir, '--split', 'test']) == EXIT_REFUSED
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('python -m imask_jax.evaluate: DataError: ')
  for part in (
    "split 'test' has no cases",
    'train 6, validation 0, test 0',
    f'data.subject_pattern={params_lib.SUBJECT_TIMEPOINT_PATTERN!r}',
    "1 subject ('HIP')",
    'data.split_fractions',
  ):
    assert part in err, (part, err)
