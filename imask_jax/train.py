"""Training: state, the data-parallel step, the loop, validation, checkpoints and logs.

`train_and_evaluate(config, workdir)` is the whole main job. Layout of a workdir:

  config.json       the resolved config (train.steps made concrete; evaluation and prediction
                    read it from here with `load_config`, tuples intact)
  checkpoints/      orbax CheckpointManager: the latest `train.keep_checkpoints` steps and the
                    best by `train.best_metric` (validation Dice); `manager.best_step()` names it
  metrics.jsonl     one JSON object per logged step and per validation, for scripts
  tensorboard/      losses, learning rate, step time, slices/s, validation Dice and overlays

The step is per-device code in `jax.shard_map` inside `jax.jit` over the 1-D `data` mesh
(pmap semantics; see parallel.py): gradients, losses and batch statistics are averaged with
`lax.pmean`. Randomness is a pure function of (seed, step, global example index), so a run
is repeatable, independent of the device count, and resumes exactly after a kill: the
input stream restarts at the restored step and metrics.jsonl is cut back to it.

A step whose loss or gradient is not finite changes nothing but two counters (it is skipped);
`train.max_nonfinite_in_a_row` skipped steps in a row stop the run with `NonFiniteLossError`,
leaving the checkpoints as they were. The host reads each step's counter one step late, so
the device always has the next step queued (the only per-step host sync).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import textwrap
import time
from collections.abc import Sequence
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
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_policy

from data_pipelines.atomic import atomic_path
from data_pipelines.datasets import params as dataset_params
from imask_jax import configs, optim, parallel
from imask_jax.models import mask_rcnn
from imask_jax.models.mask_rcnn import MaskRCNN, ModelSpec

MODEL_INPUT_KEYS = ('image', 'gt_boxes', 'gt_classes', 'gt_masks', 'gt_valid')
DOCS_DATA = 'docs/data.md'


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: updates applied or skipped so far
  params: Any
  batch_stats: Any                # {} unless the backbone uses batch norm
  opt_state: Any
  nonfinite_in_a_row: jax.Array   # int32: consecutive skipped (non-finite) updates
  nonfinite_total: jax.Array      # int32


class NonFiniteLossError(RuntimeError):
  """Training stopped after train.max_nonfinite_in_a_row non-finite steps in a row."""


class DataMissingError(FileNotFoundError):
  """An experiment's raw data folder is missing; the message says where and what to do."""


# --- config --------------------------------------------------------------------------------------

def validation_metric_names(config: ml_collections.ConfigDict) -> list[str]:
  """The keys `validate` reports: 'val/dice_<class name>' per class and 'val/dice_mean'."""
  return [f'val/dice_{name}' for name in config.data.class_names] + ['val/dice_mean']


def check_train_config(config: ml_collections.ConfigDict) -> None:
  """Rejects training settings the loop cannot honour, naming the field and what is expected."""
  t = config.train
  for name in ('batch_size', 'log_every', 'checkpoint_every', 'eval_every', 'keep_checkpoints',
               'max_nonfinite_in_a_row'):
    if int(t[name]) < 1:
      raise ValueError(f'config train.{name}={t[name]}; expected an integer >= 1')
  if float(t.epochs) < 0 or (float(t.epochs) == 0 and int(t.steps) < 1):
    raise ValueError(f'config train.steps={t.steps}, train.epochs={t.epochs}; expected '
                     'steps >= 1, or epochs > 0 (steps then follow from the dataset size)')
  names = list(config.data.class_names)
  if not len(names) == int(config.model.num_classes) == len(config.data.class_label_values):
    raise ValueError(f'config data.class_names={tuple(names)}, data.class_label_values='
                     f'{tuple(config.data.class_label_values)}, model.num_classes='
                     f'{config.model.num_classes}; expected one label value per class and '
                     'num_classes = the number of classes')
  if t.best_metric not in validation_metric_names(config):
    raise ValueError(f'config train.best_metric={t.best_metric!r}; expected one of '
                     f'{validation_metric_names(config)}')


def resolve_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """train.steps, or with train.epochs > 0: ceil(epochs * train slices / global batch)."""
  epochs = float(config.train.epochs)
  if epochs <= 0:
    return int(config.train.steps)
  return max(1, math.ceil(epochs * num_train_examples / int(config.train.batch_size)))


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs use (recursively; dicts stay dicts)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config to workdir/config.json (process 0; atomic). A resumed run
  with different settings overwrites it and says which fields changed."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    changed = changed_fields(load_config(workdir).to_dict(), config.to_dict())
    if changed:
      logging.warning('%s: this run changes %s', path, '; '.join(changed))
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      f.write(config.to_json(indent=2))


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = '') -> list[str]:
  """'path: old -> new' for every field of two config dicts that differs (tuples = lists)."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += changed_fields(a, b, f'{prefix}{key}.')
    elif _tuples(a) != _tuples(b):
      out.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return out


# Settings a checkpoint's arrays depend on: a run may resume only if these are unchanged.
STATE_SHAPING_FIELDS = ('model', 'data.image_size', 'data.context_slices', 'train.optimizer',
                        'train.grad_clip_norm', 'train.weight_decay')


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoints were made with another model or optimiser
  (restoring them would fail deep inside orbax, or silently misfit)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')) or not os.path.exists(
      os.path.join(workdir, 'config.json')):
    return
  old, new = load_config(workdir).to_dict(), config.to_dict()

  def get(tree, path):
    for part in path.split('.'):
      tree = tree.get(part) if isinstance(tree, dict) else None
    return tree

  changed = []
  for path in STATE_SHAPING_FIELDS:
    a, b = get(old, path), get(new, path)
    if isinstance(a, dict) and isinstance(b, dict):
      changed += changed_fields(a, b, path + '.')
    elif _tuples(a) != _tuples(b):
      changed.append(f'{path}: {a!r} -> {b!r}')
  if changed:
    raise ValueError(f'{workdir}: its checkpoints were trained with other settings '
                     f'({"; ".join(changed)}); resume with the settings of '
                     f'{os.path.join(workdir, "config.json")} or start a new workdir')


def _merged(defaults: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  """`saved` with every field it lacks taken from `defaults` (nested dicts merged)."""
  out = dict(defaults)
  for key, value in saved.items():
    base = defaults.get(key)
    out[key] = _merged(base, value) if isinstance(value, dict) and isinstance(base, dict) \
        else value
  return out


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run wrote into `workdir`, equal to the one it ran with (JSON
  lists are turned back into tuples). Fields added to `configs.default_config()` after the
  run was made take their defaults, so older workdirs still evaluate and resume."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no config.json in the workdir; is {workdir!r} a '
                            'training workdir (made by python -m imask_jax.main)?')
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(_tuples(_merged(configs.default_config().to_dict(), saved)))


# --- data ----------------------------------------------------------------------------------------

def data_dir_for(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where TFDS datasets live: data.data_dir, else $IMASK_DATA_DIR, else beside the workdir
  (so the runs of a sweep share one prepared dataset)."""
  if config.data.data_dir:
    return config.data.data_dir
  return os.environ.get('IMASK_DATA_DIR') or os.path.join(
      os.path.dirname(os.path.abspath(workdir.rstrip('/'))), 'tfds')


# What a raw folder must hold before a build is worth starting (the builders check the rest).
RAW_LAYOUT = {
    'oai_zib': ('images', 'segmentation_masks'),
    'nifti_folder': ('dataset.json', 'imagesTr'),
}


def check_raw_data(config: ml_collections.ConfigDict, data_dir: str) -> None:
  """Raises DataMissingError when a manual dataset (oai_zib, nifti_folder) is neither built in
  `data_dir` nor present in its raw folder; cheap (a few stat calls), so runs first."""
  params = dataset_params.params_from_config(config, data_dir)
  if params.is_phantom:
    return
  from data_pipelines.datasets import builders  # imports TensorFlow; not needed for phantoms
  builder = builders.builder_for(config, data_dir)
  if builder.is_prepared():
    return
  missing = [name for name in RAW_LAYOUT[params.dataset]
             if not os.path.exists(os.path.join(params.source_dir, name))]
  if not missing:
    return
  where = (f'config data.manual_dir={config.data.manual_dir!r}' if config.data.manual_dir else
           'where an empty config data.manual_dir points: <data_dir>/downloads/manual')
  phantom = 'phantom_hip' if 'effusion' in tuple(config.data.class_names) else 'phantom_knee'
  layout = textwrap.dedent(builders.BUILDERS[params.dataset].MANUAL_DOWNLOAD_INSTRUCTIONS)
  raise DataMissingError(
      f'{params.source_dir}: no {params.dataset} data (missing {", ".join(missing)}); this is '
      f'{where}. Put the data there or name its folder with --config.data.manual_dir=PATH.\n'
      f'{layout.rstrip()}\n'
      f'How to obtain and prepare the data: {DOCS_DATA}.\n'
      f'To try the pipeline without any data, train on generated phantoms:\n'
      f'  python -m imask_jax.main --config experiments/{phantom}.py --workdir runs/{phantom}\n'
      f'  (or experiments/{phantom}.py:smoke for a one-minute check)')


def prepare_dataset(config: ml_collections.ConfigDict, data_dir: str):
  """Builds the stored dataset if needed and returns its TFDS builder. Process 0 builds first
  and the others wait for it, so processes sharing a disk never build the same files at once
  (on separate disks each builds its own copy after the barrier)."""
  from data_pipelines.datasets import builders
  builder = builders.prepare(config, data_dir) if jax.process_index() == 0 else None
  parallel.sync_processes('imask_jax: dataset prepared by process 0')
  if builder is None:
    builder = builders.prepare(config, data_dir)
  parallel.sync_processes('imask_jax: dataset prepared everywhere')
  return builder


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


# The sampling keys are threefry keys whatever the default PRNG: jax.vmap of the 'rbg' bit
# generator draws a batch from one key (JAX's loop-free batching rule), so an example's draws
# would depend on which other examples share its device; threefry draws per key, so a run does
# not depend on the device count.
SAMPLING_PRNG = 'threefry2x32'


def example_keys(seed: int, step: jax.Array, first_index: jax.Array, count: int) -> jax.Array:
  """[count] typed threefry PRNG keys of examples first_index .. first_index + count - 1 of a
  step's batch (a function of the seed, the step and the global example index only)."""
  step_key = jax.random.fold_in(jax.random.key(seed, impl=SAMPLING_PRNG), step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
      first_index + jnp.arange(count, dtype=jnp.int32))


def make_train_step(model: MaskRCNN, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    seed: int, schedule: optax.Schedule | None = None):
  """jit(shard_map(per-device step)): (state, batch) -> (state, metrics), state donated.

  batch: the MODEL_INPUT_KEYS arrays, [global_batch, ...], split over `data`. metrics: float32
  scalars (loss terms, loss, grad_norm, finite, learning_rate if `schedule` is given) and the
  int32 counters nonfinite_in_a_row and nonfinite_total after the step.
  """

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
    # Per-image mean losses on equal per-device batches: the mean over devices is the global one.
    grads, loss, terms = jax.lax.pmean((grads, loss, terms), parallel.DATA_AXIS)
    batch_stats = jax.lax.pmean(updates.get('batch_stats', state.batch_stats),
                                parallel.DATA_AXIS)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing but the counters (the update is computed on zeros so
    # that no NaN reaches the optimiser's moments, then discarded).
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
                   nonfinite_in_a_row=in_a_row, nonfinite_total=new_state.nonfinite_total)
    if schedule is not None:
      # Skipped steps leave the optimiser's count alone: this is the rate this update used.
      metrics['learning_rate'] = jnp.asarray(
          schedule(state.step - state.nonfinite_total), jnp.float32)
    return new_state, metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                          out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=0)


def make_detect_fn(model: MaskRCNN, mesh: jax.sharding.Mesh):
  """jit(shard_map(detect + paste)): (variables, images [N, H, W, C]) -> dict of per-example
  arrays: label_map int32 [N, H, W] (class ids), boxes, scores, classes, valid, mask_probs."""

  def per_device(variables, images):
    det = model.apply(variables, images, method=MaskRCNN.detect)
    label_map, _ = mask_rcnn.detections_to_label_map(
        det, model.spec.image_size, min_score=model.spec.label_score_threshold)
    return dict(label_map=label_map, boxes=det.boxes, scores=det.scores, classes=det.classes,
                valid=det.valid, mask_probs=det.mask_probs)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                               out_specs=P(parallel.DATA_AXIS), check_vma=False))


def model_variables(state: TrainState) -> dict[str, Any]:
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def compile_together(fn, args: tuple[Any, ...], name: str):
  """`fn` (jitted) compiled ahead of time for `args` (arrays or ShapeDtypeStructs), after which
  every process waits for the others: their first collective then starts together (CPU gloo
  collectives give up when processes arrive more than 30 s apart, and compile times differ)."""
  compiled = fn.lower(*args).compile()
  parallel.sync_processes(f'imask_jax: compiled {name}')
  return compiled


# --- validation ----------------------------------------------------------------------------------

def gt_label_map(gt_classes: np.ndarray, gt_masks: np.ndarray, gt_valid: np.ndarray) -> np.ndarray:
  """[N, M] classes, [N, M, H, W] masks, [N, M] valid -> [N, H, W] class-id label maps."""
  masks = gt_masks.astype(bool) & gt_valid[..., None, None]
  label = np.zeros(masks.shape[:1] + masks.shape[2:], np.int32)
  for m in range(masks.shape[1]):
    label = np.where(masks[:, m], gt_classes[:, m, None, None], label)
  return label


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
  """counts [3, K] (intersection, predicted, true pixels per class) -> Dice [K]; a class that is
  absent from both truth and prediction scores 1."""
  inter, pred, true = counts
  denom = pred + true
  return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def slice_dice(detect_fn, variables, eval_ds, mesh, num_classes: int
               ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
  """Pooled mask Dice per class over every valid slice of `eval_ds` on all processes.

  Returns (Dice [num_classes], this process's example for an overlay: image [H, W, C], truth
  and pred [H, W] class ids, the slice with the most true foreground in the first batch, or
  None if this process had no valid slice).
  """
  counts = np.zeros((3, num_classes))
  example = None
  for batch in eval_ds:
    out = parallel.host_local_rows(
        detect_fn(variables, parallel.shard_device_batch(batch['image'], mesh)))
    flat = {k: np.asarray(batch[k]).reshape((-1,) + np.asarray(batch[k]).shape[2:])
            for k in ('gt_classes', 'gt_masks', 'gt_valid', 'example_valid', 'image')}
    ok = flat['example_valid']
    truth = gt_label_map(flat['gt_classes'], flat['gt_masks'], flat['gt_valid'])[ok]
    pred = np.asarray(out['label_map'])[ok]
    for c in range(1, num_classes + 1):
      t, p = truth == c, pred == c
      counts[:, c - 1] += (np.sum(t & p), np.sum(p), np.sum(t))
    if example is None and ok.any():
      i = int(np.argmax(np.sum(truth > 0, axis=(1, 2))))
      example = dict(image=flat['image'][ok][i], truth=truth[i], pred=pred[i])
  return dice_from_counts(parallel.sum_over_processes(counts)), example


def overlay_picture(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """RGB [H, W, 3] uint8 in the paper's colour code: green = truth only, red = model only,
  blue = both; grey image elsewhere."""
  grey = np.clip(image[..., image.shape[-1] // 2], 0.0, 1.0)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  t, p = truth > 0, pred > 0
  for where, colour in ((t & ~p, (0.0, 1.0, 0.0)), (p & ~t, (1.0, 0.0, 0.0)),
                        (t & p, (0.0, 0.3, 1.0))):
    rgb[where] = 0.5 * rgb[where] + 0.5 * np.array(colour)
  return (rgb * 255).astype(np.uint8)


# --- checkpoints ---------------------------------------------------------------------------------

def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keeps the latest `train.keep_checkpoints` steps and the best one by `train.best_metric`
  (higher is better). `best_fn` is set as well as the policy: only then does orbax write each
  step's metrics to disk, so the best step is still known (and kept) after a restart, and
  `manager.best_step()` answers."""
  metric = str(config.train.best_metric)

  def score(metrics: dict[str, Any]) -> float:
    return float(metrics.get(metric, -math.inf))

  policy = ocp_policy.AnyPreservationPolicy([
      ocp_policy.LatestN(n=int(config.train.keep_checkpoints)),
      ocp_policy.BestN(get_metric_fn=score, reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=score,
                                         best_mode='max', create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_names=('state',))


def restore_state(manager: ocp.CheckpointManager, template: TrainState, mesh,
                  step: int | None = None) -> TrainState:
  """Checkpoint `step` (default: the latest) replicated on this run's devices, whatever device
  count saved it. template: a TrainState of arrays or ShapeDtypeStructs (shapes and dtypes)."""
  step = manager.latest_step() if step is None else int(step)
  if step is None:
    raise FileNotFoundError(f'{manager.directory}: no checkpoint to restore')
  sharding = parallel.replicated(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          template)
  restored = manager.restore(step,
                             args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return restored['state']


# --- logs ----------------------------------------------------------------------------------------

class RunLog:
  """metrics.jsonl + TensorBoard + a progress line on stdout; only process 0 writes."""

  def __init__(self, workdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if self.enabled:
      import tensorflow as tf  # TensorBoard summaries only; input_pipeline hid the GPUs.
      self.tf = tf
      self.writer = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops the records of steps after `step` (logged by a run that died before its next
    checkpoint; the resumed run logs those steps again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if int(json.loads(line)['step']) <= step:
          kept.append(line)
      except (ValueError, KeyError):  # a line cut short by the kill
        pass
    if len(kept) != len(lines):
      with atomic_path(self.path) as tmp:
        with open(tmp, 'w') as f:
          f.writelines(kept)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: float(v) if math.isfinite(float(v)) else None for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    with self.writer.as_default(step=int(step)):
      for k, v in values.items():
        self.tf.summary.scalar(k, float(v))
    self.writer.flush()

  def image(self, step: int, name: str, picture: np.ndarray) -> None:
    if self.enabled:
      with self.writer.as_default(step=int(step)):
        self.tf.summary.image(name, picture[None])
      self.writer.flush()

  def progress(self, step: int, loss: float | None, lr: float, rate: float, step_time: float,
               eta_seconds: float) -> None:
    if self.enabled:
      loss_text = 'n/a' if loss is None else f'{loss:.4f}'
      print(f'step {step}/{self.total_steps}  loss {loss_text}  lr {lr:.2e}  '
            f'{rate:.1f} slices/s  {step_time * 1e3:.0f} ms/step  ETA {_duration(eta_seconds)}',
            flush=True)

  def message(self, text: str) -> None:
    if self.enabled:
      print(text, flush=True)
      logging.info('%s', text)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return (f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else
          f'{seconds // 60}m{seconds % 60:02d}s')


def summarize_window(last: dict[str, np.ndarray], finite: Sequence[float]) -> dict[str, float]:
  """What is logged for the steps since the last log, from the last step's host metrics and
  every step's `finite` flag: the last step's loss terms and gradient norm (left out if it was
  skipped, so a curve is a function of the step alone and a resumed run logs what an
  uninterrupted one does), its learning rate and counters, and nonfinite_steps = the skipped
  steps of the window."""
  counters = ('finite', 'nonfinite_in_a_row', 'nonfinite_total', 'learning_rate')
  out: dict[str, float] = {}
  if float(last['finite']) > 0:
    out.update({k: float(v) for k, v in last.items() if k not in counters})
  if 'learning_rate' in last:
    out['learning_rate'] = float(last['learning_rate'])
  out['nonfinite_steps'] = float(sum(float(f) == 0 for f in finite))
  out['nonfinite_total'] = float(last['nonfinite_total'])
  return out


# --- the main job --------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns the final state (replicated on this run's devices). Raises DataMissingError before
  any heavy work if a manual dataset is missing, and NonFiniteLossError when training stops
  on non-finite losses (the checkpoints written before are kept).
  """
  config = copy.deepcopy(config)
  check_train_config(config)
  data_dir = data_dir_for(config, workdir)
  check_raw_data(config, data_dir)
  from imask_jax import input_pipeline  # imported here: it configures TensorFlow
  builder = prepare_dataset(config, data_dir)
  if 'train' not in builder.info.splits:
    raise ValueError(f'{builder.data_dir}: the dataset has no training split (config '
                     f'data.split_fractions={tuple(config.data.split_fractions)})')
  num_train = builder.info.splits['train'].num_examples
  config.train.steps = resolve_steps(config, num_train)
  check_resumable(config, workdir)
  if float(config.train.epochs) > 0:
    logging.info('train.epochs=%s over %d training slices at batch %d: train.steps=%d',
                 config.train.epochs, num_train, int(config.train.batch_size),
                 int(config.train.steps))
  save_config(config, workdir)

  mesh = parallel.data_mesh()
  model = build_model(config)
  tx = optim.make_optimizer(config.train)
  schedule = optim.learning_rate_schedule(config.train)
  seed = int(config.seed)
  total = int(config.train.steps)
  log = RunLog(workdir, total)
  manager = checkpoint_manager(workdir, config)
  try:
    if manager.latest_step() is not None:
      template = jax.eval_shape(lambda: init_state(model, tx, seed))
      state = restore_state(manager, template, mesh)
      log.truncate_after(int(state.step))
      log.message(f'resumed from the checkpoint of step {int(state.step)} in {workdir}')
    else:
      state = parallel.replicate(init_state(model, tx, seed), mesh)
    train_iter = input_pipeline.create_train_dataset(config, data_dir, seed=seed,
                                                     start_step=int(state.step))
    val_ds = None
    if 'validation' in builder.info.splits:
      val_ds = input_pipeline.create_eval_dataset(config, data_dir, 'validation',
                                                  max_examples=int(config.eval.max_val_slices))
    else:
      log.message(f'{builder.data_dir}: no validation split (data.split_fractions='
                  f'{tuple(config.data.split_fractions)}): no validation, and only the latest '
                  'checkpoints are kept')
    loop = _Loop(config, mesh, model, tx, schedule, manager, log, val_ds)
    return loop.run(state, train_iter)
  finally:
    log.close()
    manager.close()


class _Loop:
  """The training loop of `train_and_evaluate` (one object so its steps read as methods)."""

  def __init__(self, config, mesh, model, tx, schedule, manager, log, val_ds):
    self.config, self.mesh, self.manager, self.log, self.val_ds = (config, mesh, manager, log,
                                                                   val_ds)
    self.total = int(config.train.steps)
    self.global_batch = int(config.train.batch_size)
    self.max_in_a_row = int(config.train.max_nonfinite_in_a_row)
    self.train_step = make_train_step(model, tx, mesh, int(config.seed), schedule)
    self.detect_fn = make_detect_fn(build_model(config, data_parallel=False), mesh)
    self.compiled_step = self.compiled_detect = None

  def run(self, state: TrainState, train_iter) -> TrainState:
    t = self.config.train
    step = start = int(state.step)
    if start >= self.total:
      self.log.message(f'nothing to do: the checkpoint is at step {start} of {self.total}')
      return state
    window: list[dict[str, jax.Array]] = []       # metrics of the steps since the last log
    unchecked: tuple[int, dict[str, jax.Array]] | None = None
    first_seconds = 0.0
    window_start = rate_start = time.time()
    while step < self.total:
      batch = parallel.shard_device_batch({k: v for k, v in next(train_iter).items()
                                           if k in MODEL_INPUT_KEYS}, self.mesh)
      if self.compiled_step is None:
        self.compiled_step = compile_together(self.train_step, (state, batch), 'train step')
      state, metrics = self.compiled_step(state, batch)
      step += 1
      window.append(metrics)
      if step == start + 1:  # the first step includes the compile: time it on its own
        jax.block_until_ready(metrics)
        first_seconds = time.time() - window_start
        self.log.message(f'step {step}: compiled and ran in {first_seconds:.1f} s')
        window_start = rate_start = time.time()
      # Read the previous step's counter now that this step is queued behind it.
      if unchecked is not None:
        self._check_finite(*unchecked, window)
      unchecked = (step, metrics)
      eval_now = step % int(t.eval_every) == 0 or step == self.total
      save_now = eval_now or step % int(t.checkpoint_every) == 0
      log_now = step % int(t.log_every) == 0 or step == self.total
      if not (eval_now or save_now or log_now):
        continue
      self._check_finite(step, metrics, window)  # never log past, or save, a stopping step
      unchecked = None
      if log_now:
        now = time.time()
        timed = len(window) - (1 if step - len(window) == start else 0)
        seconds = now - window_start
        if timed == 0:  # only the first step: report it, compile included
          seconds, timed = first_seconds, 1
        per_step = ((now - rate_start) / (step - start - 1) if step > start + 1
                    else first_seconds)
        self._log_window(step, window, seconds, timed, eta=per_step * (self.total - step))
        window, window_start = [], time.time()
      if save_now:
        values = self.validate(state, step) if eval_now else None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                          metrics=values)
    self.manager.wait_until_finished()
    return state

  def _check_finite(self, step: int, metrics: dict[str, jax.Array],
                    window: list[dict[str, jax.Array]]) -> None:
    in_a_row = int(metrics['nonfinite_in_a_row'])
    if in_a_row < self.max_in_a_row:
      return
    self.manager.wait_until_finished()
    # Log the steps up to the stop, so the skipped ones are counted in metrics.jsonl too.
    upto = [i for i, m in enumerate(window) if m is metrics]
    done = window[:upto[0] + 1] if upto else window
    if done:
      self._log_window(step, done, None, len(done), None)
    last = self.manager.latest_step()
    kept = (f'the last good checkpoint, step {last}, is kept in '
            f'{self.manager.directory}' if last is not None else 'no checkpoint had been written')
    raise NonFiniteLossError(
        f'{in_a_row} non-finite losses or gradients in a row (steps {step - in_a_row + 1} to '
        f'{step}; {int(metrics["nonfinite_total"])} skipped in all; '
        f'train.max_nonfinite_in_a_row={self.max_in_a_row}): training stopped and {kept}. '
        'Lower train.learning_rate, raise train.warmup_steps or check the data for NaN or '
        'infinite intensities.')

  def _log_window(self, step: int, window, seconds: float | None, steps_timed: int,
                  eta: float | None) -> None:
    # Two transfers: the last step's metrics and every step's finite flag.
    last, finite = jax.device_get((window[-1], [m['finite'] for m in window]))
    values = summarize_window(last, finite)
    if seconds is not None:
      values['step_time'] = seconds / steps_timed
      values['slices_per_second'] = steps_timed * self.global_batch / max(seconds, 1e-9)
    self.log.scalars(step, {f'train/{k}': v for k, v in values.items()})
    if eta is not None:
      self.log.progress(step, values.get('loss'), values.get('learning_rate', math.nan),
                        values['slices_per_second'], values['step_time'], eta)

  def validate(self, state: TrainState, step: int) -> dict[str, float] | None:
    """Validation Dice of `state` on the (first eval.max_val_slices) validation slices: logged,
    an overlay written, and returned for the checkpoint's metrics (None: no validation split)."""
    if self.val_ds is None:
      return None
    variables = model_variables(state)
    if self.compiled_detect is None:
      d = self.config.data
      images = jax.ShapeDtypeStruct(
          (int(self.config.eval.batch_size), *(int(n) for n in d.image_size),
           2 * int(d.context_slices) + 1), jnp.float32, sharding=parallel.batch_sharded(self.mesh))
      self.compiled_detect = compile_together(self.detect_fn, (variables, images), 'detection')
    dice, example = slice_dice(self.compiled_detect, variables, self.val_ds, self.mesh,
                               int(self.config.model.num_classes))
    names = validation_metric_names(self.config)
    values = dict(zip(names, [float(d) for d in dice] + [float(np.mean(dice))]))
    self.log.scalars(step, values)
    if example is not None:
      self.log.image(step, 'val/overlay',
                     overlay_picture(example['image'], example['truth'], example['pred']))
    self.log.message(f'validation @ {step}: ' +
                     '  '.join(f'{k[len("val/"):]} {v:.3f}' for k, v in values.items()))
    return values
