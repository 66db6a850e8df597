"""The mistakes every command reports in one line (the traceback only with --verbose), and the
exit statuses that go with them (data_pipelines.errors: 0 done, 1 some work failed, 2
refused before any work)."""

from __future__ import annotations

from data_pipelines.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, DataError

__all__ = [
  'EXIT_FAILED',
  'EXIT_OK',
  'EXIT_REFUSED',
  'USER_ERRORS',
  'CheckpointError',
  'DataError',
  'DataMissingError',
  'MissingCheckpointError',
  'NotAWorkdirError',
  'SettingsChangedError',
  'SweepLockedError',
]


class DataMissingError(FileNotFoundError):
  """An experiment's raw data folder is missing; the message says where and what to do."""


class NotAWorkdirError(FileNotFoundError):
  """The folder given as a workdir has no config.json (it was not made by a training run)."""


class SettingsChangedError(ValueError):
  """Work would go on with settings other than those it started with: a run resuming
  checkpoints made with settings they cannot take, or a sweep whose recorded runs' settings
  have changed since it first started."""


class MissingCheckpointError(FileNotFoundError):
  """No checkpoint at the requested step (or none at all); the message lists what there is."""


class CheckpointError(RuntimeError):
  """A checkpoint cannot be restored (a truncated or corrupt file); the message names its
  folder and the first problem found."""


class SweepLockedError(RuntimeError):
  """Another sweep, or a run it started, still works in the folder."""


USER_ERRORS = (
  DataError,
  DataMissingError,
  NotAWorkdirError,
  SettingsChangedError,
  MissingCheckpointError,
  CheckpointError,
  SweepLockedError,
)
