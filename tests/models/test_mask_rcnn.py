"""Mask R-CNN / iMaskRCNN: head shapes, dtypes, and an overfit test on two knee phantom slices.

Shapes and dtypes are checked with `jax.eval_shape` (nothing is compiled). The overfit test
compiles one training step per head and reuses it for the gradient-coverage check and for a
check that the step compiles exactly once; inference then runs on the trained toy model.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import imask_jax  # noqa: F401  (sets the PRNG implementation)
from data_pipelines import instances, orientation
from data_pipelines.phantoms import generate_knee
from imask_jax.models import heads
from imask_jax.models.detections import Detections, detections_to_label_map, paint_slots
from imask_jax.models.mask_rcnn import MaskRCNN, ModelSpec, init_variables
from imask_jax.models.spec import IMaskSpec, PointSpec
from imask_jax.ops import masks as mask_ops

NUM_CLASSES = 4
MAX_INSTANCES = 6
TINY = dict(
  num_classes=NUM_CLASSES,
  backbone='resnet18',
  width=16,
  fpn_dim=32,
  box_head_dim=128,
  mask_head_dim=32,
  imask=IMaskSpec(fine_dim=16),
  rpn_pre_nms_topk_train=300,
  rpn_post_nms_topk_train=64,
  rpn_pre_nms_topk_test=200,
  rpn_post_nms_topk_test=32,
  roi_batch_size=32,
  max_detections=8,
)


# --- shapes, without compiling -----------------------------------------------------------------


def _pyramid(batch: int, size: int, dim: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {
    f'P{k}': jax.ShapeDtypeStruct((batch, -(-size // 2**k), -(-size // 2**k), dim), jnp.float32)
    for k in range(2, 7)
  }


def _head_output(head: nn.Module, n: int = 5, batch: int = 2, size: int = 64, dim: int = 16):
  feats = jax.ShapeDtypeStruct((n, 14, 14, dim), jnp.float32)
  rois = jax.ShapeDtypeStruct((n, 4), jnp.float32)
  index = jax.ShapeDtypeStruct((n,), jnp.int32)
  pyramid = _pyramid(batch, size, dim)

  def run(key, feats, pyramid, rois, index):
    variables = head.init(key, feats, pyramid, rois, index)
    return head.apply(variables, feats, pyramid, rois, index)

  return jax.eval_shape(run, jax.random.PRNGKey(0), feats, pyramid, rois, index)


@pytest.mark.parametrize(
  'decoder,skip,skip_size,level,expected',
  [
    (True, True, 56, 'P2', 56),  # the paper's head
    (True, True, 28, 'P2', 28),
    (True, True, 112, 'P2', 112),
    (True, True, 56, 'P3', 56),  # skip reads another level
    (True, False, 56, 'P2', 56),  # decoder only
    (False, True, 56, 'P2', 56),  # skip only
    (False, False, 56, 'P2', 56),  # neither: fixed upsampling + fusion convs
  ],
)
def test_imask_head_output_sizes(decoder, skip, skip_size, level, expected):
  head = heads.IMaskHead(
    num_classes=3,
    dim=16,
    decoder=decoder,
    skip=skip,
    skip_size=skip_size,
    skip_level=level,
    fine_dim=8,
  )
  out = _head_output(head)
  assert out.shape == (5, expected, expected, 3) and out.dtype == jnp.float32


def test_standard_mask_head_and_box_heads():
  out = _head_output(heads.StandardMaskHead(num_classes=3, dim=16))
  assert out.shape == (5, 28, 28, 3)
  x = jax.ShapeDtypeStruct((5, 7, 7, 16), jnp.float32)
  for kind in ('fc', 'conv'):
    head = heads.BoxHead(num_classes=3, kind=kind, dim=32, conv_dim=8)
    logits, deltas = jax.eval_shape(
      lambda k, x: head.apply(head.init(k, x), x), jax.random.PRNGKey(0), x
    )
    assert logits.shape == (5, 4) and deltas.shape == (5, 3, 4)


def test_rpn_head_outputs_line_up_with_the_anchor_grid():
  """An odd input size: every level is ceil(size / stride), for the backbone and the anchors."""
  spec = ModelSpec(image_size=(70, 45), **TINY)
  model = MaskRCNN(spec)
  images = jax.ShapeDtypeStruct((2, 70, 45, 1), jnp.float32)

  def rpn_outputs(key, images):
    variables = model.init(key, images, method=MaskRCNN.touch_all)
    return model.apply(variables, images, False, method=lambda m, x, t: m.rpn(m.pyramid(x, t)))

  logits, deltas = jax.eval_shape(rpn_outputs, jax.random.PRNGKey(0), images)
  expected = sum(-(-70 // s) * -(-45 // s) for s in (4, 8, 16, 32, 64)) * len(spec.anchor_ratios)
  assert model.anchors.boxes.shape == (expected, 4)
  assert logits.shape == (2, expected) and deltas.shape == (2, expected, 4)


@pytest.mark.parametrize('head', ['standard', 'imask'])
@pytest.mark.slow
def test_bf16_compute_keeps_float32_params_and_losses(head):
  spec = ModelSpec(image_size=(64, 64), mask_head=head, dtype='bfloat16', **TINY)
  model = MaskRCNN(spec)
  variables = jax.eval_shape(functools.partial(init_variables, model), jax.random.PRNGKey(0))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  batch = _synthetic_targets(2, 64)
  loss, terms = jax.eval_shape(
    lambda v, b, k: model.apply(v, b['image'], b, k, True, method=MaskRCNN.losses),
    variables,
    batch,
    jax.random.split(jax.random.PRNGKey(1), 2),
  )
  assert loss.dtype == jnp.float32 and all(t.dtype == jnp.float32 for t in terms.values())
  det = jax.eval_shape(
    lambda v, x: model.apply(v, x, method=MaskRCNN.detect), variables, batch['image']
  )
  assert det.mask_probs.shape == (2, 8, spec.mask_size, spec.mask_size)
  assert det.boxes.shape == (2, 8, 4) and det.classes.dtype == jnp.int32


def _synthetic_targets(batch: int, size: int) -> dict[str, jax.ShapeDtypeStruct]:
  m = MAX_INSTANCES
  return dict(
    image=jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32),
    gt_boxes=jax.ShapeDtypeStruct((batch, m, 4), jnp.float32),
    gt_classes=jax.ShapeDtypeStruct((batch, m), jnp.int32),
    gt_masks=jax.ShapeDtypeStruct((batch, m, size, size), jnp.uint8),
    gt_valid=jax.ShapeDtypeStruct((batch, m), jnp.bool_),
  )


# --- label maps from detections -----------------------------------------------------------------


def _uniform_detections(rows):
  """One image of (class, score, box, uniform mask probability) detections, one padding slot."""
  d = len(rows) + 1
  boxes, scores = np.zeros((1, d, 4), np.float32), np.zeros((1, d), np.float32)
  classes, probs = np.zeros((1, d), np.int32), np.zeros((1, d, 4, 4), np.float32)
  for i, (cls, score, box, prob) in enumerate(rows):
    classes[0, i], scores[0, i], boxes[0, i], probs[0, i] = cls, score, box, prob
  valid = np.arange(d)[None] < len(rows)
  return Detections(*(jnp.asarray(x) for x in (boxes, scores, classes, valid, probs)))


@pytest.mark.slow
def test_label_map_gives_shared_pixels_to_the_surest_detection_and_cuts_low_scores():
  det = _uniform_detections(
    [
      (1, 0.95, (0, 0, 8, 8), 0.6),  # confident box, half-sure mask: support 0.57
      (2, 0.80, (4, 4, 12, 12), 0.9),  # support 0.72 where they overlap: it wins there
      (3, 0.30, (0, 8, 8, 16), 1.0),  # below min_score: not painted, still a mask
      (4, 0.99, (12, 12, 16, 16), 0.4),  # mask below the 0.5 threshold: nothing
    ]
  )
  label_map, masks = detections_to_label_map(det, (16, 16), threshold=0.5, min_score=0.5)
  want = np.zeros((16, 16), np.int32)
  want[0:8, 0:8] = 1
  want[4:12, 4:12] = 2
  np.testing.assert_array_equal(np.asarray(label_map)[0], want)
  masks = np.asarray(masks)[0]
  assert masks.shape == (5, 16, 16)
  np.testing.assert_array_equal(masks[2], np.pad(np.ones((8, 8), bool), ((0, 8), (8, 0))))
  assert not masks[3].any() and not masks[4].any()
  # With no score cut the low-scoring detection is painted where nothing else claims a pixel.
  label_map, _ = detections_to_label_map(det, (16, 16), threshold=0.5)
  want[0:8, 8:16] = 3
  want[4:8, 8:12] = 2  # 0.72 against its 0.30
  np.testing.assert_array_equal(np.asarray(label_map)[0], want)


@pytest.mark.parametrize(
  ('paint_rule', 'threshold'), [('union', 0.5), ('each', 0.5), ('union', 0.3), ('each', 0.7)]
)
@pytest.mark.slow
def test_label_map_matches_a_per_pixel_numpy_rule_on_random_detections(paint_rule, threshold):
  rng = np.random.default_rng(3)
  b, d, size = 2, 6, 20
  y1, x1 = rng.uniform(-2, 14, (b, d)), rng.uniform(-2, 14, (b, d))
  boxes = np.stack(
    [y1, x1, y1 + rng.uniform(2, 12, (b, d)), x1 + rng.uniform(2, 12, (b, d))], -1
  ).astype(np.float32)
  scores = rng.uniform(0.05, 1, (b, d)).astype(np.float32)
  det = Detections(
    jnp.asarray(boxes),
    jnp.asarray(scores),
    jnp.asarray(rng.integers(1, 5, (b, d)), jnp.int32),
    jnp.asarray(rng.uniform(size=(b, d)) < 0.8),
    jnp.asarray(rng.uniform(size=(b, d, 7, 7)), jnp.float32),
  )
  label_map, _ = detections_to_label_map(
    det, (size, size), threshold=threshold, min_score=0.3, paint_rule=paint_rule
  )
  for i in range(b):
    probs = np.asarray(mask_ops.paste_mask_probs(det.mask_probs[i], det.boxes[i], (size, size)))
    want = np.zeros((size, size), np.int32)
    for r in range(size):
      for c in range(size):
        best, none_covers = -1.0, 1.0
        for k in range(d):
          if not (det.valid[i, k] and scores[i, k] >= 0.3):
            continue
          p = probs[k, r, c]
          none_covers *= 1.0 - p
          if (p >= threshold or paint_rule == 'union' and p > 0) and p * scores[i, k] > best:
            best, winner = p * scores[i, k], int(det.classes[i, k])
        painted = (1.0 - none_covers >= threshold) if paint_rule == 'union' else best >= 0
        want[r, c] = winner if painted and best >= 0 else 0
    np.testing.assert_array_equal(np.asarray(label_map)[i], want)


@pytest.mark.slow
def test_union_painting_closes_the_seam_between_two_unsure_neighbours():
  # Two 8-pixel boxes overlapping in image columns 6-7, one mask cell per pixel: each mask is
  # sure (0.9) of its own part and unsure (0.4) of the shared columns.
  left = np.full((8, 8), 0.9, np.float32)
  left[:, 6:] = 0.4
  right = left[:, ::-1].copy()
  det = Detections(
    jnp.asarray([[[0, 0, 8, 8], [0, 6, 8, 14]]], jnp.float32),
    jnp.asarray([[0.9, 0.8]], jnp.float32),
    jnp.asarray([[1, 2]], jnp.int32),
    jnp.asarray([[True, True]]),
    jnp.asarray([[left, right]]),
  )
  each, _ = detections_to_label_map(det, (8, 14), paint_rule='each')
  union, _ = detections_to_label_map(det, (8, 14), paint_rule='union')
  each, union = np.asarray(each)[0], np.asarray(union)[0]
  # Columns 6-7: both masks read 0.4 there (each < 0.5), together 1 - 0.6 ** 2 = 0.64.
  assert (each[:, 6:8] == 0).all()
  assert (union[:, 6:8] > 0).all()
  # Elsewhere the two rules agree: a single unsure mask is not painted by either.
  np.testing.assert_array_equal(np.delete(each, [6, 7], axis=1), np.delete(union, [6, 7], axis=1))
  with pytest.raises(ValueError, match='model.paint_rule'):
    detections_to_label_map(det, (8, 14), paint_rule='max')


# --- overfitting two phantom slices --------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def phantom_batch() -> dict[str, np.ndarray]:
  """Two sagittal slices of a knee phantom (128 x 128), normalised, with their instances."""
  ph = generate_knee(0)
  grid = orientation.SourceGrid.from_affine(ph.image.shape, ph.affine)
  images = orientation.volume_to_slices(grid.to_canonical(ph.image), 'sagittal')
  labels = orientation.volume_to_slices(grid.to_canonical(ph.labels), 'sagittal')
  lo, hi = np.percentile(ph.image, [0.5, 99.5])
  middle = images.shape[0] // 2
  out = {k: [] for k in ('image', 'gt_boxes', 'gt_classes', 'gt_masks', 'gt_valid')}
  for i in (middle - 4, middle + 4):
    padded = support.pad_instances(
      instances.extract_instances(labels[i], {1: 1, 2: 2, 3: 3, 4: 4}), MAX_INSTANCES
    )
    out['image'].append(np.clip((images[i] - lo) / (hi - lo), 0, 1)[..., None])
    out['gt_boxes'].append(padded.boxes)
    out['gt_classes'].append(padded.classes)
    out['gt_masks'].append(padded.masks)
    out['gt_valid'].append(padded.valid)
  return {k: np.stack(v) for k, v in out.items()}


def truth_label_map(batch) -> np.ndarray:
  truth = np.zeros(batch['gt_masks'].shape[:1] + batch['gt_masks'].shape[2:], np.int32)
  for b in range(truth.shape[0]):
    for m in range(MAX_INSTANCES):
      if batch['gt_valid'][b, m]:
        truth[b][batch['gt_masks'][b, m] > 0] = batch['gt_classes'][b, m]
  return truth


# Enough Adam steps to overfit both slices with room to spare for every head: Dice femur /
# tibia 0.975-0.992 and a class mean of 0.93-0.96 against the 0.95 and 0.9 asked below, last
# losses 3-8 % of the first against 25 %.
STEPS = 200


# The point head (PointRend-style refinement) on the imask head, small enough for the test.
TINY_POINTS = PointSpec(enabled=True, dim=16, train_points=64, subdivision_points=256)


@pytest.fixture(scope='module', params=['standard', 'imask', 'imask+points'])
def trained(request):
  batch = phantom_batch()
  head, _, points = request.param.partition('+')
  spec = ModelSpec(
    image_size=batch['image'].shape[1:3],
    mask_head=head,
    point_head=TINY_POINTS if points else PointSpec(),
    **TINY,
  )
  model = MaskRCNN(spec)
  params = jax.jit(functools.partial(init_variables, model))(jax.random.PRNGKey(0))['params']
  tx = optax.adam(optax.warmup_cosine_decay_schedule(1e-4, 2e-3, 30, STEPS, 1e-5))
  data = {k: jnp.asarray(v) for k, v in batch.items()}

  traces = []

  @jax.jit
  def step(params, opt_state, i):
    traces.append(i)  # Python runs here only while JAX traces: one entry per compilation
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), i), 2)
    loss_fn = lambda p: model.apply(
      {'params': p}, data['image'], data, keys, True, method=MaskRCNN.losses
    )
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    grad_norms = jax.tree.map(lambda g: jnp.sqrt(jnp.sum(jnp.square(g))), grads)
    return optax.apply_updates(params, updates), opt_state, loss, grad_norms

  opt_state = tx.init(params)
  losses, grad_norms_step2 = [], None
  for i in range(STEPS):
    params, opt_state, loss, grad_norms = step(params, opt_state, i)
    losses.append(float(loss))
    if i == 2:  # after two updates, zero-initialised residual scales have moved
      grad_norms_step2 = jax.device_get(grad_norms)
  return dict(
    model=model,
    params=params,
    batch=batch,
    losses=losses,
    grad_norms=grad_norms_step2,
    compiles=len(traces),
  )


@pytest.mark.e2e  # trains the tiny model for many steps
def test_training_compiles_once_and_losses_are_finite(trained):
  assert trained['compiles'] == 1
  assert np.all(np.isfinite(trained['losses']))
  assert np.mean(trained['losses'][-20:]) < 0.25 * np.mean(trained['losses'][:5])


@pytest.mark.e2e  # trains the tiny model for many steps
def test_gradient_reaches_every_parameter(trained):
  flat = jax.tree_util.tree_leaves_with_path(trained['grad_norms'])
  unreached = [jax.tree_util.keystr(path) for path, norm in flat if not float(norm) > 0]
  assert not unreached, unreached


@pytest.mark.e2e  # trains the tiny model for many steps
def test_overfits_two_slices_and_returns_valid_padded_detections(trained):
  model, params, batch = trained['model'], trained['params'], trained['batch']
  det = jax.jit(lambda p, x: model.apply({'params': p}, x, method=MaskRCNN.detect))(
    params, jnp.asarray(batch['image'])
  )
  label_map, masks = detections_to_label_map(det, model.spec.image_size)
  det = jax.device_get(det)
  side = model.spec.detection_mask_size  # the point head refines 56 -> 112
  assert det.mask_probs.shape[2:] == (side, side)
  assert side == (112 if model.spec.point_head.enabled else model.spec.mask_size)
  height, width = model.spec.image_size
  for b in range(2):
    valid = det.valid[b]
    count = int(valid.sum())
    assert np.all(valid[:count]) and not np.any(valid[count:])  # valid first, then padding
    assert np.all(np.diff(det.scores[b][:count]) <= 0)  # by descending score
    assert np.all((det.classes[b][:count] >= 1) & (det.classes[b][:count] <= NUM_CLASSES))
    assert np.all(det.classes[b][count:] == 0) and np.all(det.scores[b][count:] == 0)
    boxes = det.boxes[b][:count]
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 2] <= height)
    assert np.all(boxes[:, 1] >= 0) and np.all(boxes[:, 3] <= width)
  assert np.asarray(masks).shape == (2, 8, height, width)
  truth = truth_label_map(batch)
  pred = np.asarray(label_map)
  dice = {}
  for c in range(1, NUM_CLASSES + 1):
    t, p = truth == c, pred == c
    if t.sum():
      dice[c] = 2 * np.sum(t & p) / (t.sum() + p.sum())
  print(model.spec.mask_head, model.spec.point_head.enabled, 'dice per class', dice)
  assert dice[1] >= 0.95 and dice[3] >= 0.95, dice  # femur, tibia
  assert np.mean(list(dice.values())) >= 0.9, dice


def kept_for_painting(scores, classes, valid, min_score, per_class):
  """NumPy reference of `paint_slots` for one image: the indices of each class's `per_class`
  best detections with score >= min_score, and how many painting detections were left out."""
  kept, painting = [], 0
  for c in range(1, NUM_CLASSES + 1):
    mine = np.flatnonzero(valid & (classes == c) & (scores >= min_score))
    painting += len(mine)
    kept += list(mine[np.argsort(-scores[mine], kind='stable')][:per_class])
  return sorted(kept), painting - len(kept)


@pytest.mark.parametrize('per_class', [1, 2, 3])
def test_paint_slots_keep_each_class_best_painting_detections(per_class):
  rng = np.random.default_rng(per_class)
  select = jax.jit(
    jax.vmap(
      functools.partial(paint_slots, num_classes=NUM_CLASSES, per_class=per_class, min_score=0.3)
    )
  )
  scores = rng.uniform(0, 1, (6, 12)).astype(np.float32)
  scores[0, :4] = 0.5  # ties go to the earlier detection, as in the reference
  classes = rng.integers(1, NUM_CLASSES + 1, (6, 12)).astype(np.int32)
  valid = rng.uniform(size=(6, 12)) < 0.8
  index, slot_valid, unpainted = jax.device_get(select(scores, classes, valid))
  assert index.shape == slot_valid.shape == (6, NUM_CLASSES * per_class)
  for b in range(6):
    kept, left_out = kept_for_painting(scores[b], classes[b], valid[b], 0.3, per_class)
    assert sorted(index[b][slot_valid[b]]) == kept
    assert int(unpainted[b]) == left_out
    # Slots of class c hold class c, best first.
    for c in range(NUM_CLASSES):
      block = slice(c * per_class, (c + 1) * per_class)
      mine = index[b][block][slot_valid[b][block]]
      assert np.all(classes[b][mine] == c + 1)
      assert np.all(np.diff(scores[b][mine]) <= 0)


# The painting cases below share one full pass per trained model: a full pass (paint_only
# False) reads neither paint_slots_per_class nor label_score_threshold, so it is computed once,
# with the most restrictive of the cases' values (1 slot per class, min_score 0.5), and must
# still return every NMS survivor (checked in each case: a full pass cut to the painting slots,
# or by the painting score, would leave some of the 8 slots empty).
FULL_PASS_PAINTING = dict(paint_slots_per_class=1, label_score_threshold=0.5)


def full_detections(trained) -> Detections:
  """The trained model's full pass over its two slices with every NMS survivor a detection
  (test_score_threshold 0: all 8 slots filled), computed once per trained model."""
  if 'full' not in trained:
    import dataclasses

    spec = dataclasses.replace(
      trained['model'].spec, test_score_threshold=0.0, **FULL_PASS_PAINTING
    )
    trained['full'] = jax.device_get(
      jax.jit(lambda p, x: MaskRCNN(spec).apply({'params': p}, x, method=MaskRCNN.detect))(
        trained['params'], jnp.asarray(trained['batch']['image'])
      )
    )
  return trained['full']


@pytest.mark.e2e  # uses the trained tiny model
@pytest.mark.parametrize('per_class, min_score', [(1, 0.5), (1, 0.0), (2, 0.05)])
def test_paint_only_detection_is_the_full_detection_cut_to_its_painting_slots(
  trained, per_class, min_score
):
  """The mask head on the painting slots alone gives the same detections, masks and label map
  as the full pass restricted to the detections the reference keeps, and counts the rest."""
  import dataclasses

  model, params, batch = trained['model'], trained['params'], trained['batch']
  spec = dataclasses.replace(  # every NMS survivor is a detection: all 8 slots filled
    model.spec,
    paint_slots_per_class=per_class,
    label_score_threshold=min_score,
    test_score_threshold=0.0,
  )
  images = jnp.asarray(batch['image'])
  full = full_detections(trained)
  slots = jax.device_get(
    jax.jit(lambda p, x: MaskRCNN(spec).apply({'params': p}, x, True, method=MaskRCNN.detect))(
      params, images
    )
  )
  assert full.unpainted is None and np.all(full.valid)
  assert slots.boxes.shape[1] == NUM_CLASSES * per_class
  if min_score == 0.0:  # 8 painting detections, at most 4 * per_class slots
    assert np.all(slots.unpainted >= 8 - NUM_CLASSES * per_class)
  for b in range(images.shape[0]):
    kept, unpainted = kept_for_painting(
      full.scores[b], full.classes[b], full.valid[b], min_score, per_class
    )
    assert int(slots.unpainted[b]) == unpainted
    got = np.flatnonzero(slots.valid[b])
    assert len(got) == len(kept)
    # Match slots to the full detections by score and class (scores of one image differ).
    order = np.argsort(-slots.scores[b][got], kind='stable')
    want = sorted(kept, key=lambda d: -full.scores[b][d])
    for slot, d in zip(got[order], want):
      assert slots.classes[b][slot] == full.classes[b][d]
      np.testing.assert_allclose(slots.scores[b][slot], full.scores[b][d], rtol=1e-6)
      np.testing.assert_allclose(slots.boxes[b][slot], full.boxes[b][d], atol=1e-4)
      np.testing.assert_allclose(slots.mask_probs[b][slot], full.mask_probs[b][d], atol=1e-5)
    assert not np.any(slots.mask_probs[b][~slots.valid[b]])
  # Label maps: the slots' equal the full pass's with only the kept detections eligible.
  keep = np.zeros_like(full.valid)
  for b in range(images.shape[0]):
    kept, _ = kept_for_painting(
      full.scores[b], full.classes[b], full.valid[b], min_score, per_class
    )
    keep[b, kept] = True
  restricted = full._replace(valid=full.valid & keep)
  want_map, _ = detections_to_label_map(restricted, spec.image_size, min_score=min_score)
  got_map, _ = detections_to_label_map(slots, spec.image_size, min_score=min_score)
  np.testing.assert_array_equal(np.asarray(got_map), np.asarray(want_map))
  if not np.any(slots.unpainted):
    full_map, _ = detections_to_label_map(full, spec.image_size, min_score=min_score)
    np.testing.assert_array_equal(np.asarray(got_map), np.asarray(full_map))
