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

import sys


from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.errors import DataError
from imask_jax import parallel, run_log, train, workdir

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '',
                                   'Multi-host: host:port of process 0 (else auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-host: this process index.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  log_file = run_log.log_to_workdir(_WORKDIR.value)
  run_log.say(f'training {_WORKDIR.value} (the full log: {log_file})')
  logging.info('config:\n%s', _CONFIG.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (workdir.DataMissingError, train.NonFiniteLossError, DataError) as e:
    sys.exit(f'{type(e).__name__}: {e}')  # the message, on stderr, with exit status 1
  run_log.say(f'training finished: {_WORKDIR.value}')


if __name__ == '__main__':
  app.run(main)
