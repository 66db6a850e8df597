"""Tests of the normalisation layers, ResNet/DenseNet bodies, FPN and `build_backbone`.

Shapes and parameter counts are checked with `jax.eval_shape` (nothing is allocated or
compiled); numerical checks run tiny widths on small images against NumPy references. The
compiled checks share one tiny ResNet-18 initialisation (compiling is what costs time here).
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imask_jax.models.backbones import BACKBONE_NAMES, BackboneFPN, build_backbone
from imask_jax.models.densenet import DenseNet
from imask_jax.models.fpn import FPN, pyramid_strides
from imask_jax.models.norm import (
  NORM_KINDS,
  FrozenBatchNorm,
  GroupNorm,
  freeze_batch_norm_variables,
  make_norm,
)
from imask_jax.models.resnet import HE_NORMAL_FAN_OUT, Bottleneck, ResNet

STRIDES = {'P2': 4, 'P3': 8, 'P4': 16, 'P5': 32, 'P6': 64}


# Compiling dominates these tests' time on CPU; XLA's cheapest settings halve it.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def key(seed: int) -> jax.Array:
  # The 'rbg' generator compiles much faster than threefry on CPU; statistics are the same.
  return jax.random.key(seed, impl='rbg')


def param_count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_init(model, shape, dtype=jnp.float32):
  return jax.eval_shape(model.init, key(0), jax.ShapeDtypeStruct(shape, dtype))


def abstract_init_with_output(model, shape, dtype=jnp.float32, train=True):
  """(outputs, variables) as shapes, in one trace."""
  return jax.eval_shape(
    lambda k, x: model.init_with_output(k, x, train=train),
    key(0),
    jax.ShapeDtypeStruct(shape, dtype),
  )


def leaf_paths(tree) -> dict[str, object]:
  return {
    '/'.join(path): leaf
    for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()
  }


def unflatten(paths: dict[str, object]):
  return flax.traverse_util.unflatten_dict({tuple(p.split('/')): v for p, v in paths.items()})


# ---------------------------------------------------------------------------------------------
# Parameter counts and level shapes of the published networks.

# torchvision's figures for the ImageNet models (3-channel input, 1000-class top, batch norm),
# counting parameters only (not the running statistics).
PUBLISHED_PARAMETER_COUNTS = {
  ('resnet', 18): 11_689_512,
  ('resnet', 34): 21_797_672,
  ('resnet', 50): 25_557_032,
  ('resnet', 101): 44_549_160,
  ('resnet', 152): 60_192_808,
  ('densenet', 121): 7_978_856,
  ('densenet', 169): 14_149_480,
}


# Channels of C2-C5 (the papers' tables: ResNet stage outputs; DenseNet block outputs).
PUBLISHED_LEVEL_CHANNELS = {
  ('resnet', 18): (64, 128, 256, 512),
  ('resnet', 34): (64, 128, 256, 512),
  ('resnet', 50): (256, 512, 1024, 2048),
  ('resnet', 101): (256, 512, 1024, 2048),
  ('resnet', 152): (256, 512, 1024, 2048),
  ('densenet', 121): (256, 512, 1024, 1024),
  ('densenet', 169): (256, 512, 1280, 1664),
}


@pytest.mark.parametrize('family,depth', sorted(PUBLISHED_PARAMETER_COUNTS))
def test_published_parameter_counts_level_channels_and_strides(family, depth):
  if family == 'resnet':
    model = ResNet(depth=depth, num_classes=1000, norm='batch')
  else:
    model = DenseNet(depth=depth, num_classes=1000, norm='batch')
  height, width = 96, 64
  levels, variables = abstract_init_with_output(model, (2, height, width, 3), train=False)
  assert param_count(variables['params']) == PUBLISHED_PARAMETER_COUNTS[(family, depth)]
  assert levels['logits'].shape == (2, 1000)
  expected_channels = PUBLISHED_LEVEL_CHANNELS[(family, depth)]
  for k, channels in enumerate(expected_channels):
    stride = 4 * 2**k
    assert levels[f'C{k + 2}'].shape == (2, height // stride, width // stride, channels)
  assert tuple(model.level_channels()[f'C{k}'] for k in range(2, 6)) == expected_channels


def test_bottleneck_puts_stride_on_the_3x3_conv():
  model = ResNet(depth=50, width=8)
  x = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
  variables = jax.eval_shape(model.init, key(0), x)
  _, state = jax.eval_shape(
    lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
    variables,
    x,
  )
  block = state['intermediates']['stage2_block0']
  # Stage 2 input is 16x16 (stride 4): the 1x1 reduce keeps it, the 3x3 halves it (v1.5).
  assert block['conv1']['__call__'][0].shape == (1, 16, 16, 16)
  assert block['conv2']['__call__'][0].shape == (1, 8, 8, 16)
  assert block['conv3']['__call__'][0].shape == (1, 8, 8, 64)
  assert block['downsample_conv']['__call__'][0].shape == (1, 8, 8, 64)


# ---------------------------------------------------------------------------------------------
# Pyramid shapes of every backbone and every norm.


@pytest.mark.parametrize('norm', NORM_KINDS)
@pytest.mark.parametrize('name', BACKBONE_NAMES)
@pytest.mark.slow
def test_pyramid_shapes_and_bfloat16_every_backbone_and_norm(name, norm):
  model = build_backbone(name, norm=norm, fpn_dim=16, width=8, dtype=jnp.bfloat16)
  # Not multiples of 32: every level is ceil(size / stride), the FPN crops after upsampling.
  batch, height, width, slices = 2, 70, 45, 3
  pyramid, variables = abstract_init_with_output(model, (batch, height, width, slices))
  assert list(pyramid) == ['P2', 'P3', 'P4', 'P5', 'P6']
  for level, stride in STRIDES.items():
    assert pyramid[level].shape == (
      batch,
      math.ceil(height / stride),
      math.ceil(width / stride),
      16,
    ), (level, stride)
    assert pyramid[level].dtype == jnp.bfloat16  # activations in the compute dtype
  # Parameters and statistics stay float32.
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  # Only batch norm keeps running statistics; frozen batch norm keeps its constants there.
  assert ('batch_stats' in variables) == (norm != 'group')


def test_pyramid_strides_and_module_attribute():
  assert pyramid_strides() == STRIDES
  assert dict(BackboneFPN.strides) == STRIDES
  assert dict(build_backbone('densenet169').strides) == STRIDES


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='resnet42'):
    build_backbone('resnet42')
  with pytest.raises(ValueError, match='instance'):
    build_backbone('resnet18', norm='instance')
  with pytest.raises(ValueError, match='instance'):
    make_norm('instance', train=True)
  model = build_backbone('resnet18', width=4)
  with pytest.raises(ValueError, match=r'NHWC.*\(64, 64\)'):
    abstract_init(model, (64, 64))
  with pytest.raises(ValueError, match='missing'):
    jax.eval_shape(
      FPN(features=4).init, key(0), {'C2': jnp.zeros((1, 8, 8, 2)), 'C3': jnp.zeros((1, 4, 4, 2))}
    )
  mismatched = {
    'C2': jnp.zeros((1, 8, 8, 2)),
    'C3': jnp.zeros((1, 3, 4, 2)),
    'C4': jnp.zeros((1, 2, 2, 2)),
    'C5': jnp.zeros((1, 1, 1, 2)),
  }
  with pytest.raises(ValueError, match=r'3x4 is not the ceil-half of the finer map 8x8'):
    jax.eval_shape(FPN(features=4).init, key(0), mismatched)
  with pytest.raises(ValueError, match='block_sizes'):
    abstract_init(DenseNet(block_sizes=(2, 2, 2)), (1, 32, 32, 1))


# ---------------------------------------------------------------------------------------------
# Normalisation layers against NumPy.


def test_group_norm_matches_numpy_and_adapts_group_count():
  rng = np.random.default_rng(0)
  for channels, groups in [(64, 32), (48, 16), (8, 8), (12, 4)]:
    x = rng.normal(3.0, 2.0, size=(2, 5, 6, channels)).astype(np.float32)
    layer = GroupNorm(num_groups=32)
    shapes = jax.tree.map(jnp.shape, layer.init(key(0), x))
    assert shapes == {'params': {'scale': (channels,), 'bias': (channels,)}}
    scale = rng.normal(size=channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    variables = {'params': {'scale': scale, 'bias': bias}}
    got = np.asarray(layer.apply(variables, x))
    want = np.empty_like(x)
    size = channels // groups
    for n in range(2):
      for g in range(groups):
        chunk = x[n, :, :, g * size : (g + 1) * size].astype(np.float64)
        want[n, :, :, g * size : (g + 1) * size] = (chunk - chunk.mean()) / np.sqrt(
          chunk.var() + 1e-5
        )
    want = want * scale + bias
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f'{channels=}')


def test_batch_norm_train_and_eval_match_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, size=(4, 3, 5, 6)).astype(np.float32)
  train_layer = make_norm('batch', train=True)()
  variables = train_layer.init(key(0), x)
  scale = rng.normal(size=6).astype(np.float32)
  bias = rng.normal(size=6).astype(np.float32)
  old_mean = rng.normal(size=6).astype(np.float32)
  old_var = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
  variables = {
    'params': {'scale': scale, 'bias': bias},
    'batch_stats': {'mean': old_mean, 'var': old_var},
  }
  y, updates = train_layer.apply(variables, x, mutable=['batch_stats'])
  x64 = x.astype(np.float64)
  mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
  np.testing.assert_allclose(
    np.asarray(y), (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias, rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
    updates['batch_stats']['mean'], 0.9 * old_mean + 0.1 * mean, rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    updates['batch_stats']['var'], 0.9 * old_var + 0.1 * var, rtol=1e-5, atol=1e-5
  )
  eval_layer = make_norm('batch', train=False)()
  y_eval = eval_layer.apply(variables, x)
  np.testing.assert_allclose(
    np.asarray(y_eval),
    (x64 - old_mean) / np.sqrt(old_var + 1e-5) * scale + bias,
    rtol=1e-4,
    atol=1e-4,
  )


def test_frozen_batch_norm_is_a_constant_affine():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
  layer = FrozenBatchNorm()
  variables = layer.init(key(0), x)
  assert 'params' not in variables
  stats = {
    'scale': rng.normal(size=5),
    'bias': rng.normal(size=5),
    'mean': rng.normal(size=5),
    'var': rng.uniform(0.5, 2.0, size=5),
  }
  stats = {k: v.astype(np.float32) for k, v in stats.items()}
  y = layer.apply({'batch_stats': stats}, x)
  want = (x - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * stats['scale'] + stats['bias']
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# FPN against a NumPy reference (odd sizes exercise the crop after upsampling).


def numpy_conv(x, kernel, bias):
  """'Same' (zero-padded, stride 1) conv of [N, H, W, Ci] with [k, k, Ci, Co], by loops."""
  k = kernel.shape[0]
  pad = k // 2
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros((n, h, w, kernel.shape[-1]))
  for i in range(h):
    for j in range(w):
      window = padded[:, i : i + k, j : j + k, :]
      out[:, i, j, :] = np.einsum('nabc,abcd->nd', window, kernel)
  return out + bias


def test_fpn_matches_numpy_reference():
  rng = np.random.default_rng(3)
  sizes = {'C2': (9, 7), 'C3': (5, 4), 'C4': (3, 2), 'C5': (2, 1)}
  channels = {'C2': 3, 'C3': 5, 'C4': 6, 'C5': 7}
  levels = {k: rng.normal(size=(2, *sizes[k], channels[k])).astype(np.float32) for k in sizes}
  fpn = FPN(features=4)
  variables = fast_jit(fpn.init)(key(0), levels)
  # Non-zero biases so that their handling is checked too.
  variables = jax.tree.map(
    lambda p: p + rng.normal(size=p.shape).astype(np.float32) * 0.1, variables
  )
  got = fast_jit(fpn.apply)(variables, levels)
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), variables['params'])

  want = {}
  top_down = None
  for level in '5432':
    lateral = numpy_conv(
      levels[f'C{level}'].astype(np.float64),
      params[f'lateral{level}']['kernel'],
      params[f'lateral{level}']['bias'],
    )
    if top_down is not None:
      h, w = lateral.shape[1:3]
      rows, cols = np.arange(h) // 2, np.arange(w) // 2  # nearest neighbour, factor 2
      lateral = lateral + top_down[:, rows][:, :, cols]
    top_down = lateral
    want[f'P{level}'] = numpy_conv(
      lateral, params[f'output{level}']['kernel'], params[f'output{level}']['bias']
    )
  want['P6'] = want['P5'][:, ::2, ::2]

  assert list(got) == ['P2', 'P3', 'P4', 'P5', 'P6']
  for level in want:
    assert got[level].shape == want[level].shape
    np.testing.assert_allclose(
      np.asarray(got[level]), want[level], rtol=1e-4, atol=1e-4, err_msg=level
    )
  assert got['P6'].shape == (2, 1, 1, 4)


def test_freeze_batch_norm_variables_moves_affine_into_batch_stats():
  params = {
    'conv': {'kernel': np.ones((1, 1, 2, 3))},
    'bn': {'scale': np.full(3, 2.0), 'bias': np.full(3, 0.5)},
  }
  stats = {'bn': {'mean': np.zeros(3), 'var': np.ones(3)}}
  frozen = freeze_batch_norm_variables({'params': params, 'batch_stats': stats})
  assert leaf_paths(frozen['params']).keys() == {'conv/kernel'}
  assert leaf_paths(frozen['batch_stats']).keys() == {'bn/scale', 'bn/bias', 'bn/mean', 'bn/var'}
  np.testing.assert_array_equal(frozen['batch_stats']['bn']['scale'], 2.0)
  with pytest.raises(ValueError, match='batch_stats'):
    freeze_batch_norm_variables({'params': params})


# ---------------------------------------------------------------------------------------------
# Compiled checks on tiny models.

TINY_IMAGES_SHAPE = (2, 32, 32, 1)


@functools.cache
def tiny_resnet18():
  """(model, variables, images) of a width-8 ResNet-18 + FPN, initialised once per session."""
  model = build_backbone('resnet18', width=8, fpn_dim=8)
  images = np.random.default_rng(1).normal(size=TINY_IMAGES_SHAPE).astype(np.float32)
  return model, fast_jit(model.init)(key(0), images), images


def random_pyramid_weights(model, images):
  """Random weights for a linear functional of the pyramid (a plain sum is BN-invariant)."""
  shapes, _ = abstract_init_with_output(model, images.shape)
  rng = np.random.default_rng(7)
  return {name: rng.normal(size=shapes[name].shape).astype(np.float32) for name in shapes}


@functools.cache
def compiled_gradient(model, argnums=(0, 1)):
  """jit(grad) of a linear functional of model(images) w.r.t. (params, batch_stats), or only
  the params with argnums=0 (what the training step differentiates); batch statistics are
  updated as in training.

  Cached per model so that tests on the same model share one compilation.
  """

  def loss(params, batch_stats, images, weights):
    variables = {'params': params}
    if batch_stats is not None:
      variables['batch_stats'] = batch_stats
    outputs, _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
    return sum(jnp.sum(outputs[k].astype(jnp.float32) * weights[k]) for k in weights)

  return fast_jit(jax.grad(loss, argnums=argnums))


def with_open_residual_branches(params):
  """The tiny ResNet-18's params with the zero-initialised last norm scales set to one, so
  that every parameter lies on a path that reaches the output."""
  return unflatten(
    {
      p: (np.ones_like(v) if p.endswith('norm2/scale') else v)
      for p, v in leaf_paths(params).items()
    }
  )


def zero_leaves(tree) -> list[str]:
  """Paths of the leaves whose gradient is zero (or not finite) everywhere."""
  return [
    p
    for p, g in leaf_paths(tree).items()
    if not (np.linalg.norm(np.asarray(g)) > 0 and np.all(np.isfinite(g)))
  ]


@pytest.mark.slow
def test_initialisation_he_fan_out_and_zero_init_residual():
  _, variables, _ = tiny_resnet18()
  params = leaf_paths(variables['params'])
  # Stage 4 3x3 conv: 3 * 3 * 64 * 64 weights with std sqrt(2 / (3 * 3 * 64)) (fan-out).
  kernel = np.asarray(params['body/stage4_block1/conv2/kernel'])
  assert kernel.shape == (3, 3, 64, 64)
  assert abs(kernel.std() / math.sqrt(2 / (9 * 64)) - 1) < 0.03
  assert abs(kernel.mean()) < 0.03 * kernel.std()
  zero_scales = [p for p in params if p.endswith('norm2/scale')]
  assert len(zero_scales) == 8  # last norm of the 2 + 2 + 2 + 2 basic blocks
  for path, leaf in params.items():
    if path in zero_scales:
      assert not np.any(np.asarray(leaf)), path
    elif path.endswith('scale'):
      np.testing.assert_array_equal(leaf, 1.0, err_msg=path)
    elif path.endswith('bias'):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=path)
    elif path.startswith('fpn/'):
      fan_in = int(np.prod(leaf.shape[:-1]))
      assert np.abs(np.asarray(leaf)).max() <= math.sqrt(3 / fan_in), path
  # The initializer itself, on a big conv, is a plain (untruncated) fan-out normal.
  big = np.asarray(HE_NORMAL_FAN_OUT(key(1), (3, 3, 64, 256), jnp.float32))
  assert abs(big.std() / math.sqrt(2 / (9 * 256)) - 1) < 0.01
  assert np.abs(big).max() > 3 * big.std()


@pytest.mark.slow
def test_gradients_reach_every_resnet_parameter():
  model, variables, images = tiny_resnet18()
  params = with_open_residual_branches(variables['params'])
  grads, _ = compiled_gradient(model)(
    params, variables['batch_stats'], images, random_pyramid_weights(model, images)
  )
  assert leaf_paths(grads).keys() == leaf_paths(params).keys()
  assert not zero_leaves(grads)


@pytest.mark.slow
def test_zero_init_residual_blocks_start_as_identity_and_learn_to_open():
  model, variables, images = tiny_resnet18()
  grads, _ = compiled_gradient(model)(
    variables['params'], variables['batch_stats'], images, random_pyramid_weights(model, images)
  )
  grads = leaf_paths(grads)
  for block in ('stage1_block0', 'stage2_block1', 'stage4_block0'):
    # The zeroed scale gets a gradient; the branch behind it gets none until it opens.
    assert np.any(np.asarray(grads[f'body/{block}/norm2/scale'])), block
    assert not np.any(np.asarray(grads[f'body/{block}/conv1/kernel'])), block
  # Projection shortcuts are outside the branch and learn from the start.
  assert np.any(np.asarray(grads['body/stage2_block0/downsample_conv/kernel']))


@pytest.mark.slow
def test_gradients_reach_every_densenet_parameter_with_group_norm():
  # A tiny DenseNet (blocks of 2, 1, 1, 1 layers) has every kind of layer of the full ones.
  # 64x64 input so that C5 is 2x2: group norm over one channel of one pixel is constant.
  model = BackboneFPN(
    body=DenseNet(block_sizes=(2, 1, 1, 1), growth_rate=4, num_init_features=8, norm='group'),
    fpn=FPN(features=8),
  )
  images = np.random.default_rng(1).normal(size=(2, 64, 64, 2)).astype(np.float32)
  variables = fast_jit(model.init)(key(0), images)
  grads, _ = compiled_gradient(model)(
    variables['params'], None, images, random_pyramid_weights(model, images)
  )
  assert leaf_paths(grads).keys() == leaf_paths(variables['params']).keys()
  assert not zero_leaves(grads)


@pytest.mark.slow
def test_bottleneck_block_gradients_and_zero_init():
  norm = make_norm('group', train=True)
  block = Bottleneck(planes=8, stride=2, norm=norm, zero_init_residual=True)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 8, 16)).astype(np.float32)
  variables = fast_jit(block.init)(key(0), x)
  assert not np.any(np.asarray(variables['params']['norm3']['scale']))
  open_norm3 = {'scale': np.ones(32, np.float32), 'bias': np.zeros(32, np.float32)}
  params = dict(variables['params'], norm3=open_norm3)
  weights = rng.normal(size=(2, 4, 4, 32)).astype(np.float32)
  grads = fast_jit(jax.grad(lambda p: jnp.sum(block.apply({'params': p}, x) * weights)))(params)
  assert leaf_paths(grads).keys() == leaf_paths(params).keys()
  assert not zero_leaves(grads)


@pytest.mark.slow
def test_frozen_batch_norm_gets_no_gradient_never_changes_and_equals_eval_batch_norm():
  batch_model, variables, images = tiny_resnet18()
  # Non-trivial statistics and affine, as if trained or loaded from a checkpoint.
  rng = np.random.default_rng(2)
  stats = jax.tree.map(
    lambda s: s + rng.uniform(size=s.shape).astype(np.float32), variables['batch_stats']
  )
  params = unflatten(
    {
      p: (
        v + 0.5 * rng.uniform(size=v.shape).astype(np.float32)
        if p.endswith(('scale', 'bias'))
        else v
      )
      for p, v in leaf_paths(variables['params']).items()
    }
  )
  batch_variables = {'params': params, 'batch_stats': stats}
  frozen_variables = freeze_batch_norm_variables(batch_variables)
  frozen_model = build_backbone('resnet18', norm='frozen_batch', width=8, fpn_dim=8)
  expected_tree = abstract_init(frozen_model, TINY_IMAGES_SHAPE)
  assert jax.tree.structure(expected_tree) == jax.tree.structure(frozen_variables)

  weights = random_pyramid_weights(frozen_model, images)

  @fast_jit
  def check(batch_v, frozen_v, x):
    def loss(params, stats):
      outputs = frozen_model.apply({'params': params, 'batch_stats': stats}, x, train=True)
      return sum(jnp.sum(outputs[k] * weights[k]) for k in weights)

    grads = jax.grad(loss, argnums=(0, 1))(frozen_v['params'], frozen_v['batch_stats'])
    eval_out = batch_model.apply(batch_v, x, train=False)
    frozen_train, updates = frozen_model.apply(frozen_v, x, train=True, mutable=['batch_stats'])
    return grads, eval_out, frozen_train, updates

  grads, eval_out, frozen_train, updates = check(batch_variables, frozen_variables, images)
  for path, g in leaf_paths(grads[1]).items():
    assert not np.any(np.asarray(g)), path
  assert not zero_leaves(grads[0])
  jax.tree.map(
    np.testing.assert_array_equal, updates['batch_stats'], frozen_variables['batch_stats']
  )
  for level in eval_out:
    np.testing.assert_allclose(
      frozen_train[level], eval_out[level], rtol=1e-4, atol=1e-4, err_msg=level
    )


# ---------------------------------------------------------------------------------------------
# Mixed precision and data parallelism.


@pytest.mark.slow
def test_bfloat16_forward_is_close_to_float32():
  model32, variables, images = tiny_resnet18()
  model16 = build_backbone('resnet18', width=8, fpn_dim=8, dtype=jnp.bfloat16)
  params = with_open_residual_branches(variables['params'])
  variables = {'params': params, 'batch_stats': variables['batch_stats']}

  # Updated running statistics stay float32 (checked on shapes only).
  _, stats16 = jax.eval_shape(
    lambda v, x: model16.apply(v, x, train=True, mutable=['batch_stats']), variables, images
  )
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(stats16))

  out32, out16 = fast_jit(lambda v, x: (model32.apply(v, x), model16.apply(v, x)))(
    variables, images
  )
  for level in out32:
    assert out16[level].dtype == jnp.bfloat16
    a, b = np.asarray(out32[level]), np.asarray(out16[level], np.float32)
    # bfloat16 keeps 8 significant bits: about 0.4 % per rounding, a few % after 20 layers.
    # (Evaluation mode: batch norm over the few values of a 1x1 map would amplify rounding.)
    assert np.linalg.norm(a - b) <= 0.03 * np.linalg.norm(a), level


@pytest.mark.slow
def test_batch_statistics_are_averaged_over_the_named_axis():
  """Two shards under a named axis normalise exactly like the whole batch on one device."""
  single, variables, _ = tiny_resnet18()
  sharded = build_backbone('resnet18', width=8, fpn_dim=8, axis_name='data')
  images = np.random.default_rng(4).normal(1.0, 2.0, size=(4, 32, 32, 1)).astype(np.float32)
  params = with_open_residual_branches(variables['params'])
  variables = {'params': params, 'batch_stats': variables['batch_stats']}

  @fast_jit
  def run(v, x):
    whole = single.apply(v, x, train=True, mutable=['batch_stats'])
    per_shard = jax.vmap(
      lambda shard: sharded.apply(v, shard, train=True, mutable=['batch_stats']), axis_name='data'
    )(x.reshape(2, 2, *x.shape[1:]))
    return whole, per_shard

  (out, updates), (shard_out, shard_updates) = run(variables, images)
  for level in out:
    np.testing.assert_allclose(
      np.asarray(shard_out[level]).reshape(out[level].shape),
      out[level],
      rtol=1e-4,
      atol=1e-4,
      err_msg=level,
    )
  whole_stats = leaf_paths(updates)
  for path, stat in leaf_paths(shard_updates).items():
    for shard in range(2):  # every device ends with the same, global, statistics
      np.testing.assert_allclose(stat[shard], whole_stats[path], rtol=1e-4, atol=1e-5, err_msg=path)


# ---------------------------------------------------------------------------------------------
# Rematerialisation.


def assert_gradients_close(actual, expected):
  """Leaf by leaf, to float32 rounding relative to the leaf's largest entry."""
  actual = leaf_paths(actual)
  assert actual.keys() == leaf_paths(expected).keys()
  for path, g in leaf_paths(expected).items():
    scale = float(np.abs(np.asarray(g)).max())
    assert scale > 0, path
    np.testing.assert_allclose(actual[path], g, rtol=0, atol=1e-5 * scale, err_msg=path)


@pytest.mark.slow
def test_remat_resnet_keeps_values_gradients_statistics_and_parameter_tree():
  """remat=True recomputes activations in the backward pass: the same function, the same
  parameters, the same batch-statistics updates and gradients as the plain body."""
  plain, variables, images = tiny_resnet18()
  remat = build_backbone('resnet18', width=8, fpn_dim=8, remat=True)
  assert jax.tree.structure(abstract_init(remat, TINY_IMAGES_SHAPE)) == jax.tree.structure(
    variables
  )
  params = with_open_residual_branches(variables['params'])
  stats = variables['batch_stats']
  (out, updates), (remat_out, remat_updates) = fast_jit(
    lambda v, x: tuple(m.apply(v, x, train=True, mutable=['batch_stats']) for m in (plain, remat))
  )({'params': params, 'batch_stats': stats}, images)
  for level in out:
    np.testing.assert_allclose(remat_out[level], out[level], rtol=1e-5, atol=1e-6, err_msg=level)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), remat_updates, updates
  )
  weights = random_pyramid_weights(plain, images)
  assert_gradients_close(
    compiled_gradient(remat, 0)(params, stats, images, weights),
    compiled_gradient(plain, 0)(params, stats, images, weights),
  )


@pytest.mark.slow
def test_remat_densenet_keeps_gradients():
  def densenet(remat):
    body = DenseNet(
      block_sizes=(2, 1, 1, 1), growth_rate=4, num_init_features=8, norm='group', remat=remat
    )
    return BackboneFPN(body=body, fpn=FPN(features=8))

  plain, remat = densenet(False), densenet(True)
  images = np.random.default_rng(1).normal(size=(2, 64, 64, 2)).astype(np.float32)
  variables = fast_jit(plain.init)(key(0), images)
  assert jax.tree.structure(abstract_init(remat, images.shape)) == jax.tree.structure(variables)
  weights = random_pyramid_weights(plain, images)
  assert_gradients_close(
    compiled_gradient(remat, 0)(variables['params'], None, images, weights),
    compiled_gradient(plain, 0)(variables['params'], None, images, weights),
  )


@pytest.mark.slow
def test_remat_shrinks_the_buffers_kept_for_the_backward_pass():
  """XLA's buffer plan of the body's gradient (compiled, not run): with the blocks recomputed
  one at a time their inner activations are not all alive at once. (`nn.remat` fails this on
  XLA:CPU: see `imask_jax.models.remat`.)"""
  images = jax.ShapeDtypeStruct((2, 256, 256, 1), jnp.float32)

  def temporaries(remat):
    model = build_backbone('resnet50', width=16, fpn_dim=16, norm='group', remat=remat)
    variables = abstract_init(model, images.shape)

    def loss(params, x):
      outputs = model.apply({'params': params}, x)
      return sum(jnp.sum(level) for level in outputs.values())

    compiled = fast_jit(jax.grad(loss)).lower(variables['params'], images).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temporaries(True) < 0.5 * temporaries(False)
