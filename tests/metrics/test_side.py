"""The anatomical side estimate (imask_jax/metrics/side.py): drawn plates of known size, and knee
phantoms of both sides (data_pipelines/phantoms/knee.py draws a left knee as the mirror image of
the right one's model and records the side in its truth sidecar), their truth label maps read
in canonical RAS+ as predict reads a scan."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import orientation
from data_pipelines.phantoms import generate_knee
from imask_jax.metrics import side as side_lib

SPACING = (0.5, 0.5, 1.0)
SHAPE = (200, 160, 12)


def _plates(*plates, rotate_deg=0.0, shape=SHAPE):
  """A canonical label map with tibial cartilage (4) plates, each (centre R mm, half-width mm
  along R, half-length mm along A), 2 voxels thick, the whole rotated in the axial plane."""
  labels = np.zeros(shape, np.uint8)
  x, y = np.meshgrid(
    np.arange(shape[0]) * SPACING[0], np.arange(shape[1]) * SPACING[1], indexing='ij'
  )
  cx, cy = shape[0] * SPACING[0] / 2, shape[1] * SPACING[1] / 2
  angle = np.radians(rotate_deg)
  u = np.cos(angle) * (x - cx) + np.sin(angle) * (y - cy)
  v = -np.sin(angle) * (x - cx) + np.cos(angle) * (y - cy)
  for centre, half_width, half_length in plates:
    inside = ((u - centre) / half_width) ** 2 + (v / half_length) ** 2 <= 1
    labels[inside, 5:7] = 4
  return labels


# The medial plate longer and larger (19 vs 16 mm half-length), at smaller R: a right knee.
RIGHT_KNEE = ((-20.0, 12.0, 19.0), (20.0, 12.0, 16.0))


@pytest.mark.parametrize('rotate_deg', [0.0, 25.0, -25.0])
def test_drawn_plates_give_the_side_and_their_sizes(rotate_deg):
  estimate = side_lib.estimate_side(_plates(*RIGHT_KNEE, rotate_deg=rotate_deg), SPACING)
  assert estimate.side == 'right'
  assert estimate.length_mm[0] / estimate.length_mm[1] == pytest.approx(19 / 16, rel=0.03)
  assert estimate.area_mm2[0] / estimate.area_mm2[1] == pytest.approx(19 / 16, rel=0.03)
  assert estimate.area_mm2[0] == pytest.approx(np.pi * 12 * 19, rel=0.03)
  assert estimate.margin == pytest.approx(np.log(19 / 16), abs=0.03)
  assert 'a right knee' in estimate.basis and 'smaller R' in estimate.basis
  mirrored = side_lib.estimate_side(_plates(*RIGHT_KNEE, rotate_deg=rotate_deg)[::-1], SPACING)
  assert mirrored.side == 'left' and 'larger R' in mirrored.basis
  assert mirrored.margin == pytest.approx(estimate.margin, abs=0.01)


def test_a_hole_in_a_plate_counts_as_its_area():
  labels = _plates(*RIGHT_KNEE)
  x, y = np.meshgrid(np.arange(SHAPE[0]) * 0.5, np.arange(SHAPE[1]) * 0.5, indexing='ij')
  labels[((x - 30.0) ** 2 + (y - 40.0) ** 2 <= 36.0)] = 0  # denuded, 6 mm, in the medial plate
  estimate = side_lib.estimate_side(labels, SPACING)
  assert estimate.side == 'right'
  assert estimate.area_mm2[0] == pytest.approx(np.pi * 12 * 19, rel=0.03)


@pytest.mark.parametrize(
  'labels, reason',
  [
    (np.zeros(SHAPE, np.uint8), 'too little tibial cartilage'),
    (_plates((-20.0, 12.0, 19.0)), 'not two plates'),
    (_plates((-20.0, 12.0, 19.0), (20.0, 3.0, 4.0)), 'not two plates'),
    # Equal plates; the longer plate the smaller one: no side.
    (_plates((-20.0, 12.0, 17.0), (20.0, 12.0, 17.0)), 'not one plate both longer and larger'),
    (_plates((-20.0, 8.0, 19.0), (20.0, 13.0, 16.0)), 'not one plate both longer and larger'),
    # A plate cut by the field of view (the edge of the array across the knee).
    (_plates((-42.0, 12.0, 19.0), (20.0, 12.0, 16.0)), 'edge of the field of view'),
  ],
)
def test_no_side_and_why(labels, reason):
  estimate = side_lib.estimate_side(labels, SPACING)
  assert estimate.side is None and estimate.margin is None
  assert reason in estimate.basis and '\n' not in estimate.basis


def _canonical_truth(phantom):
  grid = orientation.SourceGrid.from_affine(phantom.labels.shape, phantom.affine)
  return grid.to_canonical(phantom.labels), grid.canonical_spacing


def test_left_and_right_phantoms_of_one_seed_and_their_mirror_images():
  for side in ('left', 'right'):
    phantom = generate_knee(3, 'cpu', side=side)
    assert phantom.truth['anatomy']['side'] == side
    labels, spacing = _canonical_truth(phantom)
    estimate = side_lib.estimate_side(labels, spacing)
    assert estimate.side == side, estimate.basis
    assert estimate.margin > side_lib.MIN_LOG_RATIO
    mirrored = side_lib.estimate_side(labels[::-1], spacing)
    assert mirrored.side == {'left': 'right', 'right': 'left'}[side]
    assert mirrored.margin == pytest.approx(estimate.margin, abs=0.02)
