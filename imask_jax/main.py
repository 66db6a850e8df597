"""The main job: `python -m imask_jax.main --config experiments/oai.py --workdir DIR`.

`--config experiments/oai.py:head=standard,backbone=densenet121` picks a variant;
`--config.train.steps=10` overrides any field. Training resumes from DIR's latest checkpoint.

Several processes (one per host, or several on one machine for testing) join with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or from a SLURM / Open MPI
environment); on CPU they talk through gloo. Compiles can be cached across runs with JAX's
own setting, e.g. `JAX_COMPILATION_CACHE_DIR=~/.cache/imask_jax/xla`.

User mistakes end in one line on stderr, without a traceback (add --verbose for it): a
--config override that names no field or has the wrong type (exit status 2), train.steps and
train.epochs both given (2); a missing dataset, a resume with settings the checkpoints cannot
take, no checkpoint that restores, bad data, and a run stopped by non-finite losses (1).

`--config.train.steps=N` on the command line wins over an epoch count the experiment sets
(train.epochs becomes 0, and the job says so); giving both --config.train.steps and
--config.train.epochs is refused.

A checkpoint that cannot be restored (a truncated or corrupt file) is moved to
DIR/checkpoints_unrestorable/ and training resumes from the newest one that restores, saying so
(workdir.restore_state).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from imask_jax import errors

# The job's modules (JAX, orbax, ...) are imported in main(), after the flags are parsed, so
# that --help and a flag mistake answer at once.

PROG = 'python -m imask_jax.main'

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', '', 'Multi-host: host:port of process 0 (else auto-detected).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'Multi-host: this process index.')
_VERBOSE = flags.DEFINE_boolean(
  'verbose', False, 'Show the traceback of a user mistake, not only its message.'
)
flags.mark_flags_as_required(['config', 'workdir'])

# Flags that modules of the job define when imported (orbax's): given on the command line,
# those modules are imported before parsing, so that the flags are known.
JOB_FLAG_PREFIXES = ('experimental_orbax_',)


def given(argv: Sequence[str], field: str) -> bool:
  """Whether the command line overrides config field `field` ('train.steps')."""
  flag = f'--config.{field}'
  return any(a == flag or a.startswith(flag + '=') for a in argv)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a --config override that does not fit the config (a field
  typo, a value of the wrong kind) reported in one line and exit status 2."""
  names = [a.lstrip('-').removeprefix('no') for a in argv[1:] if a.startswith('--')]
  if any(name.startswith(JOB_FLAG_PREFIXES) for name in names):
    from imask_jax.training import train  # noqa: F401 -- its imports define them
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    if '--verbose' in argv:
      raise
    text = ' '.join(str(error).replace('\\n', ' ').replace("\\'", "'").split()).strip('\'"')
    if isinstance(error, (AttributeError, KeyError)):  # ml_collections: a field that is not
      key = re.match(r"'?([^' ]*)", text).group(1)
      flag = next(
        (
          a.split('=')[0]
          for a in argv
          if a.startswith('--config.') and key in a.split('=')[0].split('.')
        ),
        'a --config override',
      )
      hint = re.search(r'Did you mean "([^"]+)"', text)
      text = f'{flag}: the config has no field {key!r}' + (
        f' (did you mean {hint.group(1)!r}?)' if hint else ''
      )
    else:
      text = f'a --config override does not fit the config: {text}'
    print(f'{PROG}: {text}', file=sys.stderr)
    sys.exit(errors.EXIT_REFUSED)


def explicit_steps_win(config, argv: Sequence[str]) -> None:
  """--config.train.steps on the command line over the experiment's train.epochs (which would
  otherwise decide the step count); both on the command line is refused (exit status 2)."""
  if not given(argv, 'train.steps') or float(config.train.epochs) <= 0:
    return
  from imask_jax import run_log

  if given(argv, 'train.epochs'):
    print(
      f'{PROG}: --config.train.steps={config.train.steps} and --config.train.epochs='
      f'{config.train.epochs} both given; give one (epochs > 0 decides the step count, '
      'steps alone replaces the epochs)',
      file=sys.stderr,
    )
    sys.exit(errors.EXIT_REFUSED)
  run_log.say(
    f"train.steps={config.train.steps} from the command line: the config's "
    f'train.epochs={config.train.epochs} is not used'
  )
  config.train.epochs = 0.0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from imask_jax import parallel, run_log
  from imask_jax.training import train

  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  log_file = run_log.log_to_workdir(_WORKDIR.value)
  run_log.say(f'training {_WORKDIR.value} (the full log: {log_file})')
  config = _CONFIG.value
  explicit_steps_win(config, sys.argv)
  logging.info('config:\n%s', config)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except errors.USER_ERRORS + (train.NonFiniteLossError,) as e:
    if _VERBOSE.value:
      raise
    # The message on stderr (the full traceback is in the log file): a mistake in what was
    # asked is refused (2); a run that diverged failed (1).
    logging.info('stopped', exc_info=True)
    print(f'{type(e).__name__}: {e}', file=sys.stderr)
    failed = isinstance(e, train.NonFiniteLossError)
    sys.exit(errors.EXIT_FAILED if failed else errors.EXIT_REFUSED)
  run_log.say(f'training finished: {_WORKDIR.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
