"""TFDS slice builders: splits by subject, stored examples equal to readers + instances, 2.5D
channels, deterministic config names, and failed builds that leave nothing loadable."""

from __future__ import annotations

import itertools
import json
import os

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import write_metaimage

from data_pipelines import dataset_folders, instances, readers
from data_pipelines.datasets import builders, sources
from data_pipelines.datasets import params as params_lib
from data_pipelines.errors import DataError
from data_pipelines.slice_examples import PERCENTILE_LEVELS
from imask_jax import configs

# Sagittal series stored [column (to posterior), row (to inferior), slice (to left)], like a
# DICOM converter writes it, so the canonical reorientation is not the identity.
AFFINE = np.array(
  [[0.0, 0.0, -1.5, 30.0], [-0.8, 0.0, 0.0, 50.0], [0.0, -0.7, 0.0, 20.0], [0.0, 0.0, 0.0, 1.0]]
)
SHAPES = [(20, 24, 6), (18, 16, 5), (22, 20, 7), (16, 26, 6), (20, 18, 5), (24, 22, 6)]
LABELS = {'background': 0, 'femur': 1, 'femoral_cartilage': 2, 'tibia': 3, 'tibial_cartilage': 4}


def _labels(rng: np.random.Generator, shape) -> np.ndarray:
  """Blocks of labels 1-3 through the middle slices; the end slices stay empty."""
  labels = np.zeros(shape, np.uint8)
  cols, rows, slices_ = shape
  for value in (1, 2, 3):
    c0, r0 = rng.integers(0, cols - 6), rng.integers(0, rows - 6)
    labels[c0 : c0 + rng.integers(3, 6), r0 : r0 + rng.integers(3, 6), 1 : slices_ - 1] = value
  labels[0, 0, 2] = 4  # one pixel: below min_instance_pixels
  return labels


def write_nnunet_folder(
  root, num_cases: int = 6, *, seed: int = 0, extra_reader: bool = False
) -> dict[str, np.ndarray]:
  """A small nnU-Net folder; returns case id -> label map as stored."""
  rng = np.random.default_rng(seed)
  os.makedirs(root / 'imagesTr')
  os.makedirs(root / 'labelsTr')
  meta = {
    'channel_names': {'0': 'MR'},
    'labels': LABELS,
    'file_ending': '.nii.gz',
    'plane': 'sagittal',
  }
  if extra_reader:
    os.makedirs(root / 'labelsTr_reader1')
  (root / 'dataset.json').write_text(json.dumps(meta))
  stored = {}
  for i in range(num_cases):
    case_id = f'case_{i:02d}'
    shape = SHAPES[i % len(SHAPES)]
    image = rng.normal(300, 60, shape).astype(np.float32)
    labels = _labels(rng, shape)
    nib.save(nib.Nifti1Image(image, AFFINE), root / 'imagesTr' / f'{case_id}_0000.nii.gz')
    nib.save(nib.Nifti1Image(labels, AFFINE), root / 'labelsTr' / f'{case_id}.nii.gz')
    if extra_reader:
      other = _labels(rng, shape)
      nib.save(nib.Nifti1Image(other, AFFINE), root / 'labelsTr_reader1' / f'{case_id}.nii.gz')
      labels = other
    stored[case_id] = labels
  return stored


def nifti_config(root, **data):
  config = configs.default_config()
  config.data.dataset = 'nifti_folder'
  config.data.manual_dir = str(root)
  config.data.class_label_values = (1, 2, 3)
  config.data.split_fractions = (0.5, 0.17, 0.33)
  config.data.empty_slice_rate = 0.5
  for key, value in data.items():
    config.data[key] = value
  return config


def read_split(builder, split):
  return list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())


def expected_slices(
  volume: readers.Volume, class_map, empty_rate: float, seed: int, min_pixels: int
):
  """(kept slice indices, per-slice instances) by readers + instances, written plainly."""
  stack = readers.slices(volume)
  found = [
    instances.extract_instances(stack.labels[i], class_map, min_pixels=min_pixels)
    for i in range(len(stack))
  ]
  keep = instances.select_slices(
    np.array([len(f) > 0 for f in found]), empty_rate, seed, key=volume.case_id
  )
  return set(np.flatnonzero(keep).tolist()), found, stack


# --- splits and names ----------------------------------------------------------------------------


def test_split_sizes_known_answers():
  assert params_lib.split_sizes(24, (0.7, 0.1, 0.2)) == (17, 2, 5)
  assert params_lib.split_sizes(10, (0.8, 0.0, 0.2)) == (8, 0, 2)
  # Few cases: every split with a positive fraction still gets one, taken from the largest.
  assert params_lib.split_sizes(3, (0.7, 0.1, 0.2)) == (1, 1, 1)
  assert params_lib.split_sizes(2, (0.7, 0.1, 0.2)) == (1, 0, 1)  # largest remainders
  with pytest.raises(ValueError, match='split_fractions'):
    params_lib.split_sizes(5, (0.5, 0.2, 0.2))


@settings(max_examples=25, deadline=None)
@given(
  ids=st.sets(st.text('abcdef0123456789_', min_size=1, max_size=8), min_size=1, max_size=40),
  fractions=st.sampled_from([(0.7, 0.1, 0.2), (0.8, 0.2, 0.0), (1 / 3, 1 / 3, 1 / 3)]),
)
def test_splits_are_by_subject_disjoint_complete_and_order_free(ids, fractions):
  ids = sorted(ids)
  splits = params_lib.assign_splits(ids, fractions)
  assert set(splits) == set(params_lib.SPLITS)
  together = list(itertools.chain(*splits.values()))
  assert sorted(together) == ids  # each case exactly once
  assert tuple(len(splits[s]) for s in params_lib.SPLITS) == params_lib.split_sizes(
    len(ids), fractions
  )
  assert params_lib.assign_splits(reversed(ids), fractions) == splits
  assert all(list(v) == sorted(v) for v in splits.values())


def test_a_changed_phantom_generator_gets_its_own_dataset_and_folder(tmp_path, monkeypatch):
  from data_pipelines.phantoms import hip

  config = configs.default_config()
  config.data.dataset = 'phantom_hip'
  before = params_lib.params_from_config(config, tmp_path)
  assert before.phantom_generator_version == hip.GENERATOR_VERSION
  monkeypatch.setattr(hip, 'GENERATOR_VERSION', hip.GENERATOR_VERSION + '.1')
  after = params_lib.params_from_config(config, tmp_path)
  assert after.config_name != before.config_name
  assert sources.phantom_dir(after, tmp_path) != sources.phantom_dir(before, tmp_path)


def test_config_name_changes_with_every_stored_setting_only(tmp_path):
  base = nifti_config(tmp_path)
  name = params_lib.params_from_config(base, tmp_path).config_name
  assert name == params_lib.params_from_config(nifti_config(tmp_path), tmp_path).config_name
  stored_changes = {
    'plane': 'coronal',
    'class_label_values': (1, 2),
    'reader': 'reader1',
    'instance_mode': 'components',
    'min_instance_pixels': 9,
    'empty_slice_rate': 0.2,
    'context_slices': 2,
    'seed': 3,
    'split_fractions': (0.6, 0.2, 0.2),
    'manual_dir': str(tmp_path / 'other'),
  }
  names = {name}
  for key, value in stored_changes.items():
    names.add(
      params_lib.params_from_config(nifti_config(tmp_path, **{key: value}), tmp_path).config_name
    )
  assert len(names) == len(stored_changes) + 1
  for key, value in {
    'image_size': (64, 64),
    'max_instances': 3,
    'shuffle_buffer': 7,
    'normalize_percentiles': (1.0, 99.0),
  }.items():
    assert (
      params_lib.params_from_config(nifti_config(tmp_path, **{key: value}), tmp_path).config_name
      == name
    )


def test_bad_settings_name_the_config_field(tmp_path):
  with pytest.raises(ValueError, match='data.dataset'):
    params_lib.params_from_config(nifti_config(tmp_path, dataset='nope'), tmp_path)
  with pytest.raises(ValueError, match='data.class_label_values'):
    params_lib.params_from_config(nifti_config(tmp_path, class_label_values=(1, 1)), tmp_path)
  with pytest.raises(ValueError, match='data.split_fractions'):
    params_lib.params_from_config(nifti_config(tmp_path, split_fractions=(0.5, 0.5, 0.5)), tmp_path)


# --- nifti_folder ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def nifti_build(tmp_path_factory):
  root = tmp_path_factory.mktemp('nn')
  write_nnunet_folder(root)
  data_dir = tmp_path_factory.mktemp('tfds')
  config = nifti_config(root, context_slices=1)
  return config, data_dir, builders.prepare(config, data_dir)


def test_nifti_folder_examples_equal_readers_and_instances(nifti_build):
  config, data_dir, builder = nifti_build
  params = params_lib.params_from_config(config, data_dir)
  folder = dataset_folders.NnunetFolder(config.data.manual_dir)
  case_ids = [c.case_id for c in folder.cases()]
  seen_cases: dict[str, str] = {}
  for split in params_lib.SPLITS:
    examples = read_split(builder, split)
    by_case: dict[str, dict[int, dict]] = {}
    for ex in examples:
      by_case.setdefault(ex['case_id'].decode(), {})[int(ex['slice_index'])] = ex
    for case_id, stored in by_case.items():
      assert case_id not in seen_cases, f'{case_id} in {split} and {seen_cases[case_id]}'
      seen_cases[case_id] = split
      case = next(c for c in folder.cases() if c.case_id == case_id)
      volume = readers.load_volume(case, plane='sagittal', label_values=LABELS)
      kept, found, stack = expected_slices(
        volume, {1: 1, 2: 2, 3: 3}, 0.5, 0, config.data.min_instance_pixels
      )
      assert set(stored) == kept
      levels = np.percentile(volume.image, PERCENTILE_LEVELS)
      for index, ex in stored.items():
        n = len(stack)
        for channel, offset in enumerate((-1, 0, 1)):  # edge slices repeat themselves
          neighbour = min(max(index + offset, 0), n - 1)
          np.testing.assert_array_equal(ex['image'][..., channel], stack.images[neighbour])
        np.testing.assert_array_equal(ex['classes'], found[index].classes)
        np.testing.assert_array_equal(ex['boxes'], found[index].boxes)
        np.testing.assert_array_equal(ex['masks'], found[index].masks.astype(np.uint8))
        assert ex['masks'].dtype == np.uint8 and ex['image'].dtype == np.float32
        np.testing.assert_allclose(ex['pixel_spacing'], (0.7, 0.8), rtol=1e-6)
        np.testing.assert_allclose(ex['slice_thickness'], 1.5, rtol=1e-6)
        np.testing.assert_allclose(ex['intensity_percentiles'], levels, rtol=1e-5)
  # Splits by subject: every case in exactly one split, as `assign_splits` says, and the
  # whole-volume view of evaluation lists the same cases.
  assert sorted(seen_cases) == sorted(case_ids)
  expected = params_lib.assign_splits(case_ids, config.data.split_fractions)
  for split in params_lib.SPLITS:
    assert sorted(c for c, s in seen_cases.items() if s == split) == list(expected[split])
    source = sources.volume_source(params, data_dir, split)
    assert [c.case_id for c in source.cases] == list(expected[split])


def test_volume_source_loads_the_reader_and_plane_of_the_config(tmp_path):
  root = tmp_path / 'nn'
  stored = write_nnunet_folder(root, 3, extra_reader=True)
  config = nifti_config(root, reader='reader1', plane='coronal')
  params = params_lib.params_from_config(config, tmp_path)
  sources_by_split = sources.volume_sources(params, tmp_path)
  case = sources_by_split['train'].cases[0]
  volume = sources_by_split['train'].load(case)
  expected = np.asarray(
    nib.as_closest_canonical(nib.Nifti1Image(stored[case.case_id], AFFINE)).dataobj
  )
  np.testing.assert_array_equal(volume.labels, expected)
  assert volume.reader == 'reader1' and volume.plane == 'coronal'
  with pytest.raises(DataError, match='data.reader'):
    sources.volume_sources(
      params_lib.params_from_config(nifti_config(root, reader='reader9'), tmp_path), tmp_path
    )
  with pytest.raises(DataError, match='class_label_values'):
    sources.volume_sources(
      params_lib.params_from_config(nifti_config(root, class_label_values=(1, 7)), tmp_path),
      tmp_path,
    )


def test_missing_manual_folder_gives_the_instructions(tmp_path):
  config = nifti_config(tmp_path / 'absent')
  with pytest.raises(AssertionError, match='nnU-Net-style folder'):
    builders.prepare(config, tmp_path / 'tfds')


def test_failed_build_leaves_nothing_loadable(tmp_path):
  root = tmp_path / 'nn'
  write_nnunet_folder(root, 6)
  config = nifti_config(root)
  data_dir = tmp_path / 'tfds'
  # Corrupt a case of the last split generated, so the build fails after writing others.
  params = params_lib.params_from_config(config, data_dir)
  victim = params_lib.assign_splits(
    [f'case_{i:02d}' for i in range(6)], config.data.split_fractions
  )['test'][0]
  image_path = root / 'imagesTr' / f'{victim}_0000.nii.gz'
  good_bytes = image_path.read_bytes()
  image_path.write_bytes(good_bytes[: len(good_bytes) // 2])
  with pytest.raises(DataError, match=victim):
    builders.prepare(config, data_dir)
  builder = builders.builder_for(config, data_dir)
  assert not builder.is_prepared()
  config_dir = data_dir / 'nifti_folder' / params.config_name
  leftovers = os.listdir(config_dir) if config_dir.exists() else []
  assert leftovers == [], leftovers
  with pytest.raises(AssertionError, match='could not find data'):
    builder.as_dataset(split='train')
  # A killed build's folder (never renamed) is not read as a version either, and a repaired
  # dataset then builds normally beside it.
  stale = config_dir / f'incomplete.ABC123_{builders.VERSION}'
  os.makedirs(stale)
  (stale / 'dataset_info.json').write_text('{}')
  assert not builders.builder_for(config, data_dir).is_prepared()
  image_path.write_bytes(good_bytes)
  rebuilt = builders.prepare(config, data_dir)
  assert rebuilt.is_prepared() and rebuilt.info.splits['test'].num_examples > 0


def test_a_split_without_any_slice_is_a_clear_error(tmp_path):
  root = tmp_path / 'nn'
  write_nnunet_folder(root, 3)
  # Label 4 is a single voxel, below min_instance_pixels: no slice has an instance.
  config = nifti_config(root, class_label_values=(4,), empty_slice_rate=0.0)
  with pytest.raises(
    DataError, match="split 'train' of nifti_folder: no slice to store.*empty_slice_rate"
  ):
    builders.prepare(config, tmp_path / 'tfds')


# --- oai_zib -----------------------------------------------------------------------------------


def test_oai_zib_builder_reads_metaimage_masks_onto_the_image(tmp_path):
  """The ZIB mask of case i is written from the image-grid labels by the published mapping
  image[c, r, s] = mask[s, c, R-1-r]; stored slices must equal the canonical image-grid labels
  (nibabel's as_closest_canonical) cut sagittally."""
  rng = np.random.default_rng(4)
  root = tmp_path / 'oai'
  os.makedirs(root / 'images')
  os.makedirs(root / 'segmentation_masks')
  truth = {}
  for i in range(3):
    case_id = f'90000{i:02d}'
    shape = SHAPES[i]
    labels = _labels(rng, shape)
    nib.save(
      nib.Nifti1Image(rng.normal(100, 10, shape).astype(np.float32), AFFINE),
      root / 'images' / f'{case_id}.nii.gz',
    )
    columns, rows, slices_ = shape
    mask = np.zeros((slices_, columns, rows), np.uint8)
    for c, r, s in itertools.product(range(columns), range(rows), range(slices_)):
      mask[s, c, rows - 1 - r] = labels[c, r, s]
    write_metaimage(str(root / 'segmentation_masks' / f'{case_id}.segmentation_masks.mhd'), mask)
    truth[case_id] = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(labels, AFFINE)).dataobj)
  config = configs.default_config()
  config.data.dataset = 'oai_zib'
  config.data.manual_dir = str(root)
  config.data.empty_slice_rate = 0.0
  config.data.min_instance_pixels = 1
  builder = builders.prepare(config, tmp_path / 'tfds')
  total = 0
  for split in params_lib.SPLITS:
    for ex in read_split(builder, split):
      total += 1
      canonical = truth[ex['case_id'].decode()]
      label_slice = np.flip(canonical[int(ex['slice_index'])].T, (0, 1))  # rows S->I, cols A->P
      for k, class_id in enumerate(ex['classes']):
        np.testing.assert_array_equal(ex['masks'][k], label_slice == class_id)
      assert sorted(ex['classes']) == sorted(v for v in (1, 2, 3, 4) if (label_slice == v).any())
  expected_total = sum(
    int((t.reshape(t.shape[0], -1) > 0).any(axis=1).sum()) for t in truth.values()
  )
  assert total == expected_total


# --- phantoms ----------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['knee', 'hip'])
@pytest.mark.slow
def test_phantom_builder_reads_generated_volumes_like_real_data(tmp_path, kind):
  config = configs.default_config()
  config.data.dataset = f'phantom_{kind}'
  config.data.empty_slice_rate = 0.0
  if kind == 'knee':  # one volume (the slowest to generate), all in 'train'
    config.data.num_volumes = 1
    config.data.split_fractions = (1.0, 0.0, 0.0)
  else:
    config.data.num_volumes = 3
    config.data.plane = 'coronal'
    config.data.class_label_values = (1,)
    config.data.reader = 'reader2'
  data_dir = tmp_path / 'tfds'
  builder = builders.prepare(config, data_dir)
  params = params_lib.params_from_config(config, data_dir)
  folder = sources.phantom_dir(params, data_dir)
  assert os.path.isfile(os.path.join(folder, 'dataset.json'))
  case_ids = sorted(c.case_id for c in dataset_folders.NnunetFolder(folder).cases())
  assert len(case_ids) == config.data.num_volumes
  seen = {}
  for split in params_lib.SPLITS:
    source = sources.volume_source(params, data_dir, split)
    if not source.cases:  # a split without cases is not stored
      assert split not in builder.info.splits
      continue
    assert len(source.cases) == 1  # knee: 1 case in train; hip: 3 cases over 0.7 / 0.1 / 0.2
    volume = source.load(source.cases[0])
    assert volume.reader == ('reader2' if kind == 'hip' else readers.DEFAULT_READER)
    kept, found, stack = expected_slices(
      volume, params.class_map, 0.0, 0, config.data.min_instance_pixels
    )
    examples = read_split(builder, split)
    assert {int(ex['slice_index']) for ex in examples} == kept and kept
    for ex in examples[:5]:
      index = int(ex['slice_index'])
      np.testing.assert_array_equal(ex['image'][..., 0], stack.images[index])
      np.testing.assert_array_equal(ex['masks'], found[index].masks.astype(np.uint8))
      np.testing.assert_array_equal(ex['classes'], found[index].classes)
    seen[split] = volume.case_id
  assert sorted(seen.values()) == case_ids
  # Knee label 5 (effusion) is declared by the phantom but not a class here: it is background.
  if kind == 'knee':
    assert all(set(ex['classes']) <= {1, 2, 3, 4} for ex in read_split(builder, 'train'))
