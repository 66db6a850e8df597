"""Times a Mask R-CNN / iMaskRCNN training step and inference pass against torchvision's.

Run (from the repository root):
  TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/train_step.py

What is timed, for each image size (`--sizes`, 256 and 512) at batch `--batch` (2):

* "train": one training step, forward + backward + Adam update (lr 1e-4, nothing else).
  Ours: `imask_jax.training.steps.make_train_step` (jit of shard_map over a 1-device mesh, with its
  non-finite guard), compiled ahead of time. torchvision: `model(images, targets)`, the sum
  of its losses, `backward()`, `Adam.step()`.
* "infer": one inference pass on the batch, masks pasted into the image. Ours:
  `imask_jax.inference.programs.make_detect_fn` (detect + per-slice label map). torchvision:
  `model.eval()(images)` under `torch.no_grad()` (detections + `paste_masks_in_image`).

Models, the same settings on both sides (torchvision's Mask R-CNN defaults where it has one):
ResNet-50 (width 64) with BatchNorm (torchvision trains from scratch with BatchNorm2d in every
layer), FPN 256 (P2-P6), 3 input channels, 4 foreground classes. Anchors: one size per level
32, 64, 128, 256, 512 px, ratios 0.5, 1, 2. RPN: 256 anchors per image at 50 % positive
(IoU 0.7 / 0.3), NMS 0.7, top 2000 per level before NMS and 1000 per image after it in
training (detectron2's defaults), 1000 / 1000 at test time. ROI heads: 512 ROIs per image at
25 % positive (IoU 0.5), ROIAlign sampling ratio 2, levels by k0 = 4 at 224 px, box head
2 x fc 1024, mask head 4 x conv 256 + 2x transposed conv -> 28 x 28 per class ("standard").
"imask" is the same model with the iMaskRCNN mask head (decoder to 56 x 56, skip ROIAlign of
a 1x1-projected P2 at 56 x 56, one fusion conv, fine_dim 32). Test: score > 0.05, per-class
NMS 0.5, 100 detections per image. One difference stays, by design: ours always runs the
mask head on a fixed number of slots per image (`--mask_rois`, 32: the first slots of the
512-ROI sample, which hold its positives; static shapes, unused slots weighted zero),
torchvision on all the positives it actually drew (reported: "pos ROIs").
torchvision's transform still normalises (mean 0, std 1) and resamples at scale 1.

Data: `synthetic_batch` — per image a noisy 3-channel image with 4 ellipses (one per class),
their masks and tight boxes, padded to 8 instance slots; saved to .npz, and the torchvision
process loads the same arrays.

Every (framework, head, size, mode) runs in its own subprocess, pinned to the same 2 CPUs
(sched_setaffinity, inherited), torch with 2 intra- and inter-op threads, so each reports its
own peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, compile included for ours).
Reported: compile time (ours: lower + compile, ahead of time; torchvision has none), the
first call after it, the median wall and CPU time of `--repeats` calls after `--warmup`,
images/s from the median, peak RSS, and the ratios ours/torchvision and imask/standard. For
ours also the peak RSS before the first call (compile and initialisation; the process's high
mark so far; the compiler's freed memory is returned to the OS first, as the trainer does)
and XLA's buffer plan of the compiled function (`memory_analysis()`: arguments +
temporaries, what one call needs besides the process itself). `--remat` builds ours with
`model.remat` (the backbone's activations recomputed in the backward pass). The machine is
shared and noisy: compare ratios, quote medians; CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 2
REPO = Path(__file__).resolve().parents[1]
JAX_PYTHON = REPO / '.venv' / 'bin' / 'python'
TORCH_PYTHON = REPO / '.benchvenv' / 'bin' / 'python'
TORCH_WORKER = Path(__file__).resolve().parent / '_torch_train_step.py'

NUM_CLASSES = 4
CHANNELS = 3
MAX_INSTANCES = 8
OBJECTS_PER_IMAGE = 4
LEARNING_RATE = 1e-4
SEED = 0
HEADS = ('standard', 'imask')
MODES = ('train', 'infer')

# Shared settings (ours: ModelSpec fields; torchvision: constructor arguments, see
# _torch_train_step.build_model).
RPN_PRE_NMS_TRAIN, RPN_POST_NMS_TRAIN = 2000, 1000
RPN_PRE_NMS_TEST, RPN_POST_NMS_TEST = 1000, 1000
ROI_BATCH_SIZE, ROI_POSITIVE_FRACTION = 512, 0.25
MAX_DETECTIONS = 100
# Mask-head slots per image in training (ours; static). 32 is ModelSpec's default; 128 would
# be every positive slot of the 512-ROI sample, torchvision's upper bound.
MASK_ROIS_PER_IMAGE = 32
# iMaskRCNN's fine path: channels at 56 x 56 and 3x3 fusion convs, configs.default_config's
# (what experiments/oai.py trains; the paper does not give the width). Earlier runs of the
# benchmark built it at 64, twice as wide: --fine_dim 64.
FINE_DIM, FUSE_CONVS = 32, 1


def pin_threads() -> None:
  """Restricts this process (and its children) to the first THREADS CPUs."""
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])


# ------------------------------------------------------------------------------ the data
def ellipse_mask(
  size: int, centre: tuple[float, float], axes: tuple[float, float], angle: float
) -> np.ndarray:
  """uint8 [size, size], 1 on pixels whose centre lies inside the rotated ellipse."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  dy, dx = yy - centre[0], xx - centre[1]
  cos, sin = np.cos(angle), np.sin(angle)
  u, v = cos * dy + sin * dx, -sin * dy + cos * dx
  return ((u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0).astype(np.uint8)


def tight_box(mask: np.ndarray) -> np.ndarray:
  """(y1, x1, y2, x2) float32 around the mask's pixels, in continuous pixel coordinates."""
  rows, cols = np.nonzero(mask)
  return np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32)


def synthetic_batch(batch: int, size: int, seed: int = SEED) -> dict[str, np.ndarray]:
  """A batch in the model's input format, `OBJECTS_PER_IMAGE` ellipses per image.

  Returns image float32 [B, S, S, 3], gt_boxes float32 [B, M, 4], gt_classes int32 [B, M]
  (object k has class k + 1; 0 in padding), gt_masks uint8 [B, M, S, S], gt_valid bool
  [B, M], with M = MAX_INSTANCES and the first OBJECTS_PER_IMAGE slots valid.
  """
  if size < 32:
    raise ValueError(f'train_step.py: image size must be >= 32 px, got {size}')
  rng = np.random.default_rng(seed)
  m = MAX_INSTANCES
  out = dict(
    image=rng.normal(0.0, 0.1, (batch, size, size, CHANNELS)).astype(np.float32),
    gt_boxes=np.zeros((batch, m, 4), np.float32),
    gt_classes=np.zeros((batch, m), np.int32),
    gt_masks=np.zeros((batch, m, size, size), np.uint8),
    gt_valid=np.zeros((batch, m), bool),
  )
  for b in range(batch):
    for k in range(OBJECTS_PER_IMAGE):
      axes = tuple(rng.uniform(size / 16, size / 5, 2))
      centre = tuple(rng.uniform(size * 0.25, size * 0.75, 2))
      mask = ellipse_mask(size, centre, axes, rng.uniform(0, np.pi))
      out['gt_masks'][b, k] = mask
      out['gt_boxes'][b, k] = tight_box(mask)
      out['gt_classes'][b, k] = k + 1
      out['gt_valid'][b, k] = True
      # Each class its own brightness, slightly different per channel.
      out['image'][b] += mask[..., None] * (0.3 + 0.15 * k) * np.array([1.0, 0.9, 1.1], np.float32)
  return out


def torch_settings() -> dict[str, np.ndarray]:
  """The shared settings as npz scalars for _torch_train_step.py."""
  return dict(
    num_classes=np.array(NUM_CLASSES),
    rpn_pre_nms_train=np.array(RPN_PRE_NMS_TRAIN),
    rpn_post_nms_train=np.array(RPN_POST_NMS_TRAIN),
    rpn_pre_nms_test=np.array(RPN_PRE_NMS_TEST),
    rpn_post_nms_test=np.array(RPN_POST_NMS_TEST),
    roi_batch_size=np.array(ROI_BATCH_SIZE),
    roi_positive_fraction=np.array(ROI_POSITIVE_FRACTION),
    max_detections=np.array(MAX_DETECTIONS),
    learning_rate=np.array(LEARNING_RATE),
  )


# --------------------------------------------------------------------------- JAX worker
def model_spec(
  size: int,
  head: str,
  *,
  data_parallel: bool,
  mask_rois_per_image: int = MASK_ROIS_PER_IMAGE,
  fine_dim: int = FINE_DIM,
  fuse_convs: int = FUSE_CONVS,
  paint_slots_per_class: int = 0,
  remat: bool = False,
) -> Any:
  """Our ModelSpec with the settings of the module docstring."""
  from imask_jax import parallel
  from imask_jax.models.mask_rcnn import ModelSpec
  from imask_jax.models.spec import IMaskSpec

  return ModelSpec(
    image_size=(size, size),
    num_classes=NUM_CLASSES,
    input_channels=CHANNELS,
    backbone='resnet50',
    norm='batch',
    width=64,
    fpn_dim=256,
    remat=remat,
    axis_name=parallel.DATA_AXIS if data_parallel else None,
    anchor_sizes=(32.0, 64.0, 128.0, 256.0, 512.0),
    anchor_ratios=(0.5, 1.0, 2.0),
    rpn_pre_nms_topk_train=RPN_PRE_NMS_TRAIN,
    rpn_post_nms_topk_train=RPN_POST_NMS_TRAIN,
    rpn_pre_nms_topk_test=RPN_PRE_NMS_TEST,
    rpn_post_nms_topk_test=RPN_POST_NMS_TEST,
    rpn_nms_threshold=0.7,
    rpn_batch_size=256,
    rpn_positive_fraction=0.5,
    roi_batch_size=ROI_BATCH_SIZE,
    roi_positive_fraction=ROI_POSITIVE_FRACTION,
    mask_rois_per_image=mask_rois_per_image,
    roi_iou_threshold=0.5,
    roi_level_k0=4,
    roi_level_canonical=224.0,
    roi_sampling_ratio=2,
    box_head='fc',
    box_head_dim=1024,
    mask_head=head,
    mask_head_dim=256,
    imask=IMaskSpec(
      decoder=True,
      skip=True,
      skip_size=56,
      skip_level='P2',
      fine_dim=fine_dim,
      fuse_convs=fuse_convs,
    ),
    test_score_threshold=0.05,
    test_nms_threshold=0.5,
    max_detections=MAX_DETECTIONS,
    paint_slots_per_class=paint_slots_per_class,
  )


def jax_worker(
  data_path: str, head: str, mode: str, warmup: int, repeats: int, spec_kwargs: dict[str, int]
) -> dict:
  """Times our train step or detect function on the batch in `data_path` (this process)."""
  import resource

  import jax
  import optax

  from imask_jax import host_memory, parallel
  from imask_jax.inference import programs
  from imask_jax.models.mask_rcnn import MaskRCNN
  from imask_jax.training import steps

  data = dict(np.load(data_path))
  size = int(data['image'].shape[1])
  mesh = parallel.data_mesh()
  tx = optax.adam(LEARNING_RATE)
  model = MaskRCNN(model_spec(size, head, data_parallel=True, **spec_kwargs))
  state = parallel.replicate(steps.init_state(model, tx, SEED), mesh)
  if mode == 'train':
    fn = steps.make_train_step(model, tx, mesh, SEED)
    args = [state, parallel.shard_batch({k: data[k] for k in steps.MODEL_INPUT_KEYS}, mesh)]
  else:
    fn = programs.make_detect_fn(
      MaskRCNN(model_spec(size, head, data_parallel=False, **spec_kwargs)),
      mesh,
      paint_only=spec_kwargs.get('paint_slots_per_class', 0) > 0,
    )
    args = [steps.model_variables(state), parallel.shard_batch(data['image'], mesh)]

  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  host_memory.release_freed_memory()  # as the trainer does (steps.compile_together)
  compiled_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  plan = compiled.memory_analysis()
  plan_mb = (plan.argument_size_in_bytes + plan.temp_size_in_bytes) / 2**20

  def call() -> dict[str, float]:
    out = compiled(*args)
    if mode == 'train':
      args[0], metrics = out  # the state is donated: carry the new one
      metrics = jax.device_get(metrics)
      return {
        'loss': float(metrics['loss']),
        'positive_rois_per_image': float(metrics['num_positive_rois']),
      }
    out = jax.device_get(out)
    return {'detections': float(np.mean(np.sum(out['valid'], axis=1)))}

  start = time.perf_counter()
  first = call()
  first_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    call()
  wall, cpu, infos = [], [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    infos.append(call())
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  result = {
    'framework': 'ours',
    'versions': f'jax {jax.__version__}',
    'compile_s': compile_s,
    'first_s': first_s,
    'step_s': wall,
    'cpu_s': cpu,
    'median_s': statistics.median(wall),
    'median_cpu_s': statistics.median(cpu),
    'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    'compiled_rss_mb': compiled_rss_mb,
    'plan_mb': plan_mb,
    'first': first,
    'last': infos[-1] if infos else first,
  }
  if mode == 'train':
    result['positive_rois_per_image'] = [first['positive_rois_per_image']] + [
      i['positive_rois_per_image'] for i in infos
    ]
  return result


# ------------------------------------------------------------------ JAX: the step's pieces
PIECES = (
  'backbone + FPN',
  'RPN head',
  'RPN targets + losses',
  'proposals (top-k, NMS)',
  'ROI sampling',
  'ROIAlign 7x7',
  'box head + losses',
  'ROIAlign 14x14 (mask ROIs)',
  'mask targets',
  'mask head + loss',
  'Adam update',
)


def jax_pieces(
  data_path: str, head: str, warmup: int, repeats: int, spec_kwargs: dict[str, int]
) -> dict:
  """Times each part of our training step as its own jitted function, on the real values.

  Parts with parameters or inputs that receive gradients run forward + backward (a `jax.vjp`
  fed a fixed random cotangent, so that XLA cannot fold it); the target and proposal parts
  run forward only, as in the step. The whole step is timed in the same process for
  comparison: the parts' sum differs from it by what fusion across parts saves and by the
  glue (reshapes, gathers) between them.
  """
  import resource

  import jax
  import jax.numpy as jnp
  import optax

  from imask_jax import parallel
  from imask_jax.models.mask_rcnn import MaskRCNN
  from imask_jax.training import steps

  data = {k: jnp.asarray(v) for k, v in np.load(data_path).items() if k in steps.MODEL_INPUT_KEYS}
  b, size = data['image'].shape[:2]
  spec = model_spec(size, head, data_parallel=False, **spec_kwargs)
  model = MaskRCNN(spec)
  tx = optax.adam(LEARNING_RATE)
  state = steps.init_state(model, tx, SEED)
  params, stats = state.params, state.batch_stats
  keys = steps.example_keys(SEED, jnp.int32(0), jnp.int32(0), b)
  split = jax.vmap(jax.random.split)(keys)
  rpn_keys, roi_keys = split[:, 0], split[:, 1]
  gt_boxes, gt_valid = data['gt_boxes'], data['gt_valid']
  gt_classes = data['gt_classes'].astype(jnp.int32)
  p = spec.num_mask_rois
  cot_key = [jax.random.PRNGKey(1)]

  def on_model(fn, sub: str | None = None):
    """fn(module, *args) run as a method of the model; with `sub`, that parameter subtree
    becomes the first argument (the one differentiated)."""
    if sub is None:
      return lambda *a: model.apply({'params': params, 'batch_stats': stats}, *a, method=fn)
    return lambda sub_params, *a: model.apply(
      {'params': {**params, sub: sub_params}, 'batch_stats': stats}, *a, method=fn
    )

  def with_backward(fn, args: tuple, num_diff: int):
    """Forward + backward of `fn` w.r.t. its first `num_diff` arguments."""
    out_shape = jax.eval_shape(fn, *args)
    cot_key[0], key = jax.random.split(cot_key[0])
    leaves, treedef = jax.tree.flatten(out_shape)
    cot = jax.tree.unflatten(
      treedef,
      [
        jax.random.normal(k, leaf.shape, leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
        else jnp.zeros(leaf.shape, leaf.dtype)
        for k, leaf in zip(jax.random.split(key, len(leaves)), leaves)
      ],
    )

    def run(*args):
      out, pullback = jax.vjp(lambda *d: fn(*d, *args[num_diff:]), *args[:num_diff])
      return out, pullback(cot)

    return run

  times: dict[str, dict[str, float]] = {}

  def measure(name: str, fn, *args, num_diff: int = 0):
    """Times `fn(*args)` (with its backward when num_diff > 0); returns its forward value."""
    timed = jax.jit(with_backward(fn, args, num_diff) if num_diff else fn)
    compiled = timed.lower(*args).compile()
    for _ in range(warmup):
      jax.block_until_ready(compiled(*args))
    wall, cpu = [], []
    for _ in range(repeats):
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled(*args))
      wall.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
    times[name] = {'median_s': statistics.median(wall), 'median_cpu_s': statistics.median(cpu)}
    print(f'[{name}: {times[name]["median_s"]:.3f} s]', file=sys.stderr, flush=True)
    return jax.jit(fn)(*args)

  def pyramid_fn(bb, images):
    out, _ = model.apply(
      {'params': {**params, 'backbone': bb}, 'batch_stats': stats},
      images,
      True,
      method=MaskRCNN.pyramid,
      mutable=['batch_stats'],
    )
    return out

  pyramid = measure(PIECES[0], pyramid_fn, params['backbone'], data['image'], num_diff=1)
  rpn_logits, rpn_deltas = measure(
    PIECES[1], on_model(MaskRCNN.rpn, 'rpn_head'), params['rpn_head'], pyramid, num_diff=2
  )
  measure(
    PIECES[2],
    on_model(lambda m, *a: sum(m.rpn_losses(*a))),
    rpn_logits,
    rpn_deltas,
    gt_boxes,
    gt_valid,
    rpn_keys,
    num_diff=2,
  )
  proposals, proposal_valid = measure(
    PIECES[3],
    on_model(lambda m, logits, deltas: m.proposals(logits, deltas, train=True)),
    rpn_logits,
    rpn_deltas,
  )
  roi_t = measure(
    PIECES[4],
    on_model(MaskRCNN.sample_rois),
    proposals,
    proposal_valid,
    gt_boxes,
    gt_classes,
    gt_valid,
    roi_keys,
  )
  box_feats = measure(
    PIECES[5],
    on_model(lambda m, pyr, r: m.roi_features(pyr, r, 7)),
    pyramid,
    roi_t.rois,
    num_diff=1,
  )
  measure(
    PIECES[6],
    on_model(lambda m, feats, t: sum(m.box_losses(feats, t)), 'box_head'),
    params['box_head'],
    box_feats,
    roi_t,
    num_diff=2,
  )
  mask_feats = measure(
    PIECES[7],
    on_model(lambda m, pyr, r: m.roi_features(pyr, r, 14)),
    pyramid,
    roi_t.rois[:, :p],
    num_diff=1,
  )
  mask_targets = measure(PIECES[8], on_model(MaskRCNN.mask_targets), data['gt_masks'], roi_t)
  measure(
    PIECES[9],
    on_model(
      lambda m, feats, pyr, t, targets: sum(m.mask_losses(pyr, t, targets, feats).values()),
      'mask_head',
    ),
    params['mask_head'],
    mask_feats,
    pyramid,
    roi_t,
    mask_targets,
    num_diff=3,
  )

  def adam(grads, opt_state, values):
    updates, opt_state = tx.update(grads, opt_state, values)
    return optax.apply_updates(values, updates), opt_state

  measure(
    PIECES[10],
    adam,
    jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params),
    state.opt_state,
    params,
  )

  # The whole step, as in jax_worker, for comparison.
  mesh = parallel.data_mesh()
  whole_model = MaskRCNN(model_spec(size, head, data_parallel=True, **spec_kwargs))
  step = steps.make_train_step(whole_model, tx, mesh, SEED)
  args = [
    parallel.replicate(state, mesh),
    parallel.shard_batch({k: np.asarray(v) for k, v in data.items()}, mesh),
  ]
  compiled = step.lower(*args).compile()
  wall, cpu = [], []
  for i in range(warmup + repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    args[0], metrics = compiled(*args)
    jax.block_until_ready(metrics)
    if i >= warmup:
      wall.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
  return {
    'pieces': times,
    'whole': {'median_s': statistics.median(wall), 'median_cpu_s': statistics.median(cpu)},
    'versions': f'jax {jax.__version__}',
    'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


# ------------------------------------------------------------------------- orchestration
def run_worker(
  framework: str, head: str, mode: str, data_path: Path, args: argparse.Namespace, repeats: int
) -> dict | None:
  """Runs one configuration in a fresh process; its JSON result, or None (reason printed).

  mode: 'train', 'infer' or 'pieces' (ours only: `jax_pieces`).
  """
  if framework == 'torchvision':
    if not TORCH_PYTHON.exists():
      print(f'[torchvision skipped: {TORCH_PYTHON} not found]', flush=True)
      return None
    cmd = [
      str(TORCH_PYTHON),
      str(TORCH_WORKER),
      str(data_path),
      mode,
      str(args.warmup),
      str(repeats),
      str(THREADS),
    ]
  else:
    cmd = [
      str(JAX_PYTHON),
      str(Path(__file__).resolve()),
      '--worker',
      head,
      '--mode',
      mode,
      '--data',
      str(data_path),
      '--warmup',
      str(args.warmup),
      '--repeats',
      str(repeats),
      '--mask_rois',
      str(args.mask_rois),
      '--fine_dim',
      str(args.fine_dim),
      '--fuse_convs',
      str(args.fuse_convs),
      '--paint_slots',
      str(args.paint_slots),
    ] + (['--remat'] if args.remat else [])
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  try:
    proc = subprocess.run(
      cmd, capture_output=True, text=True, env=env, check=False, timeout=args.timeout
    )
  except subprocess.TimeoutExpired:
    print(f'[{framework} {head} {mode}: no result within {args.timeout:.0f} s]', flush=True)
    return None
  lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
  if proc.returncode != 0 or not lines:
    print(
      f'[{framework} {head} {mode} failed (exit {proc.returncode})]\n{proc.stderr[-3000:]}',
      flush=True,
    )
    return None
  return json.loads(lines[-1])


def combine_rounds(runs: list[dict | None]) -> dict | None:
  """One result from several rounds of a configuration: medians of the per-round medians
  (and of the compile and first-call times), the highest peak RSS, all positive counts."""
  runs = [r for r in runs if r is not None]
  if not runs:
    return None
  out = dict(runs[-1])
  for key in ('median_s', 'median_cpu_s', 'first_s', 'compile_s'):
    values = [r[key] for r in runs if r.get(key) is not None]
    out[key] = statistics.median(values) if values else None
  out['peak_rss_mb'] = max(r['peak_rss_mb'] for r in runs)
  if 'positive_rois_per_image' in runs[0]:
    out['positive_rois_per_image'] = [v for r in runs for v in r['positive_rois_per_image']]
  out['rounds'] = len(runs)
  return out


def configurations(no_torch: bool, heads: list[str]) -> list[tuple[str, str]]:
  """(framework, head) pairs, torchvision first."""
  pairs = [] if no_torch else [('torchvision', 'standard')]
  return pairs + [('ours', head) for head in HEADS if head in heads]


def ratio(a: dict | None, b: dict | None, key: str = 'median_s') -> float | None:
  if a is None or b is None or not b.get(key):
    return None
  return a[key] / b[key]


def fmt(value: float | None, spec: str) -> str:
  return '-' if value is None else format(value, spec)


HEADER = [
  'batch',
  'mode',
  'model',
  'compile s',
  'first s',
  'median s',
  'CPU s',
  'img/s',
  'peak RSS MiB',
  'RSS after compile MiB',
  'XLA plan MiB',
  'pos ROIs',
  'x torchvision',
  'imask / std',
]


def table_rows(
  results: dict[tuple[int, str, str, str], dict | None], size: int, batch: int
) -> list[list[str]]:
  """Rows of the comparison table for one image size (columns: `HEADER`)."""
  rows = []
  for mode in MODES:
    torch_r = results.get((size, mode, 'torchvision', 'standard'))
    standard_r = results.get((size, mode, 'ours', 'standard'))
    for framework, head in (('torchvision', 'standard'), ('ours', 'standard'), ('ours', 'imask')):
      if (size, mode, framework, head) not in results:
        continue
      r = results[(size, mode, framework, head)]
      name = 'torchvision' if framework == 'torchvision' else f'ours {head}'
      if r is None:
        rows.append([f'{batch}x{size}', mode, name, 'failed'] + ['-'] * (len(HEADER) - 4))
        continue
      positives = r.get('positive_rois_per_image')
      rows.append(
        [
          f'{batch}x{size}',
          mode,
          name,
          fmt(r['compile_s'], '.1f'),
          fmt(r['first_s'], '.2f'),
          fmt(r['median_s'], '.2f'),
          fmt(r['median_cpu_s'], '.2f'),
          fmt(batch / r['median_s'], '.2f'),
          fmt(r['peak_rss_mb'], '.0f'),
          fmt(r.get('compiled_rss_mb'), '.0f'),
          fmt(r.get('plan_mb'), '.0f'),
          '-' if not positives else f'{statistics.median(positives):.0f}',
          fmt(ratio(r, torch_r) if framework == 'ours' else None, '.2f'),
          fmt(ratio(r, standard_r) if head == 'imask' else None, '.2f'),
        ]
      )
  return rows


def pieces_rows(
  results: dict[tuple[int, str], dict | None], sizes: list[int], heads: list[str]
) -> tuple[list[str], list[list[str]]]:
  """Header and rows of the pieces table: wall ms (CPU ms) per piece, size and head."""
  columns = [(size, head) for size in sizes for head in heads]
  header = ['piece'] + [f'{head} {size} ms (CPU)' for size, head in columns]

  def cell(entry: dict | None) -> str:
    if entry is None:
      return '-'
    return f'{entry["median_s"] * 1e3:.0f} ({entry["median_cpu_s"] * 1e3:.0f})'

  rows = []
  for piece in PIECES:
    rows.append(
      [piece] + [cell((results.get(c) or {}).get('pieces', {}).get(piece)) for c in columns]
    )
  sums = []
  for c in columns:
    r = results.get(c)
    if r is None:
      sums.append('-')
      continue
    sums.append(
      cell({k: sum(v[k] for v in r['pieces'].values()) for k in ('median_s', 'median_cpu_s')})
    )
  rows.append(['sum of the pieces'] + sums)
  rows.append(['whole train step'] + [cell((results.get(c) or {}).get('whole')) for c in columns])
  return header, rows


def print_table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
  if markdown:
    print('| ' + ' | '.join(header) + ' |')
    print('| ' + ' | '.join(['---'] + ['---:'] * (len(header) - 1)) + ' |')
    for row in rows:
      print('| ' + ' | '.join(row) + ' |')
    return
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  for row in [header] + rows:
    print('  '.join(c.rjust(w) for c, w in zip(row, widths)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[256, 512])
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
  parser.add_argument(
    '--heads', nargs='+', choices=HEADS, default=list(HEADS), help='our mask heads to time'
  )
  parser.add_argument('--warmup', type=int, default=1, help='calls before timing (>= 1)')
  parser.add_argument('--repeats', type=int, default=3, help='timed calls of ours')
  parser.add_argument('--torch_repeats', type=int, default=5, help='timed calls of torch')
  parser.add_argument(
    '--rounds',
    type=int,
    default=1,
    help='run every configuration this many times, interleaved; the table '
    "gives the median of the rounds' medians",
  )
  parser.add_argument(
    '--mask_rois',
    type=int,
    default=MASK_ROIS_PER_IMAGE,
    help='ours: mask-head ROI slots per image in training',
  )
  parser.add_argument('--fine_dim', type=int, default=FINE_DIM, help='ours: imask fine_dim')
  parser.add_argument(
    '--fuse_convs', type=int, default=FUSE_CONVS, help='ours: imask 3x3 fusion convs'
  )
  parser.add_argument(
    '--paint_slots',
    type=int,
    default=0,
    help='ours, infer: run the mask head only on the painting detections, this many per class '
    '(model.paint_slots_per_class; 0 = on all --max detections, as torchvision does)',
  )
  parser.add_argument(
    '--remat',
    action='store_true',
    help="ours: recompute the backbone's activations in the backward pass (model.remat)",
  )
  parser.add_argument(
    '--pieces',
    action='store_true',
    help='instead of the comparison, time the pieces of our train step',
  )
  parser.add_argument(
    '--timeout', type=float, default=3600.0, help="seconds allowed to each configuration's process"
  )
  parser.add_argument('--no_torch', action='store_true', help='leave torchvision out')
  parser.add_argument('--markdown', action='store_true', help='print Markdown tables')
  parser.add_argument('--json', type=str, default='', help='also write all results here')
  # Internal: run one configuration of ours in this process and print its JSON.
  parser.add_argument('--worker', choices=HEADS, help=argparse.SUPPRESS)
  parser.add_argument('--mode', choices=MODES + ('pieces',), help=argparse.SUPPRESS)
  parser.add_argument('--data', type=str, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if min(args.warmup, args.repeats, args.torch_repeats, args.rounds) < 1:
    parser.error('--warmup, --repeats, --torch_repeats and --rounds must be >= 1')

  pin_threads()
  spec_kwargs = dict(
    mask_rois_per_image=args.mask_rois,
    fine_dim=args.fine_dim,
    fuse_convs=args.fuse_convs,
    paint_slots_per_class=args.paint_slots,
    remat=args.remat,
  )
  if args.worker:
    sys.path.insert(0, str(REPO))
    if args.mode == 'pieces':
      result = jax_pieces(args.data, args.worker, args.warmup, args.repeats, spec_kwargs)
    else:
      result = jax_worker(args.data, args.worker, args.mode, args.warmup, args.repeats, spec_kwargs)
    print(json.dumps(result))
    return

  runs: dict[tuple, list[dict | None]] = {}
  versions: dict[str, str] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for round_index in range(args.rounds):
      for size in args.sizes:
        data_path = Path(tmp) / f'batch_{size}.npz'
        if round_index == 0:
          np.savez(data_path, **synthetic_batch(args.batch, size), **torch_settings())
        if args.pieces:
          jobs = [(('pieces',), 'ours', head) for head in args.heads]
        else:
          jobs = [
            ((mode,), framework, head)
            for mode in args.modes
            for framework, head in configurations(args.no_torch, args.heads)
          ]
        for (mode,), framework, head in jobs:
          repeats = args.torch_repeats if framework == 'torchvision' else args.repeats
          started = time.perf_counter()
          r = run_worker(framework, head, mode, data_path, args, repeats)
          key = (size, head) if args.pieces else (size, mode, framework, head)
          runs.setdefault(key, []).append(r)
          if r is not None:
            versions[framework] = r['versions']
          summary = (
            'failed'
            if r is None
            else (
              f'whole step {r["whole"]["median_s"]:.2f} s'
              if args.pieces
              else f'median {r["median_s"]:.2f} s'
            )
          )
          print(
            f'[round {round_index + 1}: {size} {mode} {framework} {head}: {summary}, '
            f'process {time.perf_counter() - started:.0f} s]',
            flush=True,
          )

  print(
    f'# {datetime.date.today()}  {"  ".join(versions.values())}  {THREADS} threads  '
    f'batch {args.batch}  mask ROIs/image {args.mask_rois}  imask fine_dim '
    f'{args.fine_dim}, {args.fuse_convs} fusion conv(s)  paint slots/class {args.paint_slots}  '
    f'remat {"on" if args.remat else "off"}  '
    f'warmup {args.warmup}, median of '
    f'{args.repeats} (torchvision {args.torch_repeats}), {args.rounds} round(s)  '
    f'load average {os.getloadavg()[0]:.1f}'
  )
  if args.pieces:
    results = {k: (v[-1] if v[-1] is not None else None) for k, v in runs.items()}
    print_table(*pieces_rows(results, args.sizes, args.heads), args.markdown)
  else:
    results = {k: combine_rounds(v) for k, v in runs.items()}
    rows = [row for size in args.sizes for row in table_rows(results, size, args.batch)]
    print_table(HEADER, rows, args.markdown)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump([{'key': list(k), 'runs': v} for k, v in runs.items()], f, indent=1)


if __name__ == '__main__':
  main()
