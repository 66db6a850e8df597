"""The iMask head's switches change what it computes, checked against analytic values.

The fusion conv `fuse1` sees concat([fine path x, skip features]). Its kernel is set to pass one
of the two through unchanged (centre tap = identity on those channels, zero elsewhere, bias 0),
and its output is read back with Flax's `capture_intermediates`:

* skip branch: every pyramid level P_k holds, per pixel, the input-image coordinates of the
  pixel's centre ((row + 0.5) 2^k, (col + 0.5) 2^k) plus a level tag 1000 k; with `skip_proj`
  the identity, ROIAlign of a linear map is exact, so bin (i, j) of a ROI (y1, x1, y2, x2) must
  read (y1 + (i + 0.5) h / S + 1000 k, x1 + (j + 0.5) w / S + 1000 k) for k = `skip_level`.
  A wrong level, stride or output size changes these numbers.
* fine path: with the decoder's transposed convs set to the identity on each of their 2x2 taps
  the path is nearest-neighbour upsampling of relu(reduce); with `decoder=False` it must be
  bilinear upsampling (half-pixel centres, edges clamped), written out in NumPy below.
* `skip=False`: the output does not depend on the pyramid at all; with the skip on it depends
  on the `skip_level` map inside the ROI and on no other level.

Tolerance: values up to ~5100 in float32 (ulp 4.9e-4) through one bilinear interpolation and
two exact identity convs: atol 5e-3. The fine path is compared to 1e-5 relative (values O(1),
at most four products summed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imask_jax.models import heads
from imask_jax.models.spec import adaptive_sampling_ratio

IMAGE = 64
FINE = 4  # fine_dim
LEVEL_CHANNELS = 2
ROIS = np.array(
  [
    [12.0, 16.0, 40.0, 44.0],  # y1, x1, y2, x2: inside every map's interior
    [20.0, 8.0, 52.0, 30.0],
  ],
  np.float32,
)


def coordinate_pyramid():
  """{P2..P6: [1, H_k, W_k, 2]}: (image row, image column) of each pixel centre + 1000 k."""
  pyramid = {}
  for k in range(2, 7):
    n = -(-IMAGE // 2**k)
    centre = (np.arange(n) + 0.5) * 2**k
    rows, cols = np.meshgrid(centre, centre, indexing='ij')
    pyramid[f'P{k}'] = np.stack([rows, cols], -1)[None].astype(np.float32) + 1000.0 * k
  return pyramid


def make_head(**switches):
  return heads.IMaskHead(num_classes=2, dim=8, fine_dim=FINE, **switches)


def init(head, pyramid):
  """Parameters of the head's shapes (from `eval_shape`: nothing compiles), drawn in NumPy:
  kernels N(0, 2 / fan_in) as He init, biases N(0, 0.1) so that ReLUs see both signs."""
  feats = np.random.default_rng(0).normal(size=(len(ROIS), 14, 14, 8)).astype(np.float32)
  index = np.zeros(len(ROIS), np.int32)
  shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), feats, pyramid, ROIS, index)
  rng = np.random.default_rng(1)

  def draw(leaf):
    if len(leaf.shape) == 1:
      return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), jnp.float32)

  return jax.tree.map(draw, shapes['params']), feats, index


def pass_through(params, channels):
  """fuse1 = identity on `channels` of its input (centre tap), zero elsewhere, bias 0."""
  kernel = np.zeros(params['fuse1']['kernel'].shape, np.float32)
  for out, channel in enumerate(channels):
    kernel[1, 1, channel, out] = 1.0
  params = dict(
    params, fuse1={'kernel': jnp.asarray(kernel), 'bias': jnp.zeros_like(params['fuse1']['bias'])}
  )
  if 'skip_proj' in params:
    proj = np.zeros(params['skip_proj']['kernel'].shape, np.float32)
    proj[0, 0, :LEVEL_CHANNELS, :LEVEL_CHANNELS] = np.eye(LEVEL_CHANNELS)
    params['skip_proj'] = {
      'kernel': jnp.asarray(proj),
      'bias': jnp.zeros_like(params['skip_proj']['bias']),
    }
  for name in ('decoder1', 'decoder2'):
    if name in params and params[name]['kernel'].ndim == 4:
      # Identity on every tap: a 2x2 stride-2 transposed conv copies each pixel to its block
      # (and the 3x3 'decoder1' of S = 28 becomes the identity through its centre tap only).
      kernel = np.zeros(params[name]['kernel'].shape, np.float32)
      kh, kw = kernel.shape[:2]
      taps = [(1, 1)] if kh == 3 else [(a, b) for a in range(kh) for b in range(kw)]
      for a, b in taps:
        kernel[a, b] = np.eye(FINE)
      params[name] = {'kernel': jnp.asarray(kernel), 'bias': jnp.zeros_like(params[name]['bias'])}
  return params


def fused_and_reduced(head, params, feats, pyramid, index):
  """(fuse1 output [N, S, S, F] before its ReLU, relu(reduce output) [N, 28, 28, F])."""
  out, state = head.apply(
    {'params': params},
    feats,
    pyramid,
    ROIS,
    index,
    capture_intermediates=True,
    mutable=['intermediates'],
  )
  inter = state['intermediates']
  assert out.shape == (len(ROIS), head.output_size, head.output_size, 2)
  return (
    np.asarray(inter['fuse1']['__call__'][0]),
    np.maximum(np.asarray(inter['reduce']['__call__'][0]), 0.0),
  )


@pytest.mark.parametrize('level,size', [('P2', 56), ('P3', 28), ('P4', 112)])
@pytest.mark.slow
def test_skip_reads_its_level_at_the_roi_with_its_size(level, size):
  pyramid = coordinate_pyramid()
  head = make_head(skip=True, skip_level=level, skip_size=size)
  params, feats, index = init(head, pyramid)
  params = pass_through(params, [FINE + c for c in range(FINE)])  # the skip channels
  fused, _ = fused_and_reduced(head, params, feats, pyramid, index)
  tag = 1000.0 * int(level[1])
  for n, (y1, x1, y2, x2) in enumerate(ROIS.astype(np.float64)):
    ys = y1 + (np.arange(size) + 0.5) * (y2 - y1) / size + tag
    xs = x1 + (np.arange(size) + 0.5) * (x2 - x1) / size + tag
    np.testing.assert_allclose(fused[n, :, :, 0], np.repeat(ys[:, None], size, 1), atol=5e-3)
    np.testing.assert_allclose(fused[n, :, :, 1], np.repeat(xs[None, :], size, 0), atol=5e-3)
    np.testing.assert_array_equal(fused[n, :, :, 2:], 0.0)  # skip_proj zero there


def nearest_up(x, factor):
  return np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)


def bilinear_up(x, factor):
  """[N, n, n, C] -> [N, f n, f n, C]: output pixel o samples input (o + 0.5) / f - 0.5,
  linearly between its two neighbours, clamped to the edge pixels."""
  n = x.shape[1]
  weights = np.zeros((factor * n, n))
  for o in range(factor * n):
    u = (o + 0.5) / factor - 0.5
    lo = int(np.floor(u))
    t = u - lo
    weights[o, min(max(lo, 0), n - 1)] += 1 - t
    weights[o, min(max(lo + 1, 0), n - 1)] += t
  return np.einsum('ah,nhwc,bw->nabc', weights, x.astype(np.float64), weights)


@pytest.mark.parametrize(
  'decoder,skip,size,expected',
  [
    (True, True, 56, 'nearest2'),  # the paper's head: one transposed conv
    (True, True, 112, 'nearest4'),  # two transposed convs
    (True, True, 28, 'identity'),  # a 3x3 conv instead
    (False, True, 56, 'bilinear2'),  # no decoder: fixed bilinear upsampling
    (False, False, 56, 'bilinear2'),
    (True, False, 56, 'nearest2'),  # without the skip the output is 56 whatever skip_size
  ],
)
@pytest.mark.slow
def test_fine_path_is_the_decoder_or_bilinear_upsampling(decoder, skip, size, expected):
  pyramid = coordinate_pyramid()
  head = make_head(decoder=decoder, skip=skip, skip_size=size)
  params, feats, index = init(head, pyramid)
  names = set(params)
  want_decoders = {
    'nearest2': {'decoder1'},
    'nearest4': {'decoder1', 'decoder2'},
    'identity': {'decoder1'},
    'bilinear2': set(),
  }[expected]
  assert {n for n in names if n.startswith('decoder')} == want_decoders
  assert ('skip_proj' in names) == skip
  # The fusion conv reads fine_dim channels, plus fine_dim skip channels with the skip.
  assert params['fuse1']['kernel'].shape[2] == FINE * (2 if skip else 1)
  params = pass_through(params, list(range(FINE)))  # the fine-path channels
  fused, reduced = fused_and_reduced(head, params, feats, pyramid, index)
  want = {
    'nearest2': lambda x: nearest_up(x, 2),
    'nearest4': lambda x: nearest_up(x, 4),
    'identity': lambda x: x,
    'bilinear2': lambda x: bilinear_up(x, 2),
  }[expected](reduced)
  assert reduced.any()
  np.testing.assert_allclose(fused, want, rtol=1e-5, atol=1e-6)


def test_output_depends_on_the_skip_level_inside_the_roi_only_with_the_skip():
  pyramid = coordinate_pyramid()

  def changed(head, params, feats, index, level, region):
    base = head.apply({'params': params}, feats, pyramid, ROIS, index)
    other = dict(pyramid)
    bumped = other[level].copy()
    bumped[0][region] += 50.0
    other[level] = bumped
    return not np.array_equal(
      np.asarray(head.apply({'params': params}, feats, other, ROIS, index)), np.asarray(base)
    )

  inside = np.s_[4:9, 5:10]  # P2 pixels under the first ROI (rows 3-10, cols 4-11)
  corner = np.s_[14:, 14:]  # P2 pixels under neither ROI
  for level in ('P2', 'P3'):
    head = make_head(skip=True, skip_level=level)
    params, feats, index = init(head, pyramid)
    p3_inside = np.s_[2:4, 2:4]
    assert changed(head, params, feats, index, level, inside if level == 'P2' else p3_inside)
    other_level = 'P3' if level == 'P2' else 'P2'
    assert not changed(
      head, params, feats, index, other_level, p3_inside if other_level == 'P3' else inside
    )
    assert not changed(head, params, feats, index, 'P2', corner)
  head = make_head(skip=False)
  params, feats, index = init(head, pyramid)
  for level in ('P2', 'P3', 'P4', 'P5', 'P6'):
    assert not changed(head, params, feats, index, level, np.s_[:, :])


def roi_align_reference(level_map, roi, stride, size, ratio):
  """NumPy ROIAlign (half-pixel aligned) of one ROI on one [h, w, C] map: bin (i, j) is the mean
  of ratio x ratio bilinear samples at ((i + (a + 0.5) / ratio) * bin height) from the box's top
  (and likewise across), in map pixels whose centres sit at integer + 0.5 in box units."""
  y1, x1, y2, x2 = np.asarray(roi, np.float64) / stride
  h, w = level_map.shape[:2]
  out = np.zeros((size, size, level_map.shape[-1]))
  for i in range(size):
    for j in range(size):
      acc = 0.0
      for a in range(ratio):
        for b in range(ratio):
          y = y1 + (i + (a + 0.5) / ratio) * (y2 - y1) / size - 0.5
          x = x1 + (j + (b + 0.5) / ratio) * (x2 - x1) / size - 0.5
          r0, c0 = int(np.floor(y)), int(np.floor(x))
          ty, tx = y - r0, x - c0
          pick = lambda r, c: level_map[min(max(r, 0), h - 1), min(max(c, 0), w - 1)]
          acc = acc + (
            (1 - ty) * (1 - tx) * pick(r0, c0)
            + (1 - ty) * tx * pick(r0, c0 + 1)
            + ty * (1 - tx) * pick(r0 + 1, c0)
            + ty * tx * pick(r0 + 1, c0 + 1)
          )
      out[i, j] = acc / ratio**2
  return out


@pytest.mark.parametrize('ratio', [1, 3])
@pytest.mark.slow
def test_skip_takes_its_sampling_ratio_samples_per_bin(ratio):
  """Bins wider than a map pixel (a 200-pixel box on a 64 x 64 P2 read at 28 x 28: 1.8 P2
  pixels per bin) on a map that is not linear: the skip features are the ROIAlign mean of
  `skip_sampling_ratio`^2 samples per bin, and another count gives other features."""
  pyramid = coordinate_pyramid()
  rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing='ij')
  # Positive (the skip features pass a ReLU) and varying from pixel to pixel.
  pyramid['P2'] = 2.0 + np.stack(
    [np.sin(2.1 * rows) * np.cos(1.7 * cols), np.cos(2.3 * rows + 0.9 * cols)], -1
  )[None].astype(np.float32)
  rois = np.array([[20.0, 30.0, 230.0, 220.0], [8.0, 4.0, 200.0, 250.0]], np.float32)
  size = 28
  head = make_head(skip=True, skip_level='P2', skip_size=size, skip_sampling_ratio=ratio)
  params, feats, index = init(head, pyramid)
  params = pass_through(params, [FINE + c for c in range(FINE)])
  _, state = head.apply(
    {'params': params},
    feats,
    pyramid,
    rois,
    index,
    capture_intermediates=True,
    mutable=['intermediates'],
  )
  fused = np.asarray(state['intermediates']['fuse1']['__call__'][0])
  for k, roi in enumerate(rois):
    want = roi_align_reference(pyramid['P2'][0], roi, 4, size, ratio)
    np.testing.assert_allclose(fused[k, :, :, :2], want, atol=1e-4)
  other = roi_align_reference(pyramid['P2'][0], rois[0], 4, size, 4 - ratio)
  assert np.abs(fused[0, :, :, :2] - other).max() > 1e-2  # the count is not ignored


def test_adaptive_sampling_ratio_follows_the_input_size():
  # ceil(max(H, W) / 2 / stride / S): a box half the input wide gets a sample per map pixel.
  assert adaptive_sampling_ratio((128, 128), 'P2', 56) == 1  # 0.29
  assert adaptive_sampling_ratio((512, 384), 'P2', 56) == 2  # 1.14
  assert adaptive_sampling_ratio((1024, 1024), 'P2', 56) == 3  # 2.29: the paper's input
  assert adaptive_sampling_ratio((1024, 1024), 'P3', 28) == 3  # 2.29
  assert adaptive_sampling_ratio((1024, 1024), 'P2', 112) == 2  # 1.14
  with pytest.raises(ValueError, match='skip_sampling_ratio=0'):
    pyramid = coordinate_pyramid()
    head = make_head(skip=True, skip_sampling_ratio=0)
    init(head, pyramid)
