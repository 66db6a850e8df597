"""host_memory.release_freed_memory gives the allocator's freed memory back to the OS."""

from __future__ import annotations

import gc
import os
import sys

import pytest

from imask_jax import host_memory


def resident_mib() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc and /proc are Linux')
def test_freed_heap_memory_goes_back_to_the_os():
  # 200 MiB in zero-filled 2 KiB blocks: too small for mmap, so they come from malloc's heap,
  # which keeps them after free (the resident size stays up until the release).
  blocks = [bytearray(2048) for _ in range(100_000)]
  before_free = resident_mib()
  del blocks
  gc.collect()
  after_free = resident_mib()
  assert host_memory.release_freed_memory()
  after_release = resident_mib()
  assert before_free - after_release > 150, (before_free, after_free, after_release)
