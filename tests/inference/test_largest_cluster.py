"""postprocess.keep_largest_cluster (effusion pockets of one joint, one joint per side) against
a brute-force NumPy reference and analytic balls, and its config checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.tissues import LabelScheme
from imask_jax import configs
from imask_jax.inference import postprocess, whole_volume
from tests.conftest import box_painting_model, experiment_config, noise_scan

SPACING = (1.0, 1.5, 2.0)


def _ball(shape, centre_mm, radius_mm, spacing=SPACING):
  grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing='ij')
  return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


def _reference(volume, class_id, spacing, radius_mm, per_side, min_ml=0.0):
  """Brute force: distances between every pair of voxel centres of every two components,
  clusters grown by flooding the link graph, the one of most voxels kept."""
  out = volume.copy()
  x = np.arange(volume.shape[0])
  right = x > (volume.shape[0] - 1) / 2
  for side in (right, ~right) if per_side else (np.ones_like(right),):
    mask = (volume == class_id) & side[:, None, None]
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
      continue
    pts = [np.argwhere(comps == i) * np.asarray(spacing) for i in range(1, n + 1)]
    linked = [
      [np.sqrt(((p[:, None] - q[None]) ** 2).sum(-1)).min() <= radius_mm for q in pts] for p in pts
    ]
    label = [-1] * n
    for start in range(n):
      if label[start] < 0:
        todo = [start]
        while todo:
          i = todo.pop()
          if label[i] < 0:
            label[i] = start
            todo += [j for j in range(n) if linked[i][j] and label[j] < 0]
    volumes = {c: sum(len(pts[i]) for i in range(n) if label[i] == c) for c in set(label)}
    best = max(sorted(volumes), key=lambda c: volumes[c])  # ties: the earliest component
    kept = np.isin(comps, [i + 1 for i in range(n) if label[i] == best])
    if kept.sum() * np.prod(spacing) / 1000 < min_ml:
      kept[:] = False
    out[mask & ~kept] = 0
  return out


def test_balls_near_the_largest_stay_far_ones_go():
  shape = (60, 30, 16)
  vol = np.zeros(shape, np.int32)
  # X (mm = index here) runs to the patient's right; the mid-sagittal plane is at x = 29.5.
  vol[_ball(shape, (12, 20, 15), 6)] = 1  # the left joint's largest pocket
  vol[_ball(shape, (12, 20, 1), 3)] = 1  # a gap of about 5 mm to it: kept at 20 mm
  vol[_ball(shape, (26, 20, 15), 2)] = 1  # a gap of about 6 mm: kept
  vol[_ball(shape, (55, 20, 15), 4)] = 1  # the right side, 23+ mm of gap: dropped unless per side
  vol[_ball(shape, (12, 5, 28), 2.5)] = 2  # another class, untouched
  whole = postprocess.keep_largest_cluster(vol, [1], SPACING, 20.0, per_side=False)
  np.testing.assert_array_equal(whole, _reference(vol, 1, SPACING, 20.0, False))
  assert (whole == 1).sum() < (vol == 1).sum() and not (whole[40:] == 1).any()
  np.testing.assert_array_equal(whole == 2, vol == 2)
  sides = postprocess.keep_largest_cluster(vol, [1], SPACING, 20.0, per_side=True)
  np.testing.assert_array_equal(sides, _reference(vol, 1, SPACING, 20.0, True))
  assert (sides[40:] == 1).sum() == (vol[40:] == 1).sum()  # its own side's largest
  # Single linkage: a ball 24 mm from the largest but 14 mm from its 2 mm neighbour and 3 mm
  # from the right joint's ball links them all into one cluster.
  chained = vol.copy()
  chained[_ball(shape, (45, 20, 15), 3)] = 1
  linked = postprocess.keep_largest_cluster(chained, [1], SPACING, 20.0)
  np.testing.assert_array_equal(linked, _reference(chained, 1, SPACING, 20.0, False))
  np.testing.assert_array_equal(linked, chained)
  # The right joint's 4 mm ball holds about 0.27 mL: under a 0.5 mL minimum it goes.
  small = postprocess.keep_largest_cluster(vol, [1], SPACING, 20.0, per_side=True, min_ml=0.5)
  assert not (small[30:] == 1).any()
  np.testing.assert_array_equal(small[:30], sides[:30])
  # A radius of 0 is the largest component alone.
  alone = postprocess.keep_largest_cluster(vol, [1], SPACING, 0.0)
  comps, _ = ndimage.label(vol == 1, structure=np.ones((3, 3, 3)))
  np.testing.assert_array_equal(alone == 1, comps == np.argmax(np.bincount(comps.ravel())[1:]) + 1)


@pytest.mark.parametrize('seed', range(4))
def test_random_blobs_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  shape = (21, 14, 9)  # odd X: the central column belongs to the left side
  vol = (ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.55).astype(np.int32)
  spacing = tuple(rng.uniform(0.5, 2.5, 3))
  voxel_ml = np.prod(spacing) / 1000
  for radius in (0.0, 2.0, 5.0):
    for per_side in (False, True):
      for min_voxels in (0, 30):
        args = (spacing, radius, per_side, min_voxels * voxel_ml)
        got = postprocess.keep_largest_cluster(vol, [1], *args)
        np.testing.assert_array_equal(got, _reference(vol, 1, *args))


def test_config_checks_name_the_field():
  config = configs.default_config()
  scheme = LabelScheme.from_config(config)
  off = postprocess.ClusterRule((), 40.0, False, 0.0)
  assert postprocess.cluster_rule(scheme, config.model) == off
  config.model.keep_largest_cluster = ('meniscus',)
  with pytest.raises(ValueError, match='model.keep_largest_cluster'):
    configs.check_train_config(config)
  config.model.keep_largest_cluster = (config.data.class_names[0],)
  config.model.cluster_radius_mm = -1.0
  with pytest.raises(ValueError, match='model.cluster_radius_mm'):
    configs.check_train_config(config)
  config.model.cluster_radius_mm = 40.0
  config.model.cluster_min_ml = float('nan')
  with pytest.raises(ValueError, match='model.cluster_min_ml'):
    configs.check_train_config(config)


@pytest.mark.slow
def test_predict_volume_keeps_one_cluster_per_side(tmp_path):
  config = experiment_config('phantom_hip', 'smoke')
  mm = float(config.data.pixel_spacing_mm)
  scan = noise_scan(tmp_path, 'coronal', mm)  # 64 x 64 network pixels a slice
  config.model.cluster_radius_mm = 8 * mm  # in pixels: a gap of 4 is near, 18 far
  boxes = [
    [2, 2, 22, 22],  # the largest pocket (its side: image columns < 32)
    [26, 2, 30, 6],  # 4 pixels below it: the same joint
    [40, 2, 46, 8],  # 18 pixels below it: bright fluid elsewhere
    [2, 40, 8, 48],  # across the midline: the other joint
  ]
  area = [400, 16, 36, 48]  # all different: a wrong side split would change the count

  def painted(names, per_side):
    config.model.keep_largest_cluster = names
    config.model.cluster_per_side = per_side
    return whole_volume.predict_volume(box_painting_model(config, boxes), scan).label_map == 1

  everything = painted((), False)
  assert everything.sum() == 4 * sum(area)
  per_side = painted(('effusion',), True)
  assert per_side.sum() == 4 * (area[0] + area[1] + area[3])
  one = painted(('effusion',), False)
  assert one.sum() == 4 * (area[0] + area[1])
  assert not (per_side & ~everything).any() and not (one & ~per_side).any()
