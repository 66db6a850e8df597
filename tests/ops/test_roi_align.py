"""ROIAlign against a plainly written NumPy reference, analytic ramps and numerical gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from imask_jax.ops import roi_align as ra


# ----------------------------------------------------------------------- NumPy reference
def reference_bilinear(fmap, y, x):
  """detectron2's bilinear_interpolate: zero beyond one pixel outside, else clamp."""
  height, width = fmap.shape[:2]
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return np.zeros(fmap.shape[2:])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(math.floor(y)), int(math.floor(x))
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (
    hy * hx * fmap[y_low, x_low]
    + hy * lx * fmap[y_low, x_high]
    + ly * hx * fmap[y_high, x_low]
    + ly * lx * fmap[y_high, x_high]
  )


def reference_roi_align(fmap, box, out_h, out_w, scale, sampling_ratio, cap=None):
  """One ROI, sample by sample. `cap` limits the adaptive ratio like max_sampling_ratio."""
  y1, x1, y2, x2 = (float(v) * scale for v in box)
  y1, x1, y2, x2 = y1 - 0.5, x1 - 0.5, y2 - 0.5, x2 - 0.5
  bin_h, bin_w = (y2 - y1) / out_h, (x2 - x1) / out_w
  if sampling_ratio > 0:
    grid_h = grid_w = sampling_ratio
  else:
    grid_h, grid_w = max(math.ceil((y2 - y1) / out_h), 0), max(math.ceil((x2 - x1) / out_w), 0)
    if cap is not None:
      grid_h, grid_w = min(grid_h, cap), min(grid_w, cap)
  count = max(grid_h * grid_w, 1)
  out = np.zeros((out_h, out_w) + fmap.shape[2:])
  for ph in range(out_h):
    for pw in range(out_w):
      acc = np.zeros(fmap.shape[2:])
      for iy in range(grid_h):
        y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
        for ix in range(grid_w):
          x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
          acc += reference_bilinear(fmap, y, x)
      out[ph, pw] = acc / count
  return out


def reference_level(box, k0, canonical, lo, hi):
  size = math.sqrt(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))
  return min(max(math.floor(k0 + math.log2(size / canonical + 1e-8)), lo), hi)


def random_boxes(rng, n, extent, outside=8.0):
  """Boxes of assorted sizes, some partly or wholly outside `[0, extent)`."""
  a = rng.uniform(-outside, extent + outside, (n, 2))
  b = a + rng.uniform(0.5, extent * 0.8, (n, 2)) * rng.choice([1.0, 0.1], (n, 2))
  return np.concatenate([a, b], 1)


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize('sampling_ratio', [0, 1, 2, 3])
def test_roi_align_matches_reference(sampling_ratio):
  rng = np.random.default_rng(sampling_ratio)
  fmap = rng.standard_normal((9, 11, 3)).astype(np.float32)
  stride = 4.0
  boxes = random_boxes(rng, 10, 40.0).astype(np.float32)
  # Edge cases: empty box, box covering more than the map, box entirely outside the map,
  # box hugging the far corner (samples clamp to the last pixel).
  boxes[:4] = [[12, 12, 12, 12], [-10, -10, 50, 55], [60, 60, 80, 90], [30, 38, 36, 44]]
  out = jax.jit(
    lambda f, r: ra.roi_align(
      f, r, (5, 4), spatial_scale=1 / stride, sampling_ratio=sampling_ratio, max_sampling_ratio=4
    )
  )(fmap, boxes)
  assert out.shape == (10, 5, 4, 3) and out.dtype == jnp.float32
  for i, box in enumerate(boxes):
    want = reference_roi_align(fmap, box, 5, 4, 1 / stride, sampling_ratio, cap=4)
    np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-5, err_msg=f'box {box}')


def test_forward_in_steps_when_the_gathered_values_are_large(monkeypatch):
  """Above `_MAX_UNCHUNKED_BYTES` of gathered values the forward runs in scan steps (the last
  one padded): the same values as the reference, the same gradient as the one-pass forward."""
  rng = np.random.default_rng(5)
  fmap = rng.standard_normal((9, 11, 3)).astype(np.float32)
  boxes = random_boxes(rng, 7, 40.0).astype(np.float32)
  weights = rng.standard_normal((7, 5, 4, 3)).astype(np.float32)

  def run():
    def loss(f):
      out = ra.roi_align(f, boxes, (5, 4), spatial_scale=0.25, sampling_ratio=2)
      return jnp.sum(out * weights), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(fmap)

  (_, whole), whole_grad = run()
  # 7 ROIs x 5 rows = 35 output rows of 4 x 16 taps x 3 channels x 4 bytes: 768 bytes each.
  monkeypatch.setattr(ra, '_MAX_UNCHUNKED_BYTES', 4 * 768)
  (_, stepped), stepped_grad = run()
  for i, box in enumerate(boxes):
    want = reference_roi_align(fmap, box, 5, 4, 0.25, 2)
    np.testing.assert_allclose(stepped[i], want, rtol=1e-5, atol=1e-5, err_msg=f'box {box}')
  np.testing.assert_allclose(stepped, whole, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stepped_grad, whole_grad, rtol=1e-6, atol=1e-6)


def test_adaptive_ratio_is_capped():
  rng = np.random.default_rng(7)
  fmap = rng.standard_normal((20, 20, 2)).astype(np.float32)
  boxes = np.array([[0, 0, 20, 20], [2, 1, 19, 6], [3, 3, 4, 4]], np.float32)  # grids 10, 9/3, 1
  out = jax.jit(
    lambda f, r: ra.roi_align(f, r, 2, spatial_scale=1.0, sampling_ratio=0, max_sampling_ratio=3)
  )(fmap, boxes)
  for i, box in enumerate(boxes):
    np.testing.assert_allclose(
      out[i], reference_roi_align(fmap, box, 2, 2, 1.0, 0, cap=3), rtol=1e-5, atol=1e-5
    )


def test_batch_index_reads_the_right_image():
  rng = np.random.default_rng(3)
  fmaps = rng.standard_normal((3, 8, 8, 2)).astype(np.float32)
  boxes = random_boxes(rng, 6, 32.0, outside=0.0).astype(np.float32)
  image = np.array([2, 0, 1, 1, 0, 2], np.int32)
  out = jax.jit(lambda f, r, i: ra.roi_align(f, r, 3, spatial_scale=0.25, batch_index=i))(
    fmaps, boxes, image
  )
  for i in range(6):
    np.testing.assert_allclose(
      out[i], reference_roi_align(fmaps[image[i]], boxes[i], 3, 3, 0.25, 2), rtol=1e-5, atol=1e-5
    )


def test_nan_boxes_give_zeros_and_batch_index_is_clamped():
  fmaps = np.ones((2, 6, 6, 2), np.float32)
  fmaps[1] *= 3.0
  boxes = np.array([[np.nan, 2, 10, 10], [2, 2, 10, np.inf], [2, 2, 10, 10]], np.float32)
  out = np.asarray(
    jax.jit(
      lambda f, r, i: ra.roi_align(f, r, 2, spatial_scale=0.5, sampling_ratio=0, batch_index=i)
    )(fmaps, boxes, np.array([0, 0, 7]))
  )
  assert np.all(out[0] == 0.0) and np.all(np.isfinite(out))
  np.testing.assert_allclose(out[2], 3.0)  # image 7 of 2 reads the last image


@settings(max_examples=15, deadline=None)
@given(
  y1=st.floats(0.0, 20.0),
  x1=st.floats(0.0, 20.0),
  h=st.floats(0.5, 16.0),
  w=st.floats(0.5, 16.0),
  a=st.floats(-2, 2),
  b=st.floats(-2, 2),
  ratio=st.integers(1, 3),
)
def test_linear_ramp_gives_ramp_at_bin_centres(y1, x1, h, w, a, b, ratio):
  # Map coordinates of pixel centres are (i, j); the ramp is exact under bilinear sampling and
  # the samples of a bin are symmetric about its centre, so each bin averages to its centre.
  size = 40
  ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  fmap = (a * ii + b * jj + 1.0)[..., None].astype(np.float32)
  # Input-pixel box (stride 1): map coords are box - 0.5, kept inside [0, size - 1].
  box = np.array([y1 + 0.5, x1 + 0.5, y1 + 0.5 + h, x1 + 0.5 + w], np.float32)
  out = _ramp_roi_align(fmap, box[None], ratio)[0, ..., 0]
  cy = y1 + (np.arange(3) + 0.5) * h / 3
  cx = x1 + (np.arange(4) + 0.5) * w / 4
  want = a * cy[:, None] + b * cx[None, :] + 1.0
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


_RAMP_FNS = {}


def _ramp_roi_align(fmap, boxes, ratio):
  # One compile per sampling ratio across hypothesis examples.
  if ratio not in _RAMP_FNS:
    _RAMP_FNS[ratio] = jax.jit(
      lambda f, r: ra.roi_align(f, r, (3, 4), spatial_scale=1.0, sampling_ratio=ratio)
    )
  return np.asarray(_RAMP_FNS[ratio](fmap, boxes))


# ----------------------------------------------------------------------------- multilevel
def test_assign_levels_matches_formula():
  rng = np.random.default_rng(0)
  sizes = np.concatenate(
    [np.exp(rng.uniform(np.log(1), np.log(2000), 200)), [0.0, 56.0, 112.0, 224.0, 448.0, 896.0]]
  )
  aspect = np.exp(rng.uniform(-1, 1, sizes.shape))
  aspect[-6:] = 1.0
  y1, x1 = rng.uniform(-50, 300, (2,) + sizes.shape)
  # Exact level boundaries (sqrt(area) = 224 * 2**k) at the origin, where float32 holds the
  # box exactly; elsewhere rounding of y2 - y1 makes a boundary box fall either way.
  y1[-6:] = x1[-6:] = 0.0
  boxes = np.stack([y1, x1, y1 + sizes * aspect, x1 + sizes / aspect], 1).astype(np.float32)
  got = np.asarray(ra.assign_levels(boxes))
  want = [reference_level(b.astype(np.float64), 4, 224.0, 2, 5) for b in boxes]
  np.testing.assert_array_equal(got, want)
  got = np.asarray(
    ra.assign_levels(boxes, min_level=3, max_level=6, canonical_level=5, canonical_size=64.0)
  )
  np.testing.assert_array_equal(
    got, [reference_level(b.astype(np.float64), 5, 64.0, 3, 6) for b in boxes]
  )
  assert got.dtype == np.int32


def _pyramid(rng, image=64, channels=2, levels=(2, 3, 4), batch=None):
  lead = () if batch is None else (batch,)
  return {
    f'P{k}': rng.standard_normal(lead + (image >> k, image >> k, channels)).astype(np.float32)
    for k in levels
  }


def test_multilevel_reads_each_roi_from_its_level():
  rng = np.random.default_rng(5)
  pyramid = _pyramid(rng)
  pyramid['P6'] = np.zeros((1, 1, 2), np.float32)  # extra levels are ignored
  boxes = random_boxes(rng, 24, 64.0, outside=4.0).astype(np.float32)
  boxes[:3] = [[2, 3, 60, 62], [10, 10, 40, 30], [5, 7, 9, 12]]  # P4, P3, P2 at canonical 24
  kwargs = dict(min_level=2, max_level=4, canonical_level=3, canonical_size=24.0)
  out = jax.jit(lambda p, r: ra.multilevel_roi_align(p, r, (3, 2), **kwargs))(pyramid, boxes)
  levels = [reference_level(b.astype(np.float64), 3, 24.0, 2, 4) for b in boxes]
  assert len(set(levels)) == 3, 'test boxes should cover every level'
  for i, (box, k) in enumerate(zip(boxes, levels)):
    want = reference_roi_align(pyramid[f'P{k}'], box, 3, 2, 2.0**-k, 2)
    np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-5)
  # One chosen level for every ROI (the iMaskRCNN 56x56 path reads P2).
  out = jax.jit(lambda p, r: ra.multilevel_roi_align(p, r, 4, level=2))(pyramid, boxes)
  for i, box in enumerate(boxes):
    np.testing.assert_allclose(
      out[i], reference_roi_align(pyramid['P2'], box, 4, 4, 0.25, 2), rtol=1e-5, atol=1e-5
    )


def test_jit_vmap_and_batch_index_agree():
  rng = np.random.default_rng(9)
  pyramid = _pyramid(rng, batch=3)
  boxes = np.stack([random_boxes(rng, 5, 64.0) for _ in range(3)]).astype(np.float32)
  kwargs = dict(min_level=2, max_level=4, canonical_level=3, canonical_size=24.0)
  fn = jax.jit(jax.vmap(lambda p, r: ra.multilevel_roi_align(p, r, 3, **kwargs)))
  out = np.asarray(fn(pyramid, boxes))
  flat = jax.jit(lambda p, r, i: ra.multilevel_roi_align(p, r, 3, batch_index=i, **kwargs))(
    pyramid, boxes.reshape(15, 4), np.repeat(np.arange(3), 5)
  )
  np.testing.assert_allclose(out.reshape(flat.shape), flat, rtol=1e-6, atol=1e-6)
  single = jax.jit(lambda p, r: ra.multilevel_roi_align(p, r, 3, **kwargs))
  for b in range(3):
    np.testing.assert_allclose(
      out[b], single({k: v[b] for k, v in pyramid.items()}, boxes[b]), rtol=1e-6, atol=1e-6
    )


# ------------------------------------------------------------------------------ gradients
@pytest.mark.slow
def test_gradients_match_finite_differences():
  rng = np.random.default_rng(11)
  with jax.enable_x64(True):
    pyramid = {k: jnp.asarray(v, jnp.float64) for k, v in _pyramid(rng, image=32).items()}
    boxes = jnp.asarray(random_boxes(rng, 6, 32.0, outside=3.0), jnp.float64)
    fmap = pyramid['P2']

    @jax.jit
    def single(f):
      return ra.roi_align(f, boxes, (2, 3), spatial_scale=0.25, sampling_ratio=0)

    @jax.jit
    def multi(p):
      return ra.multilevel_roi_align(
        p, boxes, 2, min_level=2, max_level=4, canonical_level=3, canonical_size=12.0
      )

    # Forward mode is not available (the op has a custom reverse-mode rule), see module doc.
    check_grads(single, (fmap,), order=1, modes=['rev'])
    check_grads(multi, (pyramid,), order=1, modes=['rev'])
    check_grads(jax.jit(jax.vmap(single)), (jnp.stack([fmap, 2 * fmap]),), order=1, modes=['rev'])
    # Boxes are constants: their gradient is zero.
    grad_boxes = jax.jit(jax.grad(lambda r: ra.roi_align(fmap, r, 2, spatial_scale=0.25).sum()))(
      boxes
    )
    assert np.all(np.asarray(grad_boxes) == 0)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_named():
  fmap = np.zeros((4, 4, 1), np.float32)
  with pytest.raises(ValueError, match=r'roi_align\.py.*rois must have shape \[N, 4\]'):
    ra.roi_align(fmap, np.zeros((3, 5)), 2, spatial_scale=1.0)
  with pytest.raises(ValueError, match=r'roi_align\.py.*output_size'):
    ra.roi_align(fmap, np.zeros((3, 4)), 0, spatial_scale=1.0)
  with pytest.raises(ValueError, match=r'roi_align\.py.*sampling_ratio'):
    ra.roi_align(fmap, np.zeros((3, 4)), 2, spatial_scale=1.0, sampling_ratio=-1)
  with pytest.raises(ValueError, match=r'roi_align\.py.*need batch_index'):
    ra.roi_align(fmap[None], np.zeros((3, 4)), 2, spatial_scale=1.0)
  with pytest.raises(ValueError, match=r"roi_align\.py.*no level 'P3'"):
    ra.multilevel_roi_align({'P2': fmap}, np.zeros((3, 4)), 2, max_level=3)
  with pytest.raises(ValueError, match=r'roi_align\.py.*level P3 has shape'):
    ra.multilevel_roi_align(
      {'P2': fmap, 'P3': np.zeros((2, 2, 5))}, np.zeros((3, 4)), 2, max_level=3
    )
