"""The run's log: what reaches the screen, the log file, metrics.jsonl and TensorBoard.

The screen gets one line per event (the dataset, the first compiled step, progress with its
ETA, validation, resumption) and the warnings and errors that need a reader; everything else
that the libraries log (TFDS, orbax, JAX back-end probing) goes to <workdir>/train.log only.
"""

from __future__ import annotations

import json
import logging as py_logging
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from data_pipelines.atomic import atomic_path

LOG_FILE = 'train.log'


class _LibraryChatter(py_logging.Filter):
  """Keeps library chatter off the screen (it still reaches the log file): TFDS's notes about
  configurations and deprecations, and orbax's warning that a checkpoint saved between
  validations has no metrics (intended: it is kept as the latest, not ranked as the best)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR:
      return True
    if '/tensorflow_datasets/' in record.pathname:
      return False
    return not (
      '/orbax/' in record.pathname and str(record.msg).startswith('Requested `tracked_metric`')
    )


def log_to_workdir(workdir: str) -> str:
  """Sends every log record (INFO and up, ours and the libraries') to <workdir>/train.log (one
  file per process after the first: train.process<i>.log) and leaves the screen the warnings
  and errors that are not library chatter. Returns the log file's path."""
  screen = logging.get_absl_handler()
  screen.setLevel(py_logging.WARNING)
  screen.addFilter(_LibraryChatter())
  # Only now start JAX's back-end (process_index), whose start-up notes are INFO records.
  os.makedirs(workdir, exist_ok=True)
  index = jax.process_index()
  path = os.path.join(workdir, LOG_FILE if index == 0 else f'train.process{index}.log')
  to_file = py_logging.FileHandler(path)
  to_file.setLevel(py_logging.INFO)
  to_file.setFormatter(logging.PythonFormatter())
  py_logging.getLogger().addHandler(to_file)
  logging.set_verbosity(logging.INFO)
  return path


def say(text: str) -> None:
  """One line on the screen (process 0) and in the log file."""
  if jax.process_index() == 0:
    print(text, flush=True)
  logging.info('%s', text)


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

  def progress(
    self,
    step: int,
    loss: float | None,
    lr: float,
    rate: float,
    step_time: float,
    eta_seconds: float,
  ) -> None:
    if self.enabled:
      loss_text = 'n/a' if loss is None else f'{loss:.4f}'
      say(
        f'step {step}/{self.total_steps}  loss {loss_text}  lr {lr:.2e}  '
        f'{rate:.1f} slices/s  {step_time * 1e3:.0f} ms/step  ETA {format_duration(eta_seconds)}'
      )

  def message(self, text: str) -> None:
    if self.enabled:
      say(text)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return (
    f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
    if seconds >= 3600
    else f'{seconds // 60}m{seconds % 60:02d}s'
  )


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
