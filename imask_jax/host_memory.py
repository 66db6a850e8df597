"""Giving the memory that XLA's compiler freed back to the operating system.

Compiling a training step takes host memory of the order of the step's own buffers, which the
compiler frees when it is done; glibc's allocator keeps freed memory in its arenas rather than
returning it, so the process stays that much larger while it trains, and the step's buffers
come on top (benchmarks/README.md has the figures). `release_freed_memory()` asks glibc to return it
(`malloc_trim`); the buffers in use are untouched. Elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
  name = ctypes.util.find_library('c')
  try:
    return ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):  # not glibc
    return None


def release_freed_memory() -> bool:
  """Returns the allocator's free memory to the OS; True where that was possible (glibc)."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
