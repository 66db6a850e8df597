"""The semantic U-Net (models/unet.py) and its Dice + CE loss (models/semantic_losses.py):
output shapes for several depths, widths and odd sizes, the loss against a plain NumPy
reference, and an overfit on two knee phantom slices to a stated Dice; with a backbone encoder
(`model.unet.encoder`): the shapes of every level, the names and shapes of torchvision's
ImageNet bodies converted, a converted file filling the encoder only, and the same overfit."""

from __future__ import annotations

import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import imask_jax  # noqa: F401  (sets the PRNG implementation)
from data_pipelines import orientation
from data_pipelines.phantoms import generate_knee
from imask_jax.models import semantic_losses
from imask_jax.models.unet import Encoder, UNet, UNetSpec, init_variables


def tiny(depth: int, width: int, size, **kwargs) -> tuple[UNet, dict]:
  spec = UNetSpec(image_size=tuple(size), num_classes=4, depth=depth, width=width, **kwargs)
  model = UNet(spec)
  return model, jax.jit(functools.partial(init_variables, model))(jax.random.PRNGKey(0))


# --- shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'depth, width, size',
  [
    (1, 8, (9, 13)),
    pytest.param(2, 8, (64, 64), marks=pytest.mark.slow),
    pytest.param(3, 16, (67, 65), marks=pytest.mark.slow),
    pytest.param(4, 8, (95, 72), marks=pytest.mark.slow),
    pytest.param(5, 8, (64, 81), marks=pytest.mark.slow),
  ],
)
def test_outputs_cover_every_input_pixel_at_each_level(depth, width, size):
  model, variables = tiny(depth, width, size)
  images = jnp.zeros((2, *size, 1), jnp.float32)
  full = model.apply(variables, images, False)
  assert [o.shape for o in full] == [(2, *size, 5)]
  trained = model.apply(variables, images, True)
  # Deep supervision: heads at decoder levels 1 .. depth - 3 (the coarsest, depth - 2, would
  # carry weight 0 and has none), each at ceil(size / 2^level).
  levels = range(0, max(depth - 2, 1))
  assert [o.shape for o in trained] == [
    (2, -(-size[0] // 2**i), -(-size[1] // 2**i), 5) for i in levels
  ]
  probs = model.apply(variables, images, method=UNet.segment)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_without_deep_supervision_training_returns_the_full_resolution_logits_only():
  model, variables = tiny(4, 8, (32, 32), deep_supervision=False)
  outputs = model.apply(variables, jnp.zeros((1, 32, 32, 1)), True)
  assert [o.shape for o in outputs] == [(1, 32, 32, 5)]
  assert not any(name.startswith('head') and name != 'head0' for name in variables['params'])


@pytest.mark.slow
def test_batch_norm_trains_on_batch_statistics_and_infers_on_running_ones():
  model, variables = tiny(2, 8, (16, 16), norm='batch')
  assert 'batch_stats' in variables
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 1)) + 5.0
  targets = dict(
    gt_classes=jnp.ones((2, 1), jnp.int32),
    gt_masks=jnp.ones((2, 1, 16, 16), jnp.uint8),
    gt_valid=jnp.ones((2, 1), bool),
  )
  _, updates = model.apply(
    variables, images, targets, None, True, method=UNet.losses, mutable=['batch_stats']
  )
  before = jax.tree.leaves(variables['batch_stats'])
  after = jax.tree.leaves(updates['batch_stats'])
  assert any(not np.allclose(a, b) for a, b in zip(after, before))


def test_widths_double_per_level_up_to_the_cap():
  spec = UNetSpec(image_size=(64, 64), num_classes=1, depth=6, width=32, max_width=256)
  assert spec.widths() == (32, 64, 128, 256, 256, 256)
  assert spec.size_multiple == 32


@pytest.mark.slow
def test_padding_inside_the_net_leaves_the_valid_region_alone():
  """The net pads an input to a multiple of 2^(depth - 1) with zeros and crops the output back:
  a 61 x 61 image gives the logits of the same image zero-padded to 64 x 64 by hand."""
  model, variables = tiny(3, 8, (64, 64))
  rng = np.random.default_rng(0)
  image = np.zeros((1, 64, 64, 1), np.float32)
  image[:, :61, :61] = rng.random((1, 61, 61, 1))
  whole = model.apply(variables, jnp.asarray(image), False)[0]
  cropped = model.apply(variables, jnp.asarray(image[:, :61, :61]), False)[0]
  np.testing.assert_allclose(np.asarray(cropped), np.asarray(whole)[:, :61, :61], atol=1e-5)


def test_a_bad_spec_or_input_is_refused_in_one_line():
  with pytest.raises(ValueError, match='model.unet.depth=0'):
    UNetSpec(image_size=(64, 64), num_classes=4, depth=0)
  with pytest.raises(ValueError, match="model.norm='frozen_batch'"):
    UNetSpec(image_size=(64, 64), num_classes=4, norm='frozen_batch')
  model, variables = tiny(2, 8, (16, 16))
  with pytest.raises(ValueError, match='NHWC'):
    model.apply(variables, jnp.zeros((16, 16, 1)), False)
  # A config whose kind is neither model builds nothing (not a Mask R-CNN by default).
  from imask_jax import configs
  from imask_jax.models import build

  config = configs.default_config()
  config.model.kind = 'unett'
  with pytest.raises(ValueError, match="model.kind='unett'"):
    build.build_model(config)


# --- the loss against NumPy ----------------------------------------------------------------------


def numpy_dice_ce(logits: np.ndarray, labels: np.ndarray, smooth: float = 1e-5):
  """Plainly written: per image, the pixel-mean CE and 1 - mean over foreground classes of
  (2 sum(p t) + s) / (sum p + sum t + s); both averaged over images."""
  b, h, w, k = logits.shape
  ce_images, dice_images = [], []
  for i in range(b):
    z = logits[i].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(log_p)
    ce = 0.0
    for r in range(h):
      for c in range(w):
        ce -= log_p[r, c, labels[i, r, c]]
    ce_images.append(ce / (h * w))
    scores = []
    for cls in range(1, k):
      t = (labels[i] == cls).astype(np.float64)
      scores.append((2 * (p[..., cls] * t).sum() + smooth) / (p[..., cls].sum() + t.sum() + smooth))
    dice_images.append(1 - np.mean(scores))
  return float(np.mean(dice_images)), float(np.mean(ce_images))


def test_dice_and_cross_entropy_match_a_numpy_reference():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (3, 7, 6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (3, 7, 6)).astype(np.int32)
  labels[1] = 0  # an image without foreground: its Dice rewards predicting none
  total, terms = semantic_losses.dice_ce_loss(
    jnp.asarray(logits), jnp.asarray(labels), dice_weight=0.5, ce_weight=2.0
  )
  dice, ce = numpy_dice_ce(logits, labels)
  np.testing.assert_allclose(float(terms['dice']), dice, rtol=1e-5)
  np.testing.assert_allclose(float(terms['ce']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(total), 0.5 * dice + 2.0 * ce, rtol=1e-5)


def test_a_perfect_confident_prediction_has_almost_no_loss_and_a_wrong_one_a_large_one():
  labels = np.zeros((1, 4, 4), np.int32)
  labels[0, 1:3, 1:3] = 2
  right = 50.0 * jax.nn.one_hot(labels, 3)
  _, terms = semantic_losses.dice_ce_loss(right, jnp.asarray(labels))
  assert float(terms['dice']) < 1e-4 and float(terms['ce']) < 1e-4
  wrong = 50.0 * jax.nn.one_hot((labels + 1) % 3, 3)
  _, terms = semantic_losses.dice_ce_loss(wrong, jnp.asarray(labels))
  assert float(terms['dice']) > 0.99 and float(terms['ce']) > 40


def test_the_label_map_of_padded_instances_matches_the_trainers():
  from imask_jax.training.train import gt_label_map  # the host's version, used by validation

  rng = np.random.default_rng(2)
  masks = (rng.random((2, 4, 9, 8)) < 0.3).astype(np.uint8)
  classes = rng.integers(1, 5, (2, 4)).astype(np.int32)
  valid = rng.random((2, 4)) < 0.7
  got = semantic_losses.label_map_from_instances(
    jnp.asarray(classes), jnp.asarray(masks), jnp.asarray(valid)
  )
  np.testing.assert_array_equal(np.asarray(got), gt_label_map(classes, masks, valid))


def test_deep_supervision_weights_are_nnunets():
  # nnU-Net: 1 / 2^i, the lowest resolution 0, normalised.
  np.testing.assert_allclose(
    semantic_losses.deep_supervision_weights(4), np.array([1, 0.5, 0.25, 0]) / 1.75
  )
  assert semantic_losses.deep_supervision_weights(1) == (1.0,)


# --- overfit on two phantom slices ---------------------------------------------------------------

CROP = 96
OVERFIT_STEPS = 150
OVERFIT_DICE = 0.9  # per class, on the two training slices (measured 0.995-0.999)


def phantom_slices() -> tuple[np.ndarray, np.ndarray]:
  """Two sagittal 96 x 96 crops of knee phantom 0 around the joint (the two slices with the
  most tibial cartilage of those 7 apart), normalised: images [2, 96, 96, 1], class ids
  [2, 96, 96] (femur 1, femoral cartilage 2, tibia 3, tibial cartilage 4)."""
  ph = generate_knee(0)
  grid = orientation.SourceGrid.from_affine(ph.image.shape, ph.affine)
  images = orientation.volume_to_slices(grid.to_canonical(ph.image), 'sagittal')
  labels = orientation.volume_to_slices(grid.to_canonical(ph.labels), 'sagittal')
  labels = np.where(labels <= 4, labels, 0)
  lo, hi = np.percentile(ph.image, [0.5, 99.5])
  order = np.argsort([-(s == 4).sum() for s in labels], kind='stable')
  out_images, out_labels = [], []
  for i in (order[0], order[6]):
    r, c = np.argwhere(np.isin(labels[i], [2, 4])).mean(0).astype(int)
    r0 = int(np.clip(r - CROP // 2, 0, labels.shape[1] - CROP))
    c0 = int(np.clip(c - CROP // 2, 0, labels.shape[2] - CROP))
    window = np.s_[r0 : r0 + CROP, c0 : c0 + CROP]
    out_images.append(np.clip((images[i] - lo) / (hi - lo), 0, 1)[window][..., None])
    out_labels.append(labels[i][window])
  return np.stack(out_images).astype(np.float32), np.stack(out_labels).astype(np.int32)


def overfit(model, variables, images, labels) -> tuple[float, float, list[float]]:
  """OVERFIT_STEPS Adam steps of the U-Net's own loss on the slices, with the trainer's targets
  (one instance slot per class): (first loss, last loss, Dice per class of the argmax)."""
  masks = np.stack([(labels == c) for c in range(1, 5)], axis=1).astype(np.uint8)
  targets = dict(
    gt_classes=jnp.tile(jnp.arange(1, 5, dtype=jnp.int32), (2, 1)),
    gt_masks=jnp.asarray(masks),
    gt_valid=jnp.ones((2, 4), bool),
  )
  x = jnp.asarray(images)
  tx = optax.adam(3e-3)
  params = variables['params']
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss_fn = lambda p: model.apply({'params': p}, x, targets, None, True, method=UNet.losses)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  first = None
  for _ in range(OVERFIT_STEPS):
    params, opt_state, loss = step(params, opt_state)
    first = float(loss) if first is None else first
  probs = model.apply({'params': params}, x, method=UNet.segment)
  pred = np.asarray(jnp.argmax(probs, -1))
  dice = [
    2 * np.sum((pred == c) & (labels == c)) / (np.sum(pred == c) + np.sum(labels == c))
    for c in range(1, 5)
  ]
  return first, float(loss), dice


@pytest.mark.slow
def test_overfits_two_phantom_slices():
  images, labels = phantom_slices()
  assert all((labels == c).any() for c in range(1, 5))
  model, variables = tiny(4, 8, (CROP, CROP))
  first, last, dice = overfit(model, variables, images, labels)
  print('loss', first, '->', last, 'dice per class', np.round(dice, 3))
  assert last < 0.25 * first
  assert min(dice) >= OVERFIT_DICE, dice


# --- backbone encoders ---------------------------------------------------------------------------

TORCHVISION = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'fixtures', 'torchvision')


def encoder_spec(encoder: str, size=(64, 96), **kwargs) -> UNetSpec:
  fields = dict(image_size=size, num_classes=4, depth=6, width=8, encoder=encoder)
  fields.update(kwargs)
  return UNetSpec(**fields)


@pytest.mark.parametrize(
  'encoder, channels',
  [
    # The stem at stride 2 with the base width w, C2-C5 at strides 4-32: ResNet w x 2^k x
    # expansion; DenseNet (growth w / 2, 4 layers per unit of bn_size): its level_channels.
    ('resnet18', [4, 4, 8, 16, 32]),
    ('resnet50', [4, 16, 32, 64, 128]),
    ('densenet121', [4, 4 + 6 * 2, 8 + 12 * 2, 16 + 24 * 2, 32 + 16 * 2]),
  ],
)
def test_a_backbone_encoder_gives_its_levels_and_the_decoder_every_pixel(encoder, channels):
  """Shapes only (jax.eval_shape: nothing compiled)."""
  spec = encoder_spec(encoder, encoder_width=4)
  model = UNet(spec)
  variables = jax.eval_shape(functools.partial(init_variables, model), jax.random.PRNGKey(0))
  levels = jax.eval_shape(
    Encoder(spec, False).apply,
    {k: v['backbone'] for k, v in variables.items()},
    jnp.zeros((2, 64, 96, 1)),
  )
  assert [lv.shape for lv in levels] == [
    (2, 64 // 2**i, 96 // 2**i, c) for i, c in zip(range(1, 6), channels)
  ]
  images = jnp.zeros((2, 50, 90, 1), jnp.float32)  # padded inside to 64 x 96
  full = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  assert [o.shape for o in full] == [(2, 50, 90, 5)]
  trained = jax.eval_shape(
    functools.partial(model.apply, train=True, mutable=['batch_stats']), variables, images
  )[0]
  # Deep supervision at decoder levels 1 .. depth - 3 = 3.
  assert [o.shape for o in trained] == [(2, -(-50 // 2**i), -(-90 // 2**i), 5) for i in range(4)]
  params = variables['params']
  assert {'backbone', 'down0'} <= set(params) and 'down1' not in params
  assert set(params['backbone']) == {'body'}


def test_an_encoder_needs_six_levels_and_a_known_name():
  with pytest.raises(ValueError, match='model.unet.depth=6'):
    encoder_spec('resnet18', depth=5)
  with pytest.raises(ValueError, match="model.unet.encoder='vgg16'"):
    encoder_spec('vgg16')


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50', 'resnet101', 'densenet121'])
def test_the_encoder_body_has_the_names_and_shapes_of_imagenet_files(arch):
  """Every array of torchvision's published ImageNet classifier, converted, has its place in
  the encoder's backbone/body at width 64, and the body has nothing else (shapes only)."""
  from imask_jax.weights import convert

  with open(os.path.join(TORCHVISION, 'full_architectures.json')) as f:
    published = json.load(f)[arch]
  zeros = {k: np.broadcast_to(np.float32(0), shape) for k, shape in published.items()}
  converted = convert.to_variables(convert.convert_state_dict(zeros, arch))
  model = UNet(encoder_spec(arch, size=(64, 64), encoder_width=64, norm='batch'))
  shapes = jax.eval_shape(functools.partial(init_variables, model), jax.random.PRNGKey(0))

  def flat(tree):
    return {p: tuple(v.shape) for p, v in flax.traverse_util.flatten_dict(tree).items()}

  for collection in ('params', 'batch_stats'):
    assert flat(converted[collection]['backbone']['body']) == flat(
      shapes[collection]['backbone']['body']
    )


def test_init_from_a_converted_resnet18_fills_the_encoder_and_nothing_else(tmp_path):
  from imask_jax import convert_weights
  from imask_jax.weights import pretrained, torch_checkpoint

  path = str(tmp_path / 'resnet18_w4.msgpack')
  source = os.path.join(TORCHVISION, 'resnet18_w4.pth')
  assert convert_weights.main(['--from', source, '--arch', 'resnet18', '--out', path]) == 0
  model = UNet(encoder_spec('resnet18', size=(32, 32), encoder_width=4, norm='batch'))
  shapes = jax.eval_shape(functools.partial(init_variables, model), jax.random.PRNGKey(0))
  initial = jax.tree.map(lambda v: np.full(v.shape, 7, v.dtype), shapes)
  merged, report = pretrained.merge(initial, path)
  state = torch_checkpoint.read_state_dict(source)
  np.testing.assert_array_equal(
    merged['batch_stats']['backbone']['body']['stage4_block1']['norm1']['var'],
    state['layer4.1.bn1.running_var'],
  )
  assert all(p.split('/')[1:3] == ['backbone', 'body'] for p in report.loaded)
  assert report.reinitialised and not any('backbone' in p for p in report.reinitialised)
  np.testing.assert_array_equal(merged['params']['head0']['kernel'], 7)
  np.testing.assert_array_equal(merged['params']['down0']['conv0']['kernel'], 7)


def test_the_trainer_starts_a_resnet18_encoder_unet_from_a_converted_file(tmp_path):
  """training.steps.init_state with model.init_from: the U-Net's encoder holds the file's
  arrays (what the trainer restores from), the decoder its own initialisation."""
  from imask_jax import convert_weights
  from imask_jax.training import steps
  from imask_jax.weights import torch_checkpoint

  path = str(tmp_path / 'resnet18_w4.msgpack')
  source = os.path.join(TORCHVISION, 'resnet18_w4.pth')
  assert convert_weights.main(['--from', source, '--arch', 'resnet18', '--out', path]) == 0
  model = UNet(encoder_spec('resnet18', size=(32, 32), encoder_width=4, norm='batch'))
  fresh = steps.init_state(model, optax.sgd(0.1), seed=0)
  started = steps.init_state(model, optax.sgd(0.1), seed=0, init_from=path)
  state = torch_checkpoint.read_state_dict(source)
  np.testing.assert_array_equal(
    started.params['backbone']['body']['stage4_block1']['conv1']['kernel'],
    np.transpose(state['layer4.1.conv1.weight'], (2, 3, 1, 0)),
  )
  np.testing.assert_array_equal(
    started.batch_stats['backbone']['body']['stage4_block1']['norm1']['var'],
    state['layer4.1.bn1.running_var'],
  )
  np.testing.assert_array_equal(started.params['head0']['kernel'], fresh.params['head0']['kernel'])


RESNET_OVERFIT_DICE = 0.9  # per class, on the two training slices (measured 0.993-0.999)


@pytest.mark.slow
def test_a_resnet18_encoder_overfits_two_phantom_slices():
  images, labels = phantom_slices()
  model = UNet(encoder_spec('resnet18', size=(CROP, CROP), encoder_width=8))
  variables = jax.jit(functools.partial(init_variables, model))(jax.random.PRNGKey(0))
  first, last, dice = overfit(model, variables, images, labels)
  print('resnet18 encoder: loss', first, '->', last, 'dice per class', np.round(dice, 3))
  assert last < 0.25 * first
  assert min(dice) >= RESNET_OVERFIT_DICE, dice
