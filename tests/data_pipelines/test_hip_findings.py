"""The hip phantom's findings (bone-marrow oedema, synovial thickening) and its readers, who
draw a region around the effusion and threshold the image inside it (Otsu)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.phantoms import hip, hip_readers

SEED = 3  # a scan with effusion in both hips


@pytest.fixture(scope='module')
def plain():
  return hip.generate_hip(SEED, oedema=(False, False), synovitis=(False, False))


def _between_class_variance(values, t):
  low, high = values[values <= t], values[values > t]
  if not low.size or not high.size:
    return 0.0
  return low.size * high.size * (low.mean() - high.mean()) ** 2


def test_otsu_threshold_maximises_the_between_class_variance():
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.normal(120, 25, 3000), rng.normal(700, 60, 1000)])
  t = hip_readers.otsu_threshold(values)
  assert 120 + 2 * 25 < t < 700 - 2 * 60  # between the two classes
  # Brute force on the samples themselves, no histogram. The classes do not overlap, so the
  # variance is flat over the gap between them: Otsu's threshold is the middle of the gap.
  candidates = np.linspace(values.min(), values.max(), 4000)
  variance = np.array([_between_class_variance(values, c) for c in candidates])
  best = candidates[variance >= variance.max() * (1 - 1e-9)]
  bin_width = (values.max() - values.min()) / 256
  assert abs(t - (best.min() + best.max()) / 2) <= 1.5 * bin_width
  # Overlapping classes: a single maximiser, found within a bin.
  values = np.concatenate([rng.normal(300, 80, 3000), rng.normal(700, 80, 1000)])
  t = hip_readers.otsu_threshold(values)
  candidates = np.linspace(values.min(), values.max(), 4000)
  best = candidates[np.argmax([_between_class_variance(values, c) for c in candidates])]
  assert abs(t - best) <= 1.5 * (values.max() - values.min()) / 256


def test_oedema_brightens_marrow_and_is_never_effusion(plain):
  with_oedema = hip.generate_hip(SEED, oedema=(True, True), synovitis=(False, False))
  np.testing.assert_array_equal(with_oedema.labels, plain.labels)
  lesions = [a['oedema'] for a in with_oedema.truth['anatomy'].values()]
  assert all(len(x) == 1 for x in lesions)
  assert all(not a['oedema'] for a in plain.truth['anatomy'].values())
  diff = with_oedema.image - plain.image
  changed = np.abs(diff) > 2  # beyond quantisation of identical noise draws
  # One blob per hip, on its own side of the midline (array axis 1 runs right -> left).
  blobs, n = ndimage.label(ndimage.binary_dilation(changed, iterations=2))
  sizes = ndimage.sum(changed, blobs, range(1, n + 1))
  assert sum(s > 20 for s in sizes) == 2
  middle = plain.image.shape[1] / 2
  big = [i + 1 for i, s in enumerate(sizes) if s > 20]
  centres = [ndimage.center_of_mass(changed, blobs, i)[1] for i in big]
  assert min(centres) < middle < max(centres)
  # Bright: its core takes on a good part of fluid's signal (peak 0.55-0.8 of fluid's 950).
  assert diff.max() > 250
  # Oedema stays out of the effusion: the labelled voxels are not changed beyond blur.
  fluid = plain.labels == 1
  assert np.median(np.abs(diff[fluid])) <= 2


def test_synovium_takes_the_place_of_fluid(plain):
  thick = hip.generate_hip(SEED, oedema=(False, False), synovitis=(True, True))
  fluid, fluid_thick = plain.labels == 1, thick.labels == 1
  assert not (fluid_thick & ~fluid).any()  # never adds effusion
  lost = fluid & ~fluid_thick
  assert lost.sum() > 0.05 * fluid.sum()
  # Where fluid gave way the signal is lower than fluid's but above muscle's (intermediate).
  assert np.median(thick.image[lost]) < 0.8 * np.median(plain.image[fluid_thick])
  assert all(a['synovium_mm'] > 0 for a in thick.truth['anatomy'].values())


def _synthetic_scene():
  """A crisp volume: muscle-like background 300, a fluid block 900 (the truth), and a bone
  block beside it whose near part is oedema 800 and the rest marrow 250 (dark like the
  background, so that Otsu's two classes are fluid-like and not)."""
  image = np.full((60, 60, 4), 300.0, np.float32)
  truth = np.zeros(image.shape, np.uint8)
  truth[20:30, 20:30, 1:3] = 1
  image[truth == 1] = 900.0
  bone = np.zeros(image.shape, bool)
  bone[20:30, 30:45, :] = True
  image[bone] = 250.0
  image[20:30, 30:34, :] = 800.0  # oedema touching the fluid
  owner = np.where(truth == 1, 7, -1).astype(np.int16)
  return image, truth, owner, bone


def test_readers_threshold_inside_the_region_they_draw():
  image, truth, owner, bone = _synthetic_scene()
  spacing = (1.0, 1.0, 3.0)
  maps, info = hip_readers.reader_labels(
    image, truth, owner, {7: 'effusion_right_superior'}, bone, spacing, np.random.default_rng(0)
  )
  fluid = truth == 1
  for r in hip_readers.READERS:
    got = maps[r] == 1
    assert info[r]['missed_pocket'] is None  # the only pocket holds 0.6 mL, but see below
    lo, hi = hip_readers.READER_HABITS[r]['margin_mm']
    assert lo <= info[r]['margin_mm'] <= hi
    # Nothing on slices without fluid, nothing far from the fluid in-plane.
    assert not got[..., [0, 3]].any()
    for z in (1, 2):
      dist = ndimage.distance_transform_edt(~fluid[..., z])
      assert dist[got[..., z]].max() < hi + 5.0
    # All the fluid, and only what is brighter than the reader's threshold.
    assert got[fluid].all()
    assert (image[got] > info[r]['threshold']).all()
  # Reader1 leaves bone out: exactly the truth here. Reader2 takes in the bright oedema that
  # touches the fluid, never the plain marrow.
  np.testing.assert_array_equal(maps['reader1'], truth)
  r2 = maps['reader2'] == 1
  assert (r2 & bone & (image == 800.0)).sum() > 0
  assert not (r2 & (image == 250.0)).any()
  assert info['reader1']['excludes_bone'] and not info['reader2']['excludes_bone']


def test_a_reader_can_miss_a_small_pocket():
  image, truth, owner, bone = _synthetic_scene()
  # Draw until the 0.35 chance of a miss comes up: the pocket (0.6 mL) is then not labelled.
  for seed in range(40):
    maps, info = hip_readers.reader_labels(
      image, truth, owner, {7: 'pocket'}, bone, (1.0, 1.0, 3.0), np.random.default_rng(seed)
    )
    missed = [r for r in hip_readers.READERS if info[r]['missed_pocket'] == 'pocket']
    if missed:
      assert len(missed) == 1 and not maps[missed[0]].any()
      other = next(r for r in hip_readers.READERS if r not in missed)
      assert maps[other][truth == 1].all()
      return
  pytest.fail('no reader missed the pocket in 40 draws (expected 0.35 per draw)')
