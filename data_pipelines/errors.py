"""The one error type for bad input data (it always names the file and what is wrong with it),
and the exit status of every command, data_pipelines' and imask_jax's alike."""

from __future__ import annotations

import os
from typing import Any

EXIT_OK = 0  # all done
EXIT_FAILED = 1  # some work failed: each failure named on stderr, the rest done
EXIT_REFUSED = 2  # refused before any work: a user mistake, said in one line


class DataError(ValueError):
  """A data file (or a dataset folder) is missing, unreadable or inconsistent.

  The message has the form `<path>: <problem> (found <found>; expected <expected>)`, so a user
  reading a log line knows which file to look at and what value would have been accepted.
  `path` may also name a dataset item that is not a file on its own, e.g. `case knee_0001`.
  """

  def __init__(
    self, path: str | os.PathLike, problem: str, *, found: Any = None, expected: Any = None
  ):
    self.path = os.fspath(path)
    self.problem = problem
    self.found = found
    self.expected = expected
    details = []
    if found is not None:
      details.append(f'found {found}')
    if expected is not None:
      details.append(f'expected {expected}')
    message = f'{self.path}: {problem}'
    if details:
      message += f' ({"; ".join(details)})'
    super().__init__(message)
