"""parallel.py: placing batches on the `data` mesh and taking them back, replication, the
multi-host start's checks; the same on 2 forced host devices in one subprocess (XLA_FLAGS must
be set before JAX starts)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, experiment_config
from imask_jax import parallel
from imask_jax import workdir as workdir_lib


def test_batches_go_to_the_mesh_and_come_back_on_one_process():
  mesh = parallel.data_mesh()
  n = jax.device_count()
  rows = np.arange(n * 3 * 2, dtype=np.float32).reshape(n * 3, 2)
  placed = parallel.shard_batch({'x': rows}, mesh)['x']
  assert placed.shape == rows.shape and placed.sharding == parallel.batch_sharded(mesh)
  np.testing.assert_array_equal(parallel.host_local_rows(placed), rows)
  by_device = parallel.shard_device_batch({'x': rows.reshape(n, 3, 2)}, mesh)['x']
  np.testing.assert_array_equal(parallel.host_local_rows(by_device), rows)
  with pytest.raises(ValueError, match=r'expected \[local_devices=1, per_device_batch'):
    parallel.shard_device_batch({'x': rows.reshape(3, n, 2)[:, :, 0]}, mesh)
  with pytest.raises(ValueError, match='leading example axis'):
    parallel.shard_batch({'x': np.float32(1.0)}, mesh)

  replicated = parallel.replicate({'w': np.arange(4.0)}, mesh)['w']
  assert replicated.sharding == parallel.replicated(mesh) and replicated.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(replicated), np.arange(4.0))
  np.testing.assert_array_equal(parallel.sum_over_processes(np.array([1.0, 2.0])), [1.0, 2.0])
  parallel.sync_processes('alone')  # returns at once with one process


def test_a_replicated_or_restored_state_is_donated_in_place(tmp_path):
  """The trainer donates its state to every step, the first one replicated from jax arrays (or
  numpy) or restored from a checkpoint: the step must update those buffers in place, not copy
  them (which keeps two train states alive through the first step). Whether a host array is
  aliased varies from array to array (about 4 in 10 numpy arrays, 1 in 4 orbax restores here),
  so several of each."""
  mesh = parallel.data_mesh()
  step = jax.jit(lambda tree: jax.tree.map(lambda x: x + 1, tree), donate_argnums=0)

  def assert_updated_in_place(state):
    before = [x.addressable_data(0).unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    after = step(state)
    assert [x.addressable_data(0).unsafe_buffer_pointer() for x in jax.tree.leaves(after)] == before
    return after

  for n in range(8):
    made_by_jax = jax.jit(lambda: {'w': jax.numpy.ones((4096,)), 'b': jax.numpy.zeros((8,))})()
    assert_updated_in_place(parallel.replicate(made_by_jax, mesh))
    host = {'w': np.ones(1000 + n, np.float32), 'b': np.zeros(8 + n, np.float32)}
    after = assert_updated_in_place(parallel.replicate(host, mesh))
    np.testing.assert_array_equal(np.asarray(after['w']), 2.0)

  manager = workdir_lib.checkpoint_manager(
    str(tmp_path), experiment_config('phantom_knee', 'smoke')
  )
  manager.save(
    1, args=ocp.args.Composite(state=ocp.args.StandardSave({'w': np.ones(4096, np.float32)}))
  )
  manager.wait_until_finished()
  template = {'w': jax.ShapeDtypeStruct((4096,), np.float32)}
  for _ in range(8):
    assert_updated_in_place(workdir_lib.restore_state(manager, template, mesh))
  manager.close()


def test_initialize_distributed_does_nothing_alone_and_checks_its_flags(monkeypatch):
  for name in parallel.CLUSTER_ENV:
    monkeypatch.delenv(name, raising=False)
  parallel.initialize_distributed()
  assert jax.process_count() == 1
  with pytest.raises(ValueError, match='--process_id=2 with --num_processes=2'):
    parallel.initialize_distributed('127.0.0.1:1', 2, 2)


TWO_DEVICE_CHECKS = r"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from imask_jax import parallel

assert jax.device_count() == 2, jax.devices()
mesh = parallel.data_mesh()

# [devices, per_device, features]: device k gets batch[k]; host_local_rows inverts.
batch = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
placed = parallel.shard_device_batch(batch, mesh)
assert placed.shape == (6, 4)
for shard in placed.addressable_shards:
  k = mesh.devices.tolist().index(shard.device)
  np.testing.assert_array_equal(np.asarray(shard.data), batch[k])
np.testing.assert_array_equal(parallel.host_local_rows(placed), batch.reshape(6, 4))

# pmean over `data` of per-device means is the mean of the global batch.
mean = jax.jit(jax.shard_map(lambda x: jax.lax.pmean(jnp.mean(x, axis=0), parallel.DATA_AXIS),
                             mesh=mesh, in_specs=P(parallel.DATA_AXIS), out_specs=P()))
np.testing.assert_allclose(np.asarray(mean(placed)), batch.reshape(6, 4).mean(axis=0))

# A flat batch whose length equals the device count stays flat (no guessing at layouts).
flat = np.arange(2 * 5, dtype=np.float32).reshape(2, 5)
np.testing.assert_array_equal(parallel.host_local_rows(parallel.shard_batch(flat, mesh)), flat)
try:
  parallel.shard_batch(np.zeros((3, 4), np.float32), mesh)
except ValueError as e:
  assert 'cannot be split over 2 local devices' in str(e), e
else:
  raise AssertionError('a batch of 3 was split over 2 devices')
replicated = parallel.replicate(np.arange(3.0), mesh)
assert replicated.is_fully_replicated and len(replicated.addressable_shards) == 2
print('two-device checks passed')
"""


def test_batches_on_two_forced_host_devices():
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    JAX_PLATFORMS='cpu',
    CUDA_VISIBLE_DEVICES='',
    TF_CPP_MIN_LOG_LEVEL='2',
    PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
  )
  for name in parallel.CLUSTER_ENV:
    env.pop(name, None)
  result = subprocess.run(
    [sys.executable, '-c', TWO_DEVICE_CHECKS], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'two-device checks passed' in result.stdout
