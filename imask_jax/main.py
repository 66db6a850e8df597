"""The main job: `python -m imask_jax.main --config experiments/oai.py --workdir DIR`.

`--config experiments/oai.py:head=standard,backbone=densenet121` picks a variant;
`--config.train.steps=10` overrides any field. Training resumes from DIR's latest checkpoint.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from imask_jax import parallel, train  # noqa: E402

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
  logging.info('config:\n%s', _CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
