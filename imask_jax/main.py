"""The main job: `python -m imask_jax.main --config experiments/oai.py --workdir DIR`.

`--config experiments/oai.py:head=standard,backbone=densenet121` picks a variant;
`--config.train.steps=10` overrides any field. Training resumes from DIR's latest checkpoint.

Several processes (one per host, or several on one machine for testing) join with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or from a SLURM / Open MPI
environment); on CPU they talk through gloo. Compiles can be cached across runs with JAX's
own setting, e.g. `JAX_COMPILATION_CACHE_DIR=~/.cache/imask_jax/xla`.

Data problems (a missing dataset) and a run stopped by non-finite losses end with their message
on stderr and exit status 1, without a traceback.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_pipelines.errors import DataError  # noqa: E402
from imask_jax import parallel, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '',
                                   'Multi-host: host:port of process 0 (else auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-host: this process index.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(py_logging.Filter):
  """Drops orbax's INFO chatter (a dozen lines per checkpoint) from the absl log, and its
  warning that a checkpoint saved between validations carries no metrics (intended: those
  are kept as the latest, not ranked as the best). Other warnings and errors pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < py_logging.WARNING:
      return False
    return not str(record.msg).startswith('Requested `tracked_metric`')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info('config:\n%s', _CONFIG.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.DataMissingError, train.NonFiniteLossError, DataError) as e:
    sys.exit(f'{type(e).__name__}: {e}')  # the message, on stderr, with exit status 1
  logging.info('training finished: %s', _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
