"""Training: state, the data-parallel step, the loop, validation, checkpoints and logs.

`train_and_evaluate(config, workdir)` is the whole main job. Layout of a workdir:

  config.json       the resolved config (evaluation and prediction read it from here)
  checkpoints/      orbax CheckpointManager: the latest and the best by validation Dice
  metrics.jsonl     one JSON object per logged step and per validation, for scripts
  tensorboard/      losses, learning rate, step time, slices/s, validation Dice and overlays

The step is per-device code in `jax.shard_map` inside `jax.jit` over the 1-D `data` mesh
(pmap semantics; see parallel.py): gradients, losses and batch statistics are averaged with
`lax.pmean`. Randomness is a pure function of (seed, step, global example index), so a run
is repeatable, independent of the device count, and resumes exactly after a kill.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import PartitionSpec as P

from data_pipelines.atomic import atomic_path
from imask_jax import optim, parallel
from imask_jax.models import mask_rcnn
from imask_jax.models.mask_rcnn import MaskRCNN, ModelSpec

MODEL_INPUT_KEYS = ('image', 'gt_boxes', 'gt_classes', 'gt_masks', 'gt_valid')


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: updates applied or skipped so far
  params: Any
  batch_stats: Any                # {} unless the backbone uses batch norm
  opt_state: Any
  nonfinite_in_a_row: jax.Array   # int32: consecutive skipped (non-finite) updates
  nonfinite_total: jax.Array      # int32


class NonFiniteLossError(RuntimeError):
  pass


# --- model and state -----------------------------------------------------------------------------

def build_model(config: ml_collections.ConfigDict, *, data_parallel: bool = True) -> MaskRCNN:
  """The model of `config`; batch norm averages its statistics over the `data` axis."""
  axis = parallel.DATA_AXIS if data_parallel and config.model.norm == 'batch' else None
  return MaskRCNN(ModelSpec.from_config(config, axis_name=axis))


def init_state(model: MaskRCNN, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Fresh state on the host (the same on every process: it depends only on the seed)."""
  variables = jax.jit(functools.partial(mask_rcnn.init_variables, model))(
      jax.random.PRNGKey(seed))
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params),
                    nonfinite_in_a_row=jnp.zeros((), jnp.int32),
                    nonfinite_total=jnp.zeros((), jnp.int32))


def example_keys(seed: int, step: jax.Array, first_index: jax.Array, count: int) -> jax.Array:
  """[count] PRNG keys of examples first_index .. first_index + count - 1 of a step's batch."""
  step_key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
      first_index + jnp.arange(count, dtype=jnp.int32))


def make_train_step(model: MaskRCNN, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    seed: int):
  """jit(shard_map(per-device step)): (state, batch) -> (state, metrics), state donated."""

  def per_device(state: TrainState, batch: dict[str, jax.Array]):
    local = batch['image'].shape[0]
    first = jax.lax.axis_index(parallel.DATA_AXIS) * local
    keys = example_keys(seed, state.step, first, local)
    targets = {k: batch[k] for k in ('gt_boxes', 'gt_classes', 'gt_masks', 'gt_valid')}

    def loss_fn(params):
      variables = {'params': params}
      if state.batch_stats:
        variables['batch_stats'] = state.batch_stats
      (loss, terms), updates = model.apply(variables, batch['image'], targets, keys, True,
                                           method=MaskRCNN.losses, mutable=['batch_stats'])
      return loss, (terms, updates)

    (loss, (terms, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads, loss, terms = jax.lax.pmean((grads, loss, terms), parallel.DATA_AXIS)
    batch_stats = jax.lax.pmean(updates.get('batch_stats', state.batch_stats),
                                parallel.DATA_AXIS)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing but the counters (the update is computed on zeros so
    # that no NaN reaches the optimiser's moments).
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates_, opt_state = tx.update(safe_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates_)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_in_a_row=in_a_row,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    metrics = dict(terms, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                   nonfinite_in_a_row=in_a_row)
    return new_state, metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                          out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=0)


def make_detect_fn(model: MaskRCNN, mesh: jax.sharding.Mesh):
  """jit(shard_map(detect + paste)): (variables, images [N, H, W, C]) -> dict of per-example
  arrays: label_map int32 [N, H, W] (class ids), boxes, scores, classes, valid, mask_probs."""

  def per_device(variables, images):
    det = model.apply(variables, images, method=MaskRCNN.detect)
    label_map, _ = mask_rcnn.detections_to_label_map(det, model.spec.image_size)
    return dict(label_map=label_map, boxes=det.boxes, scores=det.scores, classes=det.classes,
                valid=det.valid, mask_probs=det.mask_probs)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                               out_specs=P(parallel.DATA_AXIS), check_vma=False))


def model_variables(state: TrainState) -> dict[str, Any]:
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


# --- validation ----------------------------------------------------------------------------------

def gt_label_map(gt_classes: np.ndarray, gt_masks: np.ndarray, gt_valid: np.ndarray) -> np.ndarray:
  """[N, M] classes, [N, M, H, W] masks, [N, M] valid -> [N, H, W] class-id label maps."""
  masks = gt_masks.astype(bool) & gt_valid[..., None, None]
  label = np.zeros(masks.shape[:1] + masks.shape[2:], np.int32)
  for m in range(masks.shape[1]):
    label = np.where(masks[:, m], gt_classes[:, m, None, None], label)
  return label


def slice_dice(detect_fn, variables, eval_ds, mesh, num_classes: int
               ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Pooled mask Dice per class over every valid slice of `eval_ds`.

  Returns ({'val/dice_<c>': ..., 'val/dice_mean': ...}, one example batch for overlays).
  """
  inter = np.zeros(num_classes)
  pred_sum = np.zeros(num_classes)
  true_sum = np.zeros(num_classes)
  example = None
  for batch in eval_ds:
    images = parallel.shard_batch(batch['image'], mesh)
    out = jax.device_get(detect_fn(variables, images))
    flat = {k: np.asarray(v).reshape((-1,) + np.asarray(v).shape[2:]) for k, v in batch.items()
            if k in ('gt_classes', 'gt_masks', 'gt_valid', 'example_valid', 'image')}
    ok = flat['example_valid']
    truth = gt_label_map(flat['gt_classes'], flat['gt_masks'], flat['gt_valid'])[ok]
    pred = np.asarray(out['label_map'])[ok]
    for c in range(1, num_classes + 1):
      t, p = truth == c, pred == c
      inter[c - 1] += np.sum(t & p)
      pred_sum[c - 1] += np.sum(p)
      true_sum[c - 1] += np.sum(t)
    if example is None and ok.any():
      example = dict(image=flat['image'][ok], truth=truth, pred=pred)
  denom = pred_sum + true_sum
  dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
  return dice, example


# --- checkpoints ---------------------------------------------------------------------------------

def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(int(config.train.keep_checkpoints)),
      pp.BestN(get_metric_fn=lambda m: m[config.train.best_metric], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_names=('state',))


def restore_state(manager: ocp.CheckpointManager, template: TrainState, mesh,
                  step: int | None = None) -> TrainState:
  """Restores a checkpoint onto this run's devices (whatever device count saved it)."""
  step = manager.latest_step() if step is None else step
  sharding = parallel.replicated(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                         sharding=sharding), template)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return restored['state']


# --- logs ----------------------------------------------------------------------------------------

class RunLog:
  """metrics.jsonl + TensorBoard + a progress line; only process 0 writes."""

  def __init__(self, workdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if self.enabled:
      import tensorflow as tf  # TensorBoard summaries only; input_pipeline hid the GPUs.
      self.tf = tf
      self.writer = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in values.items()}}) + '\n')
    with self.writer.as_default(step=int(step)):
      for k, v in values.items():
        self.tf.summary.scalar(k, float(v))
    self.writer.flush()

  def image(self, step: int, name: str, picture: np.ndarray) -> None:
    if self.enabled:
      with self.writer.as_default(step=int(step)):
        self.tf.summary.image(name, picture[None])
      self.writer.flush()

  def progress(self, step: int, loss: float, rate: float, lr: float, started: float,
               first_step: int) -> None:
    if not self.enabled:
      return
    done = step - first_step
    elapsed = time.time() - started
    eta = elapsed / max(done, 1) * (self.total_steps - step)
    logging.info('step %d/%d  loss %.4f  lr %.2e  %.1f slices/s  ETA %s', step,
                 self.total_steps, loss, lr, rate, _duration(eta))
    print(f'step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.2e}  '
          f'{rate:.1f} slices/s  ETA {_duration(eta)}', flush=True)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'


def overlay_picture(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """RGB [H, W, 3] uint8 in the paper's colour code: green = truth only, red = model only,
  blue = both; grey image elsewhere."""
  grey = image[..., image.shape[-1] // 2]
  grey = np.clip(grey, 0.0, 1.0)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  t, p = truth > 0, pred > 0
  rgb[t & ~p] = 0.5 * rgb[t & ~p] + 0.5 * np.array([0.0, 1.0, 0.0])
  rgb[p & ~t] = 0.5 * rgb[p & ~t] + 0.5 * np.array([1.0, 0.0, 0.0])
  rgb[t & p] = 0.5 * rgb[t & p] + 0.5 * np.array([0.0, 0.3, 1.0])
  return (rgb * 255).astype(np.uint8)


# --- the main job --------------------------------------------------------------------------------

def data_dir_for(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where TFDS datasets live: data.data_dir, else $IMASK_DATA_DIR, else beside the workdir
  (so the runs of a sweep share one prepared dataset)."""
  if config.data.data_dir:
    return config.data.data_dir
  return os.environ.get('IMASK_DATA_DIR') or os.path.join(
      os.path.dirname(os.path.abspath(workdir.rstrip('/'))), 'tfds')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with atomic_path(os.path.join(workdir, 'config.json')) as tmp:
    with open(tmp, 'w') as f:
      f.write(config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no config.json in the workdir; is {workdir!r} a '
                            'training workdir (made by python -m imask_jax.main)?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one."""
  from imask_jax import input_pipeline  # imported here: it configures TensorFlow
  save_config(config, workdir)
  data_dir = data_dir_for(config, workdir)
  mesh = parallel.data_mesh()
  model = build_model(config)
  tx = optim.make_optimizer(config.train)
  schedule = optim.learning_rate_schedule(config.train)
  seed = int(config.seed)

  state = init_state(model, tx, seed)
  manager = checkpoint_manager(workdir, config)
  if manager.latest_step() is not None:
    state = restore_state(manager, state, mesh)
    logging.info('resumed from step %d', int(state.step))
  else:
    state = parallel.replicate(state, mesh)
  start = int(jax.device_get(state.step))
  total = int(config.train.steps)

  train_step = make_train_step(model, tx, mesh, seed)
  detect_fn = make_detect_fn(build_model(config, data_parallel=False), mesh)
  train_iter = input_pipeline.create_train_dataset(config, data_dir, seed=seed,
                                                   start_step=start)
  val_ds = input_pipeline.create_eval_dataset(config, data_dir, 'validation',
                                              max_examples=int(config.eval.max_val_slices))
  log = RunLog(workdir, total)
  class_names = list(config.data.class_names)

  def validate(step: int) -> dict[str, float]:
    dice, example = slice_dice(detect_fn, model_variables(state), val_ds, mesh,
                               int(config.model.num_classes))
    values = {f'val/dice_{name}': float(d) for name, d in zip(class_names, dice)}
    values['val/dice_mean'] = float(np.mean(dice))
    log.scalars(step, values)
    if example is not None:
      log.image(step, 'val/overlay', overlay_picture(example['image'][0], example['truth'][0],
                                                     example['pred'][0]))
    print('validation @ %d: ' % step + '  '.join(f'{k[4:]} {v:.3f}' for k, v in values.items()),
          flush=True)
    return values

  started, window_start, window_steps = time.time(), time.time(), 0
  step = start
  global_batch = int(config.train.batch_size)
  while step < total:
    batch = next(train_iter)
    batch = parallel.shard_batch({k: batch[k] for k in MODEL_INPUT_KEYS}, mesh)
    state, metrics = train_step(state, batch)
    step += 1
    window_steps += 1
    in_a_row = int(metrics['nonfinite_in_a_row'])
    if in_a_row >= int(config.train.max_nonfinite_in_a_row):
      manager.wait_until_finished()
      raise NonFiniteLossError(
          f'{in_a_row} non-finite losses or gradients in a row at step {step}: training '
          f'stopped; the last good checkpoint (step {manager.latest_step()}) is kept in '
          f'{workdir}/checkpoints. Lower train.learning_rate or check the data.')
    if step % int(config.train.log_every) == 0 or step == total:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.time() - window_start
      values['slices_per_second'] = window_steps * global_batch / max(elapsed, 1e-9)
      values['step_time'] = elapsed / max(window_steps, 1)
      values['learning_rate'] = float(schedule(step))
      values['nonfinite_total'] = float(jax.device_get(state.nonfinite_total))
      log.scalars(step, {f'train/{k}': v for k, v in values.items()})
      log.progress(step, values['loss'], values['slices_per_second'], values['learning_rate'],
                   started, start)
      window_start, window_steps = time.time(), 0
    eval_now = step % int(config.train.eval_every) == 0 or step == total
    save_now = eval_now or step % int(config.train.checkpoint_every) == 0
    if save_now:
      val = validate(step) if eval_now else None
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                   metrics=val)
  manager.wait_until_finished()
  return state
