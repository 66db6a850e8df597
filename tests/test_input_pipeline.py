"""The tf.data input pipeline: static shapes and dtypes, tight boxes of the final masks, images
equal to a NumPy normalise + resize + pad, flips, vanishing instances, determinism, evaluation
padding and per-process shards."""

from __future__ import annotations

import json
import os

import jax
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import dataset_folders, instances, readers
from data_pipelines.datasets import builders
from imask_jax import configs, slice_transforms
from imask_jax import input_pipeline as ip

# Every key of a batch the pipeline yields.
BATCH_KEYS = (
  'image',
  'gt_boxes',
  'gt_classes',
  'gt_masks',
  'gt_valid',
  'case_id',
  'slice_index',
  'scale',
  'image_extent',
  'pixel_spacing',
  'example_valid',
)

# Volumes stored [column (to posterior), row (to inferior), slice (to left)]; a sagittal slice
# is [rows, columns] = [shape[1], shape[0]]. Slices 22x30 and 40x12 shrink into 24 x 24,
# 9x10 and 20x16 grow.
AFFINE = np.array(
  [[0.0, 0.0, -1.5, 30.0], [-0.8, 0.0, 0.0, 50.0], [0.0, -0.7, 0.0, 20.0], [0.0, 0.0, 0.0, 1.0]]
)
SHAPES = [(30, 22, 4), (12, 40, 4), (10, 9, 4), (16, 20, 4)]
IMAGE_SIZE = (24, 24)
LABELS = {'background': 0, 'a': 1, 'b': 2, 'corner': 3}
CLASS_MAP = {1: 1, 2: 2, 3: 3}
PERCENTILES = (0.5, 99.5)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """A 4-case nnU-Net folder and its TFDS data_dir (built once, shared by all tests)."""
  root = tmp_path_factory.mktemp('nn')
  rng = np.random.default_rng(0)
  os.makedirs(root / 'imagesTr')
  os.makedirs(root / 'labelsTr')
  (root / 'dataset.json').write_text(
    json.dumps({'channel_names': {'0': 'MR'}, 'labels': LABELS, 'plane': 'sagittal'})
  )
  for i, shape in enumerate(SHAPES):
    image = rng.gamma(2.0, 100.0, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    cols, rows = shape[:2]
    labels[cols // 3 : 2 * cols // 3, rows // 3 : 2 * rows // 3, :] = 1  # central block
    labels[cols // 2 :, rows // 2 : rows // 2 + 3, 1:3] = 2  # a band
    labels[:2, :2, :] = 3  # a corner
    nib.save(nib.Nifti1Image(image, AFFINE), root / 'imagesTr' / f'case_{i}_0000.nii.gz')
    nib.save(nib.Nifti1Image(labels, AFFINE), root / 'labelsTr' / f'case_{i}.nii.gz')
  return root, tmp_path_factory.mktemp('tfds')


def make_config(root, *, batch_size=4, **augment):
  config = configs.default_config()
  d = config.data
  d.dataset = 'nifti_folder'
  d.manual_dir = str(root)
  d.class_label_values = (1, 2, 3)
  d.split_fractions = (1.0, 0.0, 0.0)  # every shape in 'train'
  d.min_instance_pixels = 2
  d.context_slices = 1
  d.image_size = IMAGE_SIZE
  d.max_instances = 4
  d.normalize_percentiles = PERCENTILES
  d.shuffle_buffer = 16
  d.augment.update(augment)
  config.train.batch_size = batch_size
  config.eval.batch_size = batch_size
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def examples_of(batches):
  """Per-example dicts (device and batch axes flattened) of a list of batches."""
  out = []
  for batch in batches:
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    for i in range(len(flat['image'])):
      out.append({k: v[i] for k, v in flat.items()})
  return out


def numpy_tight_box(mask):
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float32)


def resize_weights(n_in, n_out):
  """[n_out, n_in] bilinear (triangle) weights, widened by 1 / scale when shrinking, pixel
  centres at i + 0.5, normalised over the pixels in the image."""
  scale = n_out / n_in
  support = max(1.0, 1.0 / scale)
  weights = np.zeros((n_out, n_in))
  for o in range(n_out):
    centre = (o + 0.5) / scale - 0.5
    for i in range(n_in):
      weights[o, i] = max(0.0, 1.0 - abs(i - centre) / support)
    weights[o] /= weights[o].sum()
  return weights


class Reference:
  """The prepared example of a slice computed in NumPy from readers + instances."""

  def __init__(self, root):
    folder = dataset_folders.NnunetFolder(root)
    self.volumes = {
      c.case_id: readers.load_volume(c, plane='sagittal', label_values=LABELS)
      for c in folder.cases()
    }

  def __call__(self, case_id, index):
    volume = self.volumes[case_id]
    stack = readers.slices(volume)
    n, height, width = stack.images.shape
    channels = [stack.images[min(max(index + k, 0), n - 1)] for k in (-1, 0, 1)]
    low, high = np.percentile(volume.image, PERCENTILES)
    image = (np.clip(np.stack(channels, -1), low, high) - low) / (high - low)
    factor = min(IMAGE_SIZE[0] / height, IMAGE_SIZE[1] / width)
    new_h, new_w = round(height * factor), round(width * factor)
    rows, cols = resize_weights(height, new_h), resize_weights(width, new_w)
    canvas = np.zeros(IMAGE_SIZE + (3,))
    canvas[:new_h, :new_w] = np.einsum('oh,hwc,pw->opc', rows, image, cols)
    found = instances.extract_instances(stack.labels[index], CLASS_MAP, min_pixels=2)
    masks = np.zeros((len(found),) + IMAGE_SIZE)
    for k, mask in enumerate(found.masks):
      masks[k, :new_h, :new_w] = rows @ mask.astype(np.float64) @ cols.T
    return {
      'image': canvas,
      'classes': found.classes,
      'soft_masks': masks,
      'extent': (new_h, new_w),
      'scale': (new_h / height, new_w / width),
    }


@pytest.fixture(scope='module')
def reference(dataset):
  return Reference(dataset[0])


@pytest.fixture(scope='module')
def eval_train_split(dataset):
  """Every 'train' slice prepared without augmentation, by (case_id, slice_index)."""
  root, data_dir = dataset
  pass_ = ip.create_eval_dataset(make_config(root), data_dir, 'train')
  return {
    (ex['case_id'].decode(), int(ex['slice_index'])): ex
    for ex in examples_of(list(pass_))
    if ex['example_valid']
  }


def test_tensorflow_sees_no_gpu():
  assert tf.config.get_visible_devices('GPU') == []


@pytest.mark.slow
def test_train_batches_have_the_promised_static_shapes_and_dtypes(dataset):
  root, data_dir = dataset
  batch = next(ip.create_train_dataset(make_config(root), data_dir, seed=0))
  d, b, m, (h, w) = 1, 4, 4, IMAGE_SIZE
  expected = {
    'image': ((d, b, h, w, 3), np.float32),
    'gt_boxes': ((d, b, m, 4), np.float32),
    'gt_classes': ((d, b, m), np.int32),
    'gt_masks': ((d, b, m, h, w), np.uint8),
    'gt_valid': ((d, b, m), np.bool_),
    'case_id': ((d, b), np.object_),
    'slice_index': ((d, b), np.int32),
    'scale': ((d, b, 2), np.float32),
    'image_extent': ((d, b, 2), np.int32),
    'pixel_spacing': ((d, b, 2), np.float32),
    'example_valid': ((d, b), np.bool_),
  }
  assert set(batch) == set(BATCH_KEYS) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert batch['example_valid'].all()
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0


@pytest.mark.slow
def test_boxes_are_the_tight_boxes_of_the_augmented_masks(dataset):
  root, data_dir = dataset
  config = make_config(
    root, flip_lr=True, flip_ud=True, rotate_degrees=40.0, scale_range=(0.7, 1.3)
  )
  examples = examples_of(take(ip.create_train_dataset(config, data_dir, seed=3), 4))
  checked = 0
  for ex in examples:
    valid = ex['gt_valid']
    count = int(valid.sum())
    assert valid[:count].all() and not valid[count:].any()  # valid instances first
    np.testing.assert_array_equal(valid, ex['gt_classes'] > 0)
    for k in range(len(valid)):
      if valid[k]:
        np.testing.assert_array_equal(ex['gt_boxes'][k], numpy_tight_box(ex['gt_masks'][k] > 0))
        checked += 1
      else:
        assert not ex['gt_masks'][k].any() and not ex['gt_boxes'][k].any()
  assert checked > 10


def test_without_augmentation_the_image_is_the_numpy_normalised_resized_slice(
  dataset, reference, eval_train_split
):
  root, data_dir = dataset
  unaugmented = examples_of(
    take(ip.create_train_dataset(make_config(root), data_dir, seed=0, augment=False), 2)
  )
  for ex in list(eval_train_split.values()) + unaugmented:
    ref = reference(ex['case_id'].decode(), int(ex['slice_index']))
    np.testing.assert_allclose(ex['image'], ref['image'], atol=2e-5)
    np.testing.assert_array_equal(ex['image_extent'], ref['extent'])
    np.testing.assert_allclose(ex['scale'], ref['scale'], rtol=1e-6)
    # Masks: the bilinear mask >= 0.5 (pixels within 1e-4 of the threshold are not judged);
    # instances that vanish at this size are dropped, the rest keep their order.
    survivors = [k for k in range(len(ref['classes'])) if (ref['soft_masks'][k] >= 0.5).any()]
    count = int(ex['gt_valid'].sum())
    np.testing.assert_array_equal(ex['gt_classes'][:count], ref['classes'][survivors])
    for slot, k in enumerate(survivors):
      soft = ref['soft_masks'][k]
      clear = np.abs(soft - 0.5) > 1e-4
      np.testing.assert_array_equal(ex['gt_masks'][slot][clear], (soft >= 0.5)[clear])
      np.testing.assert_array_equal(ex['gt_boxes'][slot], numpy_tight_box(ex['gt_masks'][slot]))


@pytest.mark.slow
def test_same_seed_gives_the_same_batches_and_resumes_exactly(dataset):
  root, data_dir = dataset
  config = make_config(root, rotate_degrees=20.0)
  first, again, other = (
    take(ip.create_train_dataset(config, data_dir, seed=s), n) for s, n in ((7, 6), (7, 3), (8, 3))
  )
  for a, b in zip(first, again):
    for key in BATCH_KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert any(not np.array_equal(a['image'], c['image']) for a, c in zip(first, other))
  # A run resumed at step 5 (past the end of the first epoch) continues the same stream:
  # shuffle order and augmentation.
  assert 5 * 4 > builders.prepare(config, data_dir).info.splits['train'].num_examples
  resumed = take(ip.create_train_dataset(config, data_dir, seed=7, start_step=5), 1)[0]
  for key in BATCH_KEYS:
    np.testing.assert_array_equal(resumed[key], first[5][key], err_msg=key)


def test_flips_mirror_image_masks_and_boxes_within_the_valid_extent(dataset, eval_train_split):
  root, data_dir = dataset
  config = make_config(
    root,
    flip_lr=True,
    flip_ud=True,
    rotate_degrees=0.0,
    scale_range=(1.0, 1.0),
    gamma_range=(1.0, 1.0),
    noise_std=0.0,
  )
  seen = set()
  for ex in examples_of(take(ip.create_train_dataset(config, data_dir, seed=1), 4)):
    plain = eval_train_split[(ex['case_id'].decode(), int(ex['slice_index']))]
    h, w = plain['image_extent']
    matches = []
    for flip_y in (False, True):
      for flip_x in (False, True):

        def mirror(a, axes_from=0):
          a = a.copy()
          region = a[..., :h, :w] if axes_from else a[:h, :w]
          if flip_y:
            region = np.flip(region, -2 if axes_from else 0)
          if flip_x:
            region = np.flip(region, -1 if axes_from else 1)
          if axes_from:
            a[..., :h, :w] = region
          else:
            a[:h, :w] = region
          return a

        if np.allclose(ex['image'], mirror(plain['image']), atol=1e-6) and np.array_equal(
          ex['gt_masks'], mirror(plain['gt_masks'], axes_from=1)
        ):
          matches.append((flip_y, flip_x))
          y1, x1, y2, x2 = plain['gt_boxes'].T
          boxes = np.stack(
            [
              h - y2 if flip_y else y1,
              w - x2 if flip_x else x1,
              h - y1 if flip_y else y2,
              w - x1 if flip_x else x2,
            ],
            -1,
          )
          valid = plain['gt_valid']
          np.testing.assert_array_equal(ex['gt_boxes'][valid], boxes[valid])
    assert matches, 'augmented example is no flip of the plain one'
    seen.update(matches)
  assert len(seen) >= 3  # the flips are random, not fixed


def test_zoom_pushes_corner_instances_out_and_they_are_dropped(dataset, eval_train_split):
  root, data_dir = dataset
  config = make_config(root, rotate_degrees=0.0, scale_range=(2.0, 2.0))
  assert any(3 in ex['gt_classes'][ex['gt_valid']] for ex in eval_train_split.values())
  for ex in examples_of(take(ip.create_train_dataset(config, data_dir, seed=2), 3)):
    classes = ex['gt_classes'][ex['gt_valid']]
    assert 3 not in classes  # the 2x2 corner block is outside the central half
    assert 1 in classes  # the central block stays
    assert not ex['gt_masks'][~ex['gt_valid']].any()


def test_eval_pass_holds_each_slice_once_and_pads_the_last_batch(dataset, eval_train_split):
  root, data_dir = dataset
  config = make_config(root, batch_size=3)
  pass_ = ip.create_eval_dataset(config, data_dir, 'train')
  batches = list(pass_)
  assert len(batches) == len(pass_) == -(-pass_.num_examples // 3)
  examples = examples_of(batches)
  real = [ex for ex in examples if ex['example_valid']]
  assert sorted((ex['case_id'].decode(), int(ex['slice_index'])) for ex in real) == sorted(
    eval_train_split
  )
  padding = [ex for ex in examples if not ex['example_valid']]
  assert len(padding) == 3 * len(batches) - len(real) and len(padding) < 3
  for ex in padding:
    assert not ex['image'].any() and not ex['gt_valid'].any() and not ex['gt_classes'].any()
  again = examples_of(list(pass_))  # deterministic and re-iterable
  for a, b in zip(examples, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  first_five = ip.create_eval_dataset(config, data_dir, 'train', max_examples=5)
  assert first_five.num_examples == 5 and len(first_five) == 2
  assert [ex['example_valid'] for ex in examples_of(list(first_five))] == [True] * 5 + [False]


def test_each_process_reads_its_own_share_and_the_same_number_of_batches(dataset, monkeypatch):
  root, data_dir = dataset
  config = make_config(root, batch_size=2)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  shares, lengths = [], []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    pass_ = ip.create_eval_dataset(config, data_dir, 'train')
    shares.append(
      {
        (ex['case_id'].decode(), int(ex['slice_index']))
        for ex in examples_of(list(pass_))
        if ex['example_valid']
      }
    )
    lengths.append(len(pass_))
  monkeypatch.undo()
  everything = ip.create_eval_dataset(config, data_dir, 'train')
  whole = {
    (ex['case_id'].decode(), int(ex['slice_index']))
    for ex in examples_of(list(everything))
    if ex['example_valid']
  }
  assert not shares[0] & shares[1] and shares[0] | shares[1] == whole
  assert lengths[0] == lengths[1]


def test_batches_are_split_over_local_devices(dataset, monkeypatch):
  root, data_dir = dataset
  assert ip.batch_layout(8, 2, 1) == ip.BatchLayout(local_devices=1, per_device=4)
  with pytest.raises(ValueError, match=r'train.batch_size=6 .* devices \(4\)'):
    ip.batch_layout(6, 4, 4)
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  monkeypatch.setattr(jax, 'local_device_count', lambda: 2)
  batch = next(ip.create_train_dataset(make_config(root), data_dir, seed=0))
  assert batch['image'].shape == (2, 2) + IMAGE_SIZE + (3,)
  assert batch['gt_masks'].shape == (2, 2, 4) + IMAGE_SIZE


def test_volume_inputs_equal_the_evaluation_pipeline(dataset, reference, eval_train_split):
  root, _ = dataset
  case_id, _ = next(iter(eval_train_split))
  volume = reference.volumes[case_id]
  inputs = ip.volume_inputs(volume, make_config(root))
  assert inputs['image'].shape == (len(readers.slices(volume)),) + IMAGE_SIZE + (3,)
  for (case, index), ex in eval_train_split.items():
    if case == case_id:
      np.testing.assert_array_equal(inputs['image'][index], ex['image'])
      np.testing.assert_array_equal(inputs['image_extent'][index], ex['image_extent'])


def test_bad_pipeline_settings_name_the_config_field(dataset):
  root, data_dir = dataset
  config = make_config(root)
  config.data.normalize_percentiles = (0.3, 99.5)
  with pytest.raises(ValueError, match='data.normalize_percentiles'):
    ip.create_eval_dataset(config, data_dir, 'train')
  with pytest.raises(ValueError, match="split 'validation' is not stored"):
    ip.create_eval_dataset(make_config(root), data_dir, 'validation')
  with pytest.raises(ValueError, match='data.augment.scale_range'):
    ip.create_train_dataset(make_config(root, scale_range=(1.2, 0.8)), data_dir, seed=0)


def test_warp_samples_like_the_tensorflow_projective_transform():
  """Masks (nearest) against ImageProjectiveTransformV3's NEAREST mode for a random rotation,
  scale and flip; the image uses that op's BILINEAR mode directly."""
  rng = np.random.default_rng(5)
  image = rng.random((13, 17, 2)).astype(np.float32)
  masks = (rng.random((13, 17, 3)) < 0.4).astype(np.uint8)
  transform = slice_transforms._inverse_warp(
    tf.constant([11, 15]),
    tf.constant(0.4),
    tf.constant(1.17),
    tf.constant(True),
    tf.constant(False),
  )
  warped_image, warped_masks = slice_transforms.warp(
    tf.constant(image), tf.constant(masks), transform
  )
  reference = tf.raw_ops.ImageProjectiveTransformV3(
    images=masks[None].astype(np.float32),
    transforms=transform[None],
    output_shape=[13, 17],
    fill_value=0.0,
    interpolation='NEAREST',
    fill_mode='CONSTANT',
  )[0]
  np.testing.assert_array_equal(warped_masks.numpy(), reference.numpy().astype(np.uint8))
  assert warped_image.shape == image.shape and warped_masks.numpy().any()


def test_two_training_processes_read_disjoint_shares_that_cover_the_split(
  dataset, monkeypatch, eval_train_split
):
  """create_train_dataset run as process 0 and as process 1 of 2 (one device each, global
  batch 4): each yields [1, 2, ...] batches, its first epoch holds each slice of its share
  once, the shares are disjoint and together the whole 'train' split."""
  root, data_dir = dataset
  config = make_config(root, batch_size=4)
  info = builders.prepare(config, data_dir).info
  whole = info.splits['train'].num_examples
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
  epochs = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    share = info.splits[tfds_share(index)].num_examples
    batches = take(ip.create_train_dataset(config, data_dir, seed=5, augment=False), -(-share // 2))
    assert all(b['image'].shape == (1, 2) + IMAGE_SIZE + (3,) for b in batches)
    first_epoch = [(ex['case_id'].decode(), int(ex['slice_index'])) for ex in examples_of(batches)][
      :share
    ]
    assert len(set(first_epoch)) == share, f'process {index} repeated a slice in one epoch'
    epochs.append(set(first_epoch))
  everything = set(eval_train_split)
  assert len(everything) == whole
  assert not epochs[0] & epochs[1] and epochs[0] | epochs[1] == everything
  assert abs(len(epochs[0]) - len(epochs[1])) <= 1


def tfds_share(index: int) -> str:
  import tensorflow_datasets as tfds

  return tfds.split_for_jax_process('train', process_index=index, process_count=2)


def test_the_process_index_enters_the_augmentation_seed(dataset, monkeypatch):
  """Both processes given the whole split (the same examples in the same shuffled order): with
  the same seed their augmentations differ (each process repeats its own: the determinism
  test above)."""
  root, data_dir = dataset
  config = make_config(root, batch_size=4, rotate_degrees=30.0, scale_range=(0.8, 1.2))
  monkeypatch.setattr(ip.tfds, 'split_for_jax_process', lambda split, **_: split)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
  streams = []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    streams.append(examples_of(take(ip.create_train_dataset(config, data_dir, seed=9), 2)))
  first, second = streams
  assert [ex['case_id'] for ex in first] == [ex['case_id'] for ex in second]
  assert [ex['slice_index'] for ex in first] == [ex['slice_index'] for ex in second]
  assert all(not np.array_equal(a['image'], b['image']) for a, b in zip(first, second))


def test_a_scale_true_eval_pass_pads_every_slice_to_one_bucketed_canvas(dataset):
  # Sagittal slices here have 0.7 mm rows and 0.8 mm columns; at 0.5 mm per pixel the four
  # slice shapes (22, 30), (40, 12), (9, 10), (20, 16) resample to (31, 48), (56, 19),
  # (13, 16), (28, 26): the largest side per axis, (56, 48), rounds up to a 64 x 64 canvas.
  root, data_dir = dataset
  config = make_config(root, batch_size=3)
  config.data.pixel_spacing_mm = 0.5
  config.data.inference_size_multiple = 32
  pass_ = ip.create_eval_dataset(config, data_dir, 'train')
  assert pass_.image_size == (64, 64)
  expected = {
    (rows, cols): (round(rows * 0.7 / 0.5), round(cols * 0.8 / 0.5))
    for rows, cols in [(shape[1], shape[0]) for shape in SHAPES]
  }
  seen = set()
  for ex in examples_of(list(pass_)):
    assert ex['image'].shape[:2] == (64, 64) and ex['gt_masks'].shape[1:] == (64, 64)
    if not ex['example_valid']:
      continue
    h, w = (int(n) for n in ex['image_extent'])
    source = tuple(int(round(n / s)) for n, s in zip((h, w), ex['scale']))
    assert expected[source] == (h, w)
    seen.add(source)
    assert not ex['image'][h:].any() and not ex['image'][:, w:].any()  # zero padding
    assert not ex['gt_masks'][:, h:].any() and not ex['gt_masks'][:, :, w:].any()
  assert seen == set(expected)
