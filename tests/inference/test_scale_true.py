"""Scale-true slices (config data.pixel_spacing_mm): resampling to the network's pixel size and
back onto the scan's grid, training crops, bucketed whole-slice inference (one compile per
bucket), and workdirs made before the option (resize to fit)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import tensorflow as tf

from data_pipelines import instances, readers
from data_pipelines.phantoms import generate_knee
from imask_jax import configs, input_pipeline, slice_transforms
from imask_jax import workdir as workdir_lib
from imask_jax.inference import loading, whole_volume
from imask_jax.models import mask_rcnn
from tests.conftest import experiment_config

KNEE_CLASS_MAP = {1: 1, 2: 2, 3: 3, 4: 4}


def _settings(target_mm, image_size=(64, 64), **kw):
  return slice_transforms.PrepareSettings(
    image_size=image_size,
    max_instances=8,
    percentile_indices=(0, len(slice_transforms.slice_examples.PERCENTILE_LEVELS) - 1),
    pixel_spacing_mm=target_mm,
    **kw,
  )


def _stored_example(image, classes, masks, pixel_spacing):
  """A slice example as the dataset builders store it (slice_examples.py)."""
  return {
    'image': tf.constant(image[..., None], tf.float32),
    'classes': tf.constant(classes, tf.int32),
    'masks': tf.constant(masks, tf.uint8),
    'case_id': tf.constant('case'),
    'slice_index': tf.constant(0, tf.int32),
    'pixel_spacing': tf.constant(pixel_spacing, tf.float32),
    'intensity_percentiles': tf.constant(
      np.linspace(0, 1000, len(slice_transforms.slice_examples.PERCENTILE_LEVELS)), tf.float32
    ),
  }


@pytest.fixture(scope='module')
def knee(tmp_path_factory):
  """A cpu knee phantom (0.8 mm in-plane, 128 x 128 sagittal slices) as sliced by the readers,
  with every fourth slice that holds all four tissues."""
  phantom = generate_knee(5)
  folder = tmp_path_factory.mktemp('knee')
  paths = {}
  for name, array in (('image', phantom.image), ('labels', phantom.labels)):
    paths[name] = str(folder / f'{name}.nii.gz')
    nib.save(nib.Nifti1Image(np.asarray(array), phantom.affine), paths[name])
  case = readers.Case('knee', paths['image'], {'default': paths['labels']})
  stack = readers.slices(readers.load_volume(case, plane='sagittal', label_values=None))
  assert stack.pixel_spacing == pytest.approx((0.8, 0.8))
  full = [i for i in range(len(stack)) if set(np.unique(stack.labels[i])) >= {1, 2, 3, 4}]
  return stack, full[::4]


def _round_trip(stack, index, target_mm):
  """Truth instances of slice `index` -> prepare_example at `target_mm` -> pasted back onto the
  slice by whole_volume.detections_to_source (each instance one detection whose box is the whole
  network canvas and whose mask is its network-resolution mask) -> class ids [h, w]."""
  found = instances.extract_instances(stack.labels[index], KNEE_CLASS_MAP)
  example = _stored_example(stack.images[index], found.classes, found.masks, stack.pixel_spacing)
  out = slice_transforms.prepare_example(example, _settings(target_mm))
  net_masks = np.asarray(out['gt_masks'])  # [h', w', M]
  side = max(net_masks.shape[:2])
  count = net_masks.shape[-1]
  canvas = np.zeros((count, side, side), np.float32)
  canvas[:, : net_masks.shape[0], : net_masks.shape[1]] = np.moveaxis(net_masks, -1, 0)
  classes = np.asarray(out['gt_classes'])
  det = {
    'boxes': np.tile(np.array([0, 0, side, side], np.float32), (1, count, 1)),
    'scores': (1.0 - 0.01 * np.arange(count, dtype=np.float32))[None],
    'classes': classes[None],
    'valid': (classes > 0)[None],
    'mask_probs': canvas[None],
  }
  label_map, _ = whole_volume.detections_to_source(
    det, np.asarray(out['scale'])[None], stack.images.shape[1:]
  )
  return label_map[0], np.asarray(out['image_extent'])


def _truth_classes(labels):
  out = np.zeros(labels.shape, np.int32)
  for value, class_id in KNEE_CLASS_MAP.items():
    out[labels == value] = class_id
  return out


@pytest.mark.parametrize('target_mm', [0.8, 0.4, 0.2])
@pytest.mark.slow
def test_round_trip_is_exact_where_the_target_spacing_divides_the_scans(knee, target_mm):
  # 0.8 mm slices at 0.8, 0.4 and 0.2 mm: every scan pixel becomes whole network pixels, and
  # pasting them back samples inside those blocks.
  stack, picks = knee
  for index in picks:
    pred, extent = _round_trip(stack, index, target_mm)
    np.testing.assert_array_equal(extent, np.array(stack.images.shape[1:]) * 0.8 / target_mm)
    np.testing.assert_array_equal(pred, _truth_classes(stack.labels[index]))


@pytest.mark.parametrize('target_mm', [1.6, 0.55, 1.1])
def test_round_trip_elsewhere_differs_only_within_one_network_pixel_of_a_boundary(knee, target_mm):
  stack, picks = knee
  reach = target_mm / 0.8  # one network pixel, in scan pixels
  for index in picks:
    pred, _ = _round_trip(stack, index, target_mm)
    truth = _truth_classes(stack.labels[index])
    for class_id in KNEE_CLASS_MAP.values():
      t, p = truth == class_id, pred == class_id
      # Distance (scan pixels) of each pixel to the other side of the truth's boundary.
      to_boundary = np.where(t, ndi.distance_transform_edt(t), ndi.distance_transform_edt(~t))
      wrong = t != p
      if class_id in (1, 3):  # bones come back whole (a 2-pixel cartilage band may not)
        assert wrong.sum() < 0.1 * t.sum(), (index, class_id)
      assert to_boundary[wrong].max(initial=0) <= reach + 0.5, (index, class_id, target_mm)


def test_spacing_extent_rounds_the_physical_size_to_whole_pixels():
  for size, spacing, target in [(384, 0.3646, 0.8), (128, 0.8, 0.8), (160, 2.2, 0.5), (7, 3.0, 50)]:
    got = slice_transforms.spacing_extent(size, size + 1, tf.constant([spacing, spacing]), target)
    expected = [max(1, round(n * spacing / target)) for n in (size, size + 1)]
    assert [int(g) for g in got] == expected


def test_buckets_round_each_side_up_to_the_multiple():
  assert slice_transforms.bucket_size((175, 64), 64) == (192, 64)
  assert slice_transforms.bucket_size((1, 129), 64) == (64, 192)
  assert slice_transforms.bucket_size((0, 32), 32) == (32, 32)


# --- training crops ------------------------------------------------------------------------------


def _coordinate_example(height, width, labelled=()):
  """A resampled slice whose pixel (r, c) holds r * 1000 + c + 1 and one instance with the
  given labelled pixels, as prepare_example leaves it for cropping."""
  rows, cols = np.mgrid[:height, :width]
  image = (rows * 1000 + cols + 1).astype(np.float32)[..., None]
  masks = np.zeros((height, width, 2), np.uint8)
  for r, c in labelled:
    masks[r, c, 0] = 1
  return {
    'image': tf.constant(image),
    'gt_masks': tf.constant(masks),
    'image_extent': tf.constant([height, width], tf.int32),
  }


def _window(cropped):
  """(top, left, rows, cols) of the source window a cropped coordinate image holds."""
  image = np.asarray(cropped['image'])[..., 0]
  valid = image > 0
  rows, cols = int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())
  first = int(image[0, 0]) - 1
  top, left = divmod(first, 1000)
  rr, cc = np.mgrid[:rows, :cols]
  np.testing.assert_array_equal(image[:rows, :cols], (rr + top) * 1000 + cc + left + 1)
  assert not valid[rows:].any() and not valid[:, cols:].any()  # zero padding only after
  return top, left, rows, cols


def test_crops_are_windows_of_the_slice_padded_where_it_is_smaller():
  settings = _settings(0.8, image_size=(32, 48), crop_foreground_rate=0.0)
  example = _coordinate_example(50, 40, labelled=[(10, 10)])
  lefts, tops = set(), set()
  for s in range(60):
    out = slice_transforms.crop_example(example, tf.constant([s, 7], tf.int32), settings)
    top, left, rows, cols = _window(out)
    assert (rows, cols) == (32, 40)  # 50 rows cropped to 32; 40 columns padded to 48
    np.testing.assert_array_equal(out['image_extent'], [32, 40])
    assert left == 0 and 0 <= top <= 50 - 32
    masks = np.asarray(out['gt_masks'])
    assert masks.shape == (32, 48, 2)
    assert masks[:, :, 0].sum() == (1 if top <= 10 < top + 32 else 0)
    tops.add(top)
    lefts.add(left)
  assert min(tops) <= 2 and max(tops) >= 16  # free crops reach both ends


@pytest.mark.slow
def test_foreground_crops_hold_a_labelled_pixel():
  settings = _settings(0.8, image_size=(16, 16), crop_foreground_rate=1.0)
  example = _coordinate_example(100, 90, labelled=[(80, 5), (3, 70)])
  for s in range(40):
    out = slice_transforms.crop_example(example, tf.constant([s, 1], tf.int32), settings)
    _window(out)
    assert np.asarray(out['gt_masks'])[..., 0].sum() >= 1, s
  # At rate 0.5 about half the crops are placed over a labelled pixel; a free 16 x 16 window
  # of this 100 x 90 slice holds one of the two pixels in about 5 % of draws.
  settings = _settings(0.8, image_size=(16, 16), crop_foreground_rate=0.5)
  held = [
    np.asarray(
      slice_transforms.crop_example(example, tf.constant([s, 2], tf.int32), settings)['gt_masks']
    )[..., 0].any()
    for s in range(200)
  ]
  assert 0.4 <= np.mean(held) <= 0.7


def test_a_slice_at_the_target_spacing_and_crop_size_trains_as_resize_to_fit():
  # The quick start: cpu phantom slices (128 x 128 at 0.8 mm), scale-true at 0.8 mm with
  # 128 x 128 crops, gives the network exactly what resize-to-fit gave it.
  rng = np.random.default_rng(0)
  masks = np.zeros((3, 128, 128), np.uint8)
  masks[0, 10:40, 20:90] = masks[1, 50:52, 5:120] = masks[2, 100:128, 0:30] = 1
  example = _stored_example(rng.gamma(2, 100, (128, 128)), [1, 2, 3], masks, [0.8, 0.8])
  fit = slice_transforms.prepare_example(example, _settings(None, image_size=(128, 128)))
  true_scale = slice_transforms.prepare_example(example, _settings(0.8, image_size=(128, 128)))
  cropped = slice_transforms.crop_example(
    true_scale, tf.constant([3, 4], tf.int32), _settings(0.8, image_size=(128, 128))
  )
  for key in ('image', 'gt_masks', 'gt_classes', 'image_extent', 'scale'):
    np.testing.assert_array_equal(np.asarray(cropped[key]), np.asarray(fit[key]), err_msg=key)


# --- whole-slice inference -----------------------------------------------------------------------


@pytest.fixture(scope='module')
def untrained_model():
  """The smoke experiment's tiny network, scale-true at 1.6 mm, freshly initialised."""
  config = experiment_config('phantom_knee', 'smoke')
  assert config.data.pixel_spacing_mm == pytest.approx(1.6)
  return loading.initialised_model(config)


def _scan(folder, rows, cols, spacing_mm, slices=3):
  """An unlabelled sagittal scan (NIfTI in canonical RAS+) with rows x cols slices of
  spacing_mm pixels, loaded as predict loads it."""
  # Canonical (x, y, z): a sagittal slice is [z (rows), y (cols)].
  image = np.random.default_rng(rows).gamma(2.0, 100.0, (slices, cols, rows)).astype(np.float32)
  path = os.path.join(folder, f'scan_{rows}_{cols}.nii.gz')
  nib.save(nib.Nifti1Image(image, np.diag([1.5, spacing_mm, spacing_mm, 1.0])), path)
  return loading.load_image(path, 'sagittal')


@pytest.mark.slow
def test_bucketed_inference_compiles_once_per_bucket(untrained_model, tmp_path):
  # Resampled to 1.6 mm: 60 and 62 pixels share the 64 bucket, 112 goes to 128.
  scans = [
    _scan(tmp_path, rows, cols, mm)
    for rows, cols, mm in [(60, 60, 1.6), (100, 99, 1.0), (90, 90, 2.0), (61, 58, 1.6)]
  ]
  for scan in scans:
    prediction = whole_volume.predict_volume(untrained_model, scan)
    stack = readers.slices(scan)
    assert prediction.class_slices.shape == stack.images.shape
    assert prediction.label_map.shape == scan.grid.shape  # back on the scan's grid
    np.testing.assert_allclose(prediction.network_spacing, 1.6, rtol=0.02)
    np.testing.assert_allclose(prediction.slice_spacing, stack.pixel_spacing)
  detector = untrained_model.detect
  assert detector.sizes == [(64, 64), (128, 128)]
  assert [detector.for_size(size)._cache_size() for size in detector.sizes] == [1, 1]


def test_a_larger_canvas_keeps_the_training_sampling_ratio():
  spec = mask_rcnn.ModelSpec(image_size=(128, 128), num_classes=2)
  big = spec.at_size((1024, 768))
  assert big.image_size == (1024, 768)
  assert big.resolved_imask == spec.resolved_imask
  assert spec.at_size((128, 128)) is spec


# --- workdirs made before the option -----------------------------------------------------------


def test_a_workdir_saved_before_scale_true_slices_still_resizes_to_fit_and_paints_as_before(
  tmp_path,
):
  config = experiment_config('phantom_knee', 'smoke')
  saved = json.loads(config.to_json())
  for key in ('pixel_spacing_mm', 'inference_size_multiple', 'crop_foreground_rate'):
    del saved['data'][key]
  del saved['model']['paint_rule']
  with open(os.path.join(tmp_path, 'config.json'), 'w') as f:
    json.dump(saved, f)
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.data.pixel_spacing_mm == 0.0
  # ... and paints as it did (new runs paint the union, detections.detections_to_label_map).
  assert (loaded.model.paint_rule, config.model.paint_rule) == ('each', 'union')
  assert not slice_transforms.prepare_settings(loaded).scale_true
  inputs = input_pipeline.volume_inputs(_scan(tmp_path, 90, 45, 1.0), loaded)
  # 90 x 45 slices fit 64 x 64 at 64 x 32, whatever their spacing; padded to image_size.
  assert inputs['image'].shape[1:3] == tuple(loaded.data.image_size) == (64, 64)
  np.testing.assert_array_equal(inputs['image_extent'][0], [64, 32])


def test_bad_scale_true_settings_name_the_config_field():
  config = configs.default_config()
  for field, value in [
    ('pixel_spacing_mm', -0.5),
    ('inference_size_multiple', 48),
    ('crop_foreground_rate', 1.5),
  ]:
    bad = configs.default_config()
    bad.data[field] = value
    with pytest.raises(ValueError, match=f'data.{field}'):
      slice_transforms.prepare_settings(bad)
  assert slice_transforms.prepare_settings(config).size_multiple == 64


def test_phantoms_at_another_grid_get_their_own_folder_and_dataset(tmp_path):
  from data_pipelines.datasets import params as params_lib
  from data_pipelines.datasets import sources
  from data_pipelines.phantoms import knee

  config = configs.default_config()
  preset = params_lib.params_from_config(config, tmp_path)
  config.data.phantom_spacing_mm = 0.5
  config.data.phantom_fov_mm = 140.0
  other = params_lib.params_from_config(config, tmp_path)
  assert (other.phantom_spacing_mm, other.phantom_fov_mm) == (0.5, 140.0)
  assert other.config_name != preset.config_name
  kind = f'knee_v{knee.GENERATOR_VERSION}'
  assert sources.phantom_dir(preset, tmp_path).endswith(f'{kind}_cpu_n24_seed0')
  assert sources.phantom_dir(other, tmp_path).endswith(f'{kind}_cpu_0.5mm_fov140_n24_seed0')
  config.data.phantom_fov_mm = -1.0
  with pytest.raises(ValueError, match='data.phantom_fov_mm'):
    params_lib.params_from_config(config, tmp_path)
