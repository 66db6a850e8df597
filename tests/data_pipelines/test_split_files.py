"""Split files (config data.split_file): the listed case ids are the splits, exactly; bad files
stop in one line naming the file and the id; the file's ids (not its path) key the stored
dataset, and configs without a split file keep their dataset names."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from data_pipelines.datasets import split_file as split_file_lib
from data_pipelines.errors import DataError
from imask_jax import configs

VISIT = params_lib.SUBJECT_VISIT_PATTERN
# Two subjects scanned twice, four once: as a STIHO-style cohort names them.
CASES = ('p1_v1', 'p1_v2', 'p2_v1', 'p2_v2', 'p3', 'p4', 'p5', 'p6')


@pytest.fixture(scope='module')
def hip_folder(tmp_path_factory) -> str:
  """Hip phantoms (8 mm pixels) as an nnU-Net folder whose cases are called CASES."""
  from data_pipelines import phantoms

  root = tmp_path_factory.mktemp('split_files') / 'raw'
  phantoms.write_dataset('hip', len(CASES), 0, str(root), spacing_mm=8.0)
  for i, case_id in enumerate(CASES):
    old = f'hip_{i:04d}'
    for sub in os.listdir(root):
      if os.path.isdir(root / sub):
        for name in os.listdir(root / sub):
          if name.startswith(old):
            os.rename(root / sub / name, root / sub / (case_id + name[len(old) :]))
  return str(root)


def hip_config(manual_dir, split_file='', pattern=VISIT):
  config = configs.default_config()
  config.data.dataset = 'nifti_folder'
  config.data.manual_dir = str(manual_dir)
  config.data.plane = 'coronal'
  config.data.class_names = ('effusion',)
  config.data.class_label_values = (1,)
  config.data.subject_pattern = pattern
  config.data.split_file = str(split_file)
  return config


def write_split_file(path, **splits) -> str:
  path.write_text(json.dumps(splits, indent=1))
  return str(path)


def case_ids(by_split):
  return {split: tuple(c.case_id for c in source.cases) for split, source in by_split.items()}


def test_the_listed_cases_are_the_splits_and_unlisted_ones_are_reported(
  hip_folder, tmp_path, caplog
):
  path = write_split_file(
    tmp_path / 'splits.json',
    description='by hand',
    train=['p5', 'p1_v2', 'p1_v1', 'p3'],
    validation=['p4'],
    test=['p2_v1', 'p2_v2'],
  )
  params = params_lib.params_from_config(hip_config(hip_folder, path), tmp_path)
  with caplog.at_level('WARNING'):
    by_split = sources.volume_sources(params, tmp_path)
  assert case_ids(by_split) == {
    'train': ('p1_v1', 'p1_v2', 'p3', 'p5'),
    'validation': ('p4',),
    'test': ('p2_v1', 'p2_v2'),
  }
  # p6 is in the folder and in no split: left out, and said once, naming file and case.
  (warning,) = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert warning.startswith(path) and '1 labelled case(s)' in warning and 'p6' in warning
  assert by_split['test'].origin == f"the split file {path} (2 cases in 'test')"
  # The computed split of the same folder differs (the file is what decides).
  computed = sources.volume_sources(
    params_lib.params_from_config(hip_config(hip_folder), tmp_path), tmp_path
  )
  assert case_ids(computed) != case_ids(by_split)


def test_missing_splits_are_empty_and_an_empty_split_is_refused_naming_the_file(
  hip_folder, tmp_path
):
  path = write_split_file(tmp_path / 's.json', train=list(CASES[:6]), test=list(CASES[6:]))
  params = params_lib.params_from_config(hip_config(hip_folder, path), tmp_path)
  assert params.split_ids[1] == ()
  with pytest.raises(DataError) as error:
    sources.volume_source(params, tmp_path, 'validation', require_cases=True)
  message = str(error.value)
  assert message.startswith(f"{path}: split 'validation' has no cases") and '\n' not in message
  assert 'train 6, validation 0, test 2' in message


@pytest.mark.parametrize(
  'splits, problem',
  [
    (dict(train=['p1_v1', 'p9'], test=['p3']), "case id 'p9' of split 'train' is not a labelled"),
    (dict(train=['p1_v1', 'p3'], test=['p3']), "case id 'p3' of split 'test' is listed also in "),
    (dict(train=['p3', 'p3']), "case id 'p3' of split 'train' is listed twice"),
    (
      dict(train=['p1_v1', 'p3'], test=['p1_v2']),
      "subject 'p1' is in two splits: case id 'p1_v1' in 'train' and 'p1_v2' in 'test'",
    ),
    (dict(train=['p3'], tset=['p4']), "split file has unknown key(s) ['tset']"),
    (dict(train='p3'), "split 'train' is not a list of case ids"),
    (dict(train=['p3', '']), "split 'train' is not a list of case ids"),
  ],
)
def test_a_bad_split_file_is_one_line_naming_the_file_and_the_id(
  hip_folder, tmp_path, splits, problem
):
  path = write_split_file(tmp_path / 'bad.json', **splits)
  with pytest.raises(DataError) as error:
    params = params_lib.params_from_config(hip_config(hip_folder, path), tmp_path)
    sources.volume_sources(params, tmp_path)
  message = str(error.value)
  assert message.startswith(f'{path}: ') and problem in message and '\n' not in message


def test_without_a_subject_pattern_visits_may_be_split_as_the_file_says(hip_folder, tmp_path):
  path = write_split_file(tmp_path / 's.json', train=['p1_v1', 'p3'], test=['p1_v2'])
  params = params_lib.params_from_config(hip_config(hip_folder, path, pattern=''), tmp_path)
  assert case_ids(sources.volume_sources(params, tmp_path))['test'] == ('p1_v2',)


def test_a_missing_or_broken_file_is_one_line(tmp_path):
  missing = tmp_path / 'none.json'
  with pytest.raises(DataError, match=rf'^{missing}: split file not found'):
    split_file_lib.read(missing)
  broken = tmp_path / 'broken.json'
  broken.write_text('{"train": ["a",]}')
  with pytest.raises(DataError, match=rf'^{broken}: split file is not readable JSON'):
    split_file_lib.read(broken)
  broken.write_text('["a"]')
  with pytest.raises(DataError, match=rf'^{broken}: split file is not a JSON object'):
    split_file_lib.read(broken)


def test_the_official_test_set_is_just_more_cases_to_list(hip_folder, tmp_path):
  """With imagesTs/ + labelsTs/ (as OAIZIB-CM ships) the file may put any labelled case in any
  split: the official test set no longer decides 'test'."""
  root = tmp_path / 'with_ts'
  shutil.copytree(hip_folder, root)
  for folder in ('imagesTs', 'labelsTs'):
    os.makedirs(root / folder)
  for reader in ('reader1', 'reader2'):
    os.makedirs(root / f'labelsTs_{reader}')
    os.rename(root / f'labelsTr_{reader}' / 'p6.nii.gz', root / f'labelsTs_{reader}' / 'p6.nii.gz')
  os.rename(root / 'imagesTr' / 'p6_0000.nii.gz', root / 'imagesTs' / 'p6_0000.nii.gz')
  os.rename(root / 'labelsTr' / 'p6.nii.gz', root / 'labelsTs' / 'p6.nii.gz')
  computed = sources.volume_sources(
    params_lib.params_from_config(hip_config(root), tmp_path), tmp_path
  )
  assert case_ids(computed)['test'] == ('p6',)  # the official test set, without a file
  path = write_split_file(tmp_path / 's.json', train=['p6', 'p3'], test=['p4', 'p5'])
  by_split = sources.volume_sources(
    params_lib.params_from_config(hip_config(root, path), tmp_path), tmp_path
  )
  assert case_ids(by_split) == {'train': ('p3', 'p6'), 'validation': (), 'test': ('p4', 'p5')}
  assert by_split['train'].cases[1].image.startswith(str(root / 'imagesTs'))


# --- what keys a stored dataset ------------------------------------------------------------------

# Dataset names of configs without a split file, computed before the field existed: they must
# not change (their stored slices stay valid).
NAMES_BEFORE_SPLIT_FILES = {
  'default, nifti_folder': 'sagittal_ctx0_bd7e0cb82531',
  'default, nifti_folder, visit pattern': 'sagittal_ctx0_5cc6944d5453',
  'default, oai_zib': 'sagittal_ctx0_260ca2fa101d',
}


def named_configs():
  config = configs.default_config()
  config.data.dataset = 'nifti_folder'
  config.data.manual_dir = '/data/knees'
  yield 'default, nifti_folder', config
  config = configs.default_config()
  config.data.dataset = 'nifti_folder'
  config.data.manual_dir = '/data/knees'
  config.data.subject_pattern = VISIT
  yield 'default, nifti_folder, visit pattern', config
  config = configs.default_config()
  config.data.dataset = 'oai_zib'
  config.data.manual_dir = '/data/knees'
  yield 'default, oai_zib', config


def test_configs_without_a_split_file_keep_their_dataset_names(tmp_path):
  for name, config in named_configs():
    assert (
      params_lib.params_from_config(config, tmp_path).config_name
      == (NAMES_BEFORE_SPLIT_FILES[name])
    ), name


def test_the_split_files_ids_key_the_dataset_not_its_path_or_order(tmp_path):
  def name(split_file, **changes):
    config = hip_config('/data/hips', split_file)
    for key, value in changes.items():
      config.data[key] = value
    return params_lib.params_from_config(config, tmp_path).config_name

  a = write_split_file(tmp_path / 'a.json', train=['p1_v1', 'p1_v2', 'p3'], test=['p4'])
  os.makedirs(tmp_path / 'elsewhere')
  same = write_split_file(
    tmp_path / 'elsewhere' / 'b.json',
    description='a copy',
    test=['p4'],
    train=['p3', 'p1_v2', 'p1_v1'],
  )
  other = write_split_file(tmp_path / 'c.json', train=['p1_v1', 'p1_v2'], test=['p4', 'p3'])
  assert name(a) == name(same) != name(other)
  assert name(a) != name('')
  # The computed split's settings no longer change what is stored ...
  assert name(a, split_fractions=(0.5, 0.25, 0.25), official_test=False) == name(a)
  # ... the others still do.
  assert name(a, empty_slice_rate=0.5) != name(a)
  assert (
    'split file cases: 3 train / 0 validation / 1 test'
    in params_lib.params_from_config(hip_config('/data/hips', a), tmp_path).describe()
  )


@pytest.mark.slow
def test_the_stored_slices_come_from_the_listed_cases(hip_folder, tmp_path):
  """The TFDS build (what training reads): each split's slices carry exactly its cases' ids."""
  import tensorflow_datasets as tfds

  from data_pipelines.datasets import builders

  path = write_split_file(
    tmp_path / 's.json', train=['p1_v1', 'p1_v2', 'p3'], validation=['p4'], test=['p2_v1']
  )
  config = hip_config(hip_folder, path)
  config.data.empty_slice_rate = 1.0
  builder = builders.prepare(config, str(tmp_path / 'tfds'))
  for split, expected in (
    ('train', {'p1_v1', 'p1_v2', 'p3'}),
    ('validation', {'p4'}),
    ('test', {'p2_v1'}),
  ):
    ds = builder.as_dataset(split=split)
    seen = {example['case_id'].decode() for example in tfds.as_numpy(ds)}
    assert seen == expected, split


# --- writing the split a run used -----------------------------------------------------------------


def test_a_runs_split_written_out_and_read_back_is_the_same_split(hip_folder, tmp_path, capsys):
  """tools/write_split_file.py on a workdir trained with the computed split: the file lists
  each split's cases, and a run given the file gets exactly those splits."""
  import importlib.util

  from imask_jax import workdir as workdir_lib
  from tests.conftest import REPO

  spec = importlib.util.spec_from_file_location(
    'write_split_file', os.path.join(REPO, 'tools', 'write_split_file.py')
  )
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  config = hip_config(hip_folder)
  workdir = str(tmp_path / 'run')
  workdir_lib.save_config(config, workdir)
  out = tmp_path / 'splits' / 'frozen.json'
  assert tool.main(['--workdir', workdir, '--out', str(out)]) == 0
  computed = case_ids(
    sources.volume_sources(params_lib.params_from_config(config, tmp_path), tmp_path)
  )
  written = json.loads(out.read_text())
  assert {split: tuple(written[split]) for split in params_lib.SPLITS} == computed
  assert written['description'].startswith(f'the split of {workdir} (nifti_folder, ')
  frozen = params_lib.params_from_config(hip_config(hip_folder, out), tmp_path)
  assert case_ids(sources.volume_sources(frozen, tmp_path)) == computed
  assert capsys.readouterr().out.startswith(f'{out}: train ')


def test_writing_refuses_an_id_in_two_splits_and_unknown_splits(tmp_path):
  with pytest.raises(ValueError, match="case id 'a' in 'train' and 'test'"):
    split_file_lib.write(tmp_path / 'x.json', {'train': ['a'], 'test': ['a']})
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['tests'\]"):
    split_file_lib.write(tmp_path / 'x.json', {'tests': ['a']})
  assert not os.path.exists(tmp_path / 'x.json')


def test_messages_about_a_split_name_the_split_file_when_there_is_one():
  config = hip_config('/data/hips')
  assert params_lib.split_note(config.data) == (
    f'data.split_fractions=(0.7, 0.1, 0.2), data.subject_pattern={VISIT!r}'
  )
  config.data.split_file = '/data/splits.json'
  assert params_lib.split_note(config.data) == "data.split_file='/data/splits.json'"
