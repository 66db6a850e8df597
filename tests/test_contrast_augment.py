"""Contrast randomisation (imask_jax/contrast_augment.py) against independent truth.

Each stage is switched on alone and its output checked against what the module doc promises,
computed here with NumPy: one affine map per tissue and example (a least-squares line through
a tissue's interior pixels fits exactly, its gain and mean in the drawn ranges), a curve of
intensity alone on the unlabelled rest with its knots at the NumPy quantiles, a bias field
that is exp of a cubic polynomial within its drawn range, a blur no wider than its range, a
resolution change along one axis only, Rician noise, gamma; then off is identity bit for bit
and the geometric augmentation's draws do not move when it is on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import ml_collections
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from imask_jax import configs, slice_transforms
from imask_jax import contrast_augment as ca
from imask_jax import input_pipeline as ip

H, W = 72, 80
EXTENT = (64, 72)  # the valid extent; the rest is padding
OFF = dict(
  tissues=False,
  bias_max=0.0,
  blur_sigma_max=0.0,
  downsample_max=1.0,
  noise_std_max=0.0,
  gamma_range=(1.0, 1.0),
)


def only(**on) -> ca.ContrastSettings:
  return ca.ContrastSettings(**{**OFF, **on})


def scene():
  """image [H, W, 1]: a ramp background (0 in the top 8 rows: air) with two discs of class 1
  (one instance each) and an ellipse of class 2, each with its own texture (std 0.03);
  masks [H, W, 4] (the last an empty padding slot), classes [4]."""
  rng = np.random.default_rng(3)
  ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
  image = 0.1 + 0.5 * xs / W
  image[:8] = 0.0
  disc_a = (ys - 22) ** 2 + (xs - 20) ** 2 < 9**2
  disc_b = (ys - 45) ** 2 + (xs - 22) ** 2 < 8**2
  ellipse = ((ys - 32) / 12) ** 2 + ((xs - 50) / 9) ** 2 < 1
  image[disc_a | disc_b] = 0.7
  image[ellipse] = 0.35
  image += 0.03 * rng.standard_normal((H, W)) * (ys >= 8)
  image = np.clip(image, 0.0, 1.0)
  image[EXTENT[0] :] = 0.0
  image[:, EXTENT[1] :] = 0.0
  masks = np.stack([disc_a, ellipse, disc_b, np.zeros_like(disc_a)], -1).astype(np.uint8)
  classes = np.array([1, 2, 1, 0], np.int32)
  return image[..., None].astype(np.float32), masks, classes


def run(settings, seed, image=None, masks=None, classes=None, extent=EXTENT):
  base = scene()
  image = base[0] if image is None else image
  masks = base[1] if masks is None else masks
  classes = base[2] if classes is None else classes
  out = ca.randomize_contrast(
    tf.constant(image),
    tf.constant(masks),
    tf.constant(classes),
    tf.constant(extent, tf.int32),
    tf.constant([seed, 11], tf.int32),
    settings,
  )
  return out.numpy()


def interior(region, others, depth=3):
  """Pixels of `region` `depth` px or more (chessboard) from its outside and from `others`:
  at depth 3 the soft weights' 2 px reach no longer touches them."""
  structure = np.ones((2 * depth - 1, 2 * depth - 1), bool)
  return ndimage.binary_erosion(region, structure) & ~ndimage.binary_dilation(others, structure)


def test_each_tissue_is_one_affine_map_per_example_within_the_drawn_ranges():
  """Tissue stage alone: on every class's interior pixels out = a + b x exactly (one line per
  class, shared by class 1's two instances), b in the texture range, a + b mean_k (the class's
  NumPy mean) in the mean range; the lines differ between seeds and repeat for a seed."""
  settings = only(tissues=True, tissue_mean_range=(0.2, 0.6), tissue_texture_range=(0.5, 1.5))
  image, masks, classes = scene()
  x = image[..., 0]
  union = {k: masks[..., classes == k].any(-1) for k in (1, 2)}
  lines = {}
  for seed in range(4):
    out = run(settings, seed)[..., 0]
    assert np.array_equal(out, run(settings, seed)[..., 0])
    for k in (1, 2):
      region = interior(union[k], union[3 - k] | (x == 0))
      parts = [region & masks[..., i].astype(bool) for i in np.flatnonzero(classes == k)]
      fits = []
      for part in parts:
        b, a = np.polyfit(x[part], out[part], 1)
        np.testing.assert_allclose(out[part], a + b * x[part], atol=2e-6)
        fits.append((a, b))
      for a, b in fits[1:]:  # one map per tissue, not per instance
        assert (a, b) == pytest.approx(fits[0], abs=1e-5)
      a, b = fits[0]
      assert 0.5 - 1e-5 <= b <= 1.5 + 1e-5
      assert 0.2 - 1e-5 <= a + b * x[union[k]].mean() <= 0.6 + 1e-5
      lines[seed, k] = (a, b)
  for k in (1, 2):
    gains = [lines[s, k][1] for s in range(4)]
    assert max(gains) - min(gains) > 0.1
  assert all(lines[s, 1] != pytest.approx(lines[s, 2], abs=1e-3) for s in range(4))


def test_the_unlabelled_rest_follows_one_curve_with_knots_at_its_quantiles_and_air_stays():
  """Tissue stage alone, away from the classes: out is a function of x only, the identity up
  to air_level, and linear between the knots the NumPy quantiles of the unlabelled pixels above
  air put at levels i / n (pixels within two histogram bins of a knot left out: the module
  reads its quantiles off QUANTILE_BINS bins); its values lie in [0, 1]; seeds draw different
  curves."""
  n, air = 4, 0.05
  settings = only(tissues=True, background_knots=n, air_level=air)
  image, masks, classes = scene()
  x = image[..., 0]
  inside = np.zeros((H, W), bool)
  inside[: EXTENT[0], : EXTENT[1]] = True
  labelled = masks.any(-1)
  unlabelled = inside & ~labelled
  above = np.sort(x[unlabelled & (x > air)])
  knots = above[np.round(np.arange(1, n + 1) / n * (above.size - 1)).astype(int)]
  far = unlabelled & ~ndimage.binary_dilation(labelled, np.ones((5, 5), bool))
  curves = []
  for seed in range(3):
    out = run(settings, seed)[..., 0]
    dark = far & (x <= air)
    np.testing.assert_allclose(out[dark], x[dark], atol=1e-6)
    edges = np.concatenate([[air], knots])
    band = 2 * (1 - air) / ca.QUANTILE_BINS
    for lo, hi in itertools.pairwise(edges):
      part = far & (x > lo + band) & (x < hi - band)
      if part.sum() < 3:
        continue
      b, a = np.polyfit(x[part], out[part], 1)
      np.testing.assert_allclose(out[part], a + b * x[part], atol=2e-5)
    assert out[far].min() >= 0.0 and out[far].max() <= 1.0
    curves.append(out[far])
  assert np.abs(curves[0] - curves[1]).max() > 0.05


def test_bias_field_is_exp_of_a_cubic_within_its_drawn_range():
  """Bias alone on a constant image: log(out / in) over the extent is a polynomial of degree
  <= 3 in (row, column) (least squares leaves no residual), its largest magnitude at most
  bias_max, different per seed; the padding stays 0."""
  settings = only(bias_max=0.5)
  image = np.zeros((H, W, 1), np.float32)
  image[: EXTENT[0], : EXTENT[1]] = 0.5
  none = np.zeros((H, W, 1), np.uint8)
  rows, cols = np.mgrid[0 : EXTENT[0], 0 : EXTENT[1]]
  u, v = (rows / (EXTENT[0] - 1)).ravel(), (cols / (EXTENT[1] - 1)).ravel()
  basis = np.stack([u**i * v**j for i in range(4) for j in range(4) if i + j <= 3], -1)
  peaks = []
  for seed in range(4):
    out = run(settings, seed, image, none, np.zeros(1, np.int32))
    log_field = np.log(out[: EXTENT[0], : EXTENT[1], 0] / 0.5).ravel()
    coef, *_ = np.linalg.lstsq(basis, log_field, rcond=None)
    assert np.abs(basis @ coef - log_field).max() < 1e-4
    peak = np.abs(log_field).max()
    assert peak <= 0.5 + 1e-5
    peaks.append(peak)
    assert not out[EXTENT[0] :].any() and not out[:, EXTENT[1] :].any()
  assert max(peaks) - min(peaks) > 0.05


def test_blur_is_a_gaussian_no_wider_than_its_range():
  """Blur alone on a point: the output keeps its sum (no rescale below 1), its second moments
  along rows and columns agree and give sigma <= blur_sigma_max, different per seed."""
  settings = only(blur_sigma_max=1.5)
  image = np.zeros((H, W, 1), np.float32)
  image[30, 30] = 0.9
  sigmas = []
  for seed in range(5):
    out = run(settings, seed, image, np.zeros((H, W, 1), np.uint8), np.zeros(1, np.int32))[..., 0]
    assert out.sum() == pytest.approx(0.9, rel=1e-4)
    ys, xs = np.mgrid[0:H, 0:W]
    sigma = np.sqrt((out * (ys - 30) ** 2).sum() / out.sum())
    assert sigma <= 1.5 + 1e-3
    np.testing.assert_allclose(np.sqrt((out * (xs - 30) ** 2).sum() / out.sum()), sigma, atol=1e-4)
    sigmas.append(sigma)
  assert max(sigmas) - min(sigmas) > 0.2


def test_resolution_changes_along_one_axis_only():
  """Resolution alone on stripes that vary along columns: either the axis drawn is the rows
  (the stripes come back unchanged) or the columns (they are smoothed, each column still
  constant down the rows); over a few seeds both happen."""
  settings = only(downsample_max=3.0)
  stripes = np.zeros((H, W, 1), np.float32)
  stripes[:, ::2] = 0.8
  none = np.zeros((H, W, 1), np.uint8)
  full = (H, W)
  seen = set()
  for seed in range(8):
    out = run(settings, seed, stripes, none, np.zeros(1, np.int32), extent=full)
    if np.allclose(out, stripes, atol=1e-5):
      seen.add('rows')
    else:
      np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), atol=1e-5)
      assert np.abs(out - stripes).max() > 0.1
      seen.add('columns')
  assert seen == {'rows', 'columns'}


def test_noise_is_rician_with_sigma_in_its_range():
  """Noise alone on a constant 0.5: the standard deviation is at most noise_std_max, the
  mean sqrt(0.5^2 + sigma^2) within sampling error, and seeds draw different sigmas."""
  settings = only(noise_std_max=0.05)
  image = np.full((H, W, 1), 0.5, np.float32)
  none = np.zeros((H, W, 1), np.uint8)
  stds = []
  for seed in range(5):
    out = run(settings, seed, image, none, np.zeros(1, np.int32), extent=(H, W))
    sigma = out.std()
    assert sigma <= 0.05 * 1.05
    assert out.mean() == pytest.approx(
      np.sqrt(0.25 + sigma**2), abs=3 * sigma / np.sqrt(out.size) + 1e-4
    )
    stds.append(sigma)
  assert max(stds) - min(stds) > 0.005


def test_gamma_is_one_power_per_example_within_its_range():
  settings = only(gamma_range=(0.7, 1.4))
  image, _, _ = scene()
  x = image[..., 0]
  positive = (x > 0.05) & (x < 0.95)
  gammas = []
  for seed in range(5):
    out = run(settings, seed)[..., 0]
    powers = np.log(out[positive]) / np.log(x[positive])
    np.testing.assert_allclose(powers, powers.mean(), atol=1e-4)
    assert 0.7 - 1e-5 <= powers.mean() <= 1.4 + 1e-5
    gammas.append(powers.mean())
  assert max(gammas) - min(gammas) > 0.1


def test_all_stages_keep_the_image_in_range_and_the_padding_dark():
  image, masks, classes = scene()
  outs = [run(ca.ContrastSettings(), seed) for seed in range(3)]
  for out in outs:
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not out[EXTENT[0] :].any() and not out[:, EXTENT[1] :].any()
  assert np.abs(outs[0] - outs[1]).mean() > 0.02


def test_rate_zero_is_the_identity_bit_for_bit_and_a_rate_picks_that_share():
  image, _, _ = scene()
  assert np.array_equal(run(ca.ContrastSettings(rate=0.0), 0), image)
  changed = [not np.array_equal(run(ca.ContrastSettings(rate=0.5), s), image) for s in range(24)]
  assert 6 <= sum(changed) <= 18


def example_for_augment():
  image, masks, classes = scene()
  return {
    'image': tf.constant(image),
    'gt_masks': tf.constant(masks),
    'gt_classes': tf.constant(classes),
    'image_extent': tf.constant(EXTENT, tf.int32),
  }


def test_in_augment_example_the_geometric_draws_stay_and_off_is_the_old_augmentation():
  """augment_example with contrast on: the masks (warp) are those of the same seed without
  it; contrast settings of None give exactly the augmentation without the field."""
  base = dict(
    flip_lr=True,
    flip_ud=False,
    rotate_degrees=10.0,
    scale_range=(0.9, 1.1),
    gamma_range=(0.8, 1.25),
    noise_std=0.03,
  )
  off = slice_transforms.AugmentSettings(**base)
  on = slice_transforms.AugmentSettings(**base, contrast=ca.ContrastSettings())
  example = example_for_augment()
  for seed in range(3):
    key = tf.constant([seed, 5], tf.int32)
    plain, randomised = (
      slice_transforms.augment_example(example, key, off),
      slice_transforms.augment_example(example, key, on),
    )
    np.testing.assert_array_equal(plain['gt_masks'].numpy(), randomised['gt_masks'].numpy())
    assert np.abs(plain['image'].numpy() - randomised['image'].numpy()).mean() > 0.01
    again = slice_transforms.augment_example(example, key, dataclasses.replace(on, contrast=None))
    np.testing.assert_array_equal(again['image'].numpy(), plain['image'].numpy())


def test_config_switch_is_off_by_default_and_names_bad_fields():
  config = configs.default_config()
  assert slice_transforms.augment_settings(config).contrast is None
  config.data.augment.contrast.enabled = True
  config.data.augment.contrast.bias_max = 0.2
  settings = slice_transforms.augment_settings(config).contrast
  assert settings == dataclasses.replace(ca.ContrastSettings(), bias_max=0.2)
  # A workdir made before the option has no contrast field: off.
  old = ml_collections.ConfigDict(config.data.augment.to_dict())
  del old['contrast']
  assert ca.contrast_settings(old.get('contrast')) is None
  config.data.augment.contrast.tissue_mean_range = (0.6, 0.2)
  with pytest.raises(ValueError, match='data.augment.contrast.tissue_mean_range'):
    slice_transforms.augment_settings(config)
  config.data.augment.contrast.tissue_mean_range = (0.0, 1.0)
  config.data.augment.contrast.downsample_max = 0.5
  with pytest.raises(ValueError, match='data.augment.contrast.downsample_max'):
    slice_transforms.augment_settings(config)


@pytest.mark.slow
def test_training_batches_with_contrast_on_keep_masks_boxes_and_range(tmp_path):
  """Through create_train_dataset (2.5D, three channels; resize to fit): with contrast on the
  batches have the masks, boxes and classes of the same seed without it, images in [0, 1]
  that differ from them, and 0 beyond each example's valid extent."""
  root = tmp_path / 'nn'
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  labels_json = {'background': 0, 'a': 1, 'b': 2}
  (root / 'dataset.json').write_text(
    json.dumps({'channel_names': {'0': 'MR'}, 'labels': labels_json, 'plane': 'sagittal'})
  )
  rng = np.random.default_rng(0)
  # Stored [column (to posterior), row (to inferior), slice (to left)], as a sagittal scan.
  affine = np.array([[0, 0, -1.5, 30], [-0.8, 0, 0, 50], [0, -0.7, 0, 20], [0, 0, 0, 1.0]])
  for i, shape in enumerate([(30, 22, 4), (26, 34, 4)]):
    image = rng.gamma(2.0, 100.0, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[5:15, 5:12] = 1
    image[5:15, 5:12] += 300
    labels[17:25, 8:20, 1:3] = 2
    nib.save(nib.Nifti1Image(image, affine), root / 'imagesTr' / f'case_{i}_0000.nii.gz')
    nib.save(nib.Nifti1Image(labels, affine), root / 'labelsTr' / f'case_{i}.nii.gz')

  def config(enabled):
    c = configs.default_config()
    d = c.data
    d.dataset, d.manual_dir, d.class_label_values = 'nifti_folder', str(root), (1, 2)
    d.split_fractions = (1.0, 0.0, 0.0)
    d.min_instance_pixels, d.context_slices, d.image_size = 2, 1, (32, 32)
    d.max_instances, d.shuffle_buffer = 4, 8
    d.augment.contrast.enabled = enabled
    c.train.batch_size = 4
    return c

  data_dir = tmp_path / 'tfds'
  off = ip.create_train_dataset(config(False), data_dir, seed=3)
  on = ip.create_train_dataset(config(True), data_dir, seed=3)
  for _ in range(3):
    a, b = next(off), next(on)
    for key in ('gt_masks', 'gt_boxes', 'gt_classes', 'gt_valid', 'image_extent'):
      np.testing.assert_array_equal(a[key], b[key])
    image = b['image'].reshape((-1,) + b['image'].shape[2:])
    extent = b['image_extent'].reshape(-1, 2)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert np.abs(image - a['image'].reshape(image.shape)).mean() > 0.01
    for img, (h, w) in zip(image, extent):
      assert not img[h:].any() and not img[:, w:].any()
