"""The trainer: the training loop, periodic validation and checkpointing.

`train_and_evaluate(config, workdir)` is the whole main job; nothing else imports this module
(loading a trained model goes through workdir.py and inference/loading.py). The workdir's layout
is in workdir.py, the step function in steps.py, the log in run_log.py.

Training resumes exactly after a kill: the input stream restarts at the restored step and
metrics.jsonl is cut back to it. `train.max_nonfinite_in_a_row` skipped (non-finite) steps in a
row stop the run with `NonFiniteLossError`, leaving the checkpoints as they were. The host
reads each step's counter one step late, so the device always has the next step queued (the
only per-step host sync).
"""

from __future__ import annotations

import copy
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from data_pipelines.datasets import params as params_lib
from imask_jax import configs, parallel
from imask_jax import workdir as workdir_lib
from imask_jax.evaluation import viz
from imask_jax.inference.programs import make_detect_fn
from imask_jax.models.build import build_model
from imask_jax.run_log import RunLog, format_duration, say, summarize_window
from imask_jax.training import optim
from imask_jax.training.steps import (
  MODEL_INPUT_KEYS,
  TrainState,
  compile_together,
  init_state,
  make_train_step,
  model_variables,
)


class NonFiniteLossError(RuntimeError):
  """Training stopped after train.max_nonfinite_in_a_row non-finite steps in a row."""


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
  absent from both truth and prediction is NaN (absent, not a perfect 1: a class the labels
  never hold must not look learnt), as in metrics.overlap's empty-mask rules."""
  inter, pred, true = counts
  denom = pred + true
  return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), np.nan)


def mean_dice(dice: np.ndarray) -> float:
  """The mean over the classes present in truth or prediction (NaN when none is)."""
  present = dice[np.isfinite(dice)]
  return float(present.mean()) if present.size else math.nan


def slice_dice(
  detect_fn, variables, eval_ds, mesh, num_classes: int
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
      detect_fn(variables, parallel.shard_device_batch(batch['image'], mesh))
    )
    flat = {
      k: np.asarray(batch[k]).reshape((-1,) + np.asarray(batch[k]).shape[2:])
      for k in ('gt_classes', 'gt_masks', 'gt_valid', 'example_valid', 'image')
    }
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


# --- the main job --------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns the final state (replicated on this run's devices). Raises DataMissingError before
  any heavy work if a manual dataset is missing, and NonFiniteLossError when training stops
  on non-finite losses (the checkpoints written before are kept).
  """
  config = copy.deepcopy(config)
  configs.check_train_config(config)
  data_dir = workdir_lib.data_dir_for(config, workdir)
  workdir_lib.check_raw_data(config, data_dir)
  from imask_jax import input_pipeline  # imported here: it configures TensorFlow

  builder = workdir_lib.prepare_dataset(config, data_dir)
  if 'train' not in builder.info.splits:
    raise ValueError(
      f'{builder.data_dir}: the dataset has no training split (config '
      f'{params_lib.split_note(config.data)})'
    )
  num_train = builder.info.splits['train'].num_examples
  say(
    f'dataset {builder.data_dir}: '
    + ', '.join(
      f'{split.num_examples} {name} slices' for name, split in builder.info.splits.items()
    )
  )
  config.train.steps = configs.resolve_steps(config, num_train)
  workdir_lib.check_resumable(config, workdir)
  # The run's size before it starts (the progress lines then give its time per step and ETA):
  # the paper's 300 epochs are millions of steps on a full OAI set.
  steps, batch = int(config.train.steps), int(config.train.batch_size)
  epochs = float(config.train.epochs)
  passes = f'{steps * batch / max(num_train, 1):.3g} passes over the {num_train:,} training slices'
  per_epoch = configs.steps_per_epoch(config)
  if epochs > 0 and per_epoch:
    what = (
      f'{epochs:g} epochs (train.epochs) of {per_epoch:,} steps (train.steps_per_epoch), {passes}'
    )
  elif epochs > 0:
    what = f'{epochs:g} epochs (train.epochs) of the {num_train:,} training slices'
  else:
    what = passes
  say(f'{steps:,} steps of {batch} slices: {what}')
  workdir_lib.save_config(config, workdir)

  mesh = parallel.data_mesh()
  model = build_model(config, batch_stats_axis=parallel.DATA_AXIS)
  tx = optim.make_optimizer(config.train)
  schedule = optim.learning_rate_schedule(config.train)
  seed = int(config.seed)
  total = int(config.train.steps)
  log = RunLog(workdir, total)
  manager = workdir_lib.checkpoint_manager(workdir, config)
  try:
    if manager.latest_step() is not None:
      template = jax.eval_shape(lambda: init_state(model, tx, seed))
      state = workdir_lib.restore_state(manager, template, mesh)
      log.truncate_after(int(state.step))
      log.message(f'resumed from the checkpoint of step {int(state.step)} in {workdir}')
    else:
      state = parallel.replicate(
        init_state(model, tx, seed, init_from=str(config.model.init_from)), mesh
      )
    train_iter = input_pipeline.create_train_dataset(
      config, data_dir, seed=seed, start_step=int(state.step)
    )
    val_ds = None
    if 'validation' in builder.info.splits:
      val_ds = input_pipeline.create_eval_dataset(
        config, data_dir, 'validation', max_examples=int(config.eval.max_val_slices)
      )
    else:
      log.message(
        f'{builder.data_dir}: no validation split ({params_lib.split_note(config.data)}): '
        'no validation, and only the latest checkpoints are kept'
      )
    loop = _Loop(config, mesh, model, tx, schedule, manager, log, val_ds)
    return loop.run(state, train_iter)
  finally:
    log.close()
    manager.close()


# Steps after the compile over which the trainer times its pace once, for an early estimate.
PACE_STEPS = 5


class _Loop:
  """The training loop of `train_and_evaluate` (one object so its steps read as methods)."""

  def __init__(self, config, mesh, model, tx, schedule, manager, log, val_ds):
    self.config, self.mesh, self.manager, self.log, self.val_ds = (
      config,
      mesh,
      manager,
      log,
      val_ds,
    )
    self.total = int(config.train.steps)
    self.global_batch = int(config.train.batch_size)
    self.max_in_a_row = int(config.train.max_nonfinite_in_a_row)
    self.train_step = make_train_step(model, tx, mesh, int(config.seed), schedule)
    self.detect_fn = make_detect_fn(build_model(config), mesh)
    self.compiled_step = self.compiled_detect = None

  def run(self, state: TrainState, train_iter) -> TrainState:
    t = self.config.train
    step = start = int(state.step)
    if start >= self.total:
      self.log.message(f'nothing to do: the checkpoint is at step {start} of {self.total}')
      return state
    window: list[dict[str, jax.Array]] = []  # metrics of the steps since the last log
    unchecked: tuple[int, dict[str, jax.Array]] | None = None
    first_seconds = 0.0
    window_start = rate_start = time.time()
    while step < self.total:
      batch = parallel.shard_device_batch(
        {k: v for k, v in next(train_iter).items() if k in MODEL_INPUT_KEYS}, self.mesh
      )
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
      if step == start + 1 + PACE_STEPS and int(t.log_every) > PACE_STEPS + 1:
        # The run's length at this pace long before the first progress line (log_every may be
        # 100 steps of minutes each): what a user needs to decide whether to let it run.
        jax.block_until_ready(metrics)
        per_step = (time.time() - rate_start) / PACE_STEPS
        left = format_duration(per_step * (self.total - step))
        self.log.message(
          f'step {step}: {per_step * 1e3:.0f} ms/step over {PACE_STEPS} steps: the '
          f'{self.total - step:,} steps left take about {left} at this pace (validation and '
          'checkpoints on top)'
        )
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
        per_step = (now - rate_start) / (step - start - 1) if step > start + 1 else first_seconds
        self._log_window(step, window, seconds, timed, eta=per_step * (self.total - step))
        window, window_start = [], time.time()
      if save_now:
        values = self.validate(state, step) if eval_now else None
        self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), metrics=values
        )
    self.manager.wait_until_finished()
    return state

  def _check_finite(
    self, step: int, metrics: dict[str, jax.Array], window: list[dict[str, jax.Array]]
  ) -> None:
    in_a_row = int(metrics['nonfinite_in_a_row'])
    if in_a_row < self.max_in_a_row:
      return
    self.manager.wait_until_finished()
    # Log the steps up to the stop, so the skipped ones are counted in metrics.jsonl too.
    upto = [i for i, m in enumerate(window) if m is metrics]
    done = window[: upto[0] + 1] if upto else window
    if done:
      self._log_window(step, done, None, len(done), None)
    last = self.manager.latest_step()
    kept = (
      f'the last good checkpoint, step {last}, is kept in {self.manager.directory}'
      if last is not None
      else 'no checkpoint had been written'
    )
    raise NonFiniteLossError(
      f'{in_a_row} non-finite losses or gradients in a row (steps {step - in_a_row + 1} to '
      f'{step}; {int(metrics["nonfinite_total"])} skipped in all; '
      f'train.max_nonfinite_in_a_row={self.max_in_a_row}): training stopped and {kept}. '
      'Lower train.learning_rate, raise train.warmup_steps or check the data for NaN or '
      'infinite intensities.'
    )

  def _log_window(
    self, step: int, window, seconds: float | None, steps_timed: int, eta: float | None
  ) -> None:
    # Two transfers: the last step's metrics and every step's finite flag.
    last, finite = jax.device_get((window[-1], [m['finite'] for m in window]))
    values = summarize_window(last, finite)
    if seconds is not None:
      values['step_time'] = seconds / steps_timed
      values['slices_per_second'] = steps_timed * self.global_batch / max(seconds, 1e-9)
    self.log.scalars(step, {f'train/{k}': v for k, v in values.items()})
    if eta is not None:
      self.log.progress(
        step,
        values.get('loss'),
        values.get('learning_rate', math.nan),
        values['slices_per_second'],
        values['step_time'],
        eta,
      )

  def validate(self, state: TrainState, step: int) -> dict[str, float] | None:
    """Validation Dice of `state` on the (first eval.max_val_slices) validation slices: logged,
    an overlay written, and returned for the checkpoint's metrics (None: no validation split)."""
    if self.val_ds is None:
      return None
    variables = model_variables(state)
    if self.compiled_detect is None:
      d = self.config.data
      images = jax.ShapeDtypeStruct(
        (
          int(self.config.eval.batch_size),
          *self.val_ds.image_size,
          2 * int(d.context_slices) + 1,
        ),
        jnp.float32,
        sharding=parallel.batch_sharded(self.mesh),
      )
      self.compiled_detect = compile_together(self.detect_fn, (variables, images), 'detection')
    dice, example = slice_dice(
      self.compiled_detect, variables, self.val_ds, self.mesh, len(self.config.data.class_names)
    )
    names = configs.validation_metric_names(self.config)
    values = dict(zip(names, [float(d) for d in dice] + [mean_dice(dice)]))
    self.log.scalars(step, values)
    if example is not None:
      image = example['image'][..., example['image'].shape[-1] // 2]  # the centre slice
      self.log.image(
        step, 'val/overlay', viz.overlay_rgb(image, example['truth'] > 0, example['pred'] > 0)
      )
    self.log.message(
      f'validation @ {step}: '
      + '  '.join(
        f'{k[len("val/") :]} ' + (f'{v:.3f}' if math.isfinite(v) else 'absent')
        for k, v in values.items()
      )
    )
    return values
