"""Data parallelism with pmap semantics, written with `jax.shard_map` over a 1-D mesh.

All devices of all hosts form one `data` axis. Train state is replicated; a global batch is
split along its leading axis; per-device code averages gradients and batch statistics with
`lax.pmean(..., DATA_AXIS)`. This is what `jax.pmap` means, and what it now lowers to; writing
it directly keeps us on the maintained API and lets `jax.jit` see the whole step.

Multi-host: `initialize_distributed` starts `jax.distributed` (gloo collectives on CPU). Every
process then holds the same replicated state and feeds its own rows of each global batch
(`shard_batch` / `shard_device_batch`); `host_local_rows` gives back this process's rows of a
batch-sharded result.
"""

from __future__ import annotations

import abc
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
# Environment variables that mean "this process is one of a cluster job": jax.distributed
# reads the coordinator and the process ids from them.
CLUSTER_ENV = ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS')


def initialize_distributed(
  coordinator_address: str = '', num_processes: int = 0, process_id: int = -1
) -> None:
  """Starts multi-host JAX when asked to, by arguments or by the cluster's environment.

  With no arguments and no cluster environment this is a no-op, so one-machine runs need
  nothing. Must run before anything touches a JAX device. On CPU the cross-process
  collectives need gloo.

  Args:
    coordinator_address: 'host:port' of process 0 ('' = from the cluster environment).
    num_processes: how many processes take part (0 = from the environment).
    process_id: this process's index in 0..num_processes-1 (-1 = from the environment).
  """
  explicit = bool(coordinator_address) or num_processes > 1
  if not explicit and not any(k in os.environ for k in CLUSTER_ENV):
    return
  if num_processes > 0 and process_id >= num_processes:
    raise ValueError(
      f'--process_id={process_id} with --num_processes={num_processes}; '
      'expected 0 <= process_id < num_processes'
    )
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs: dict[str, Any] = {}
  if coordinator_address:
    kwargs['coordinator_address'] = coordinator_address
  if num_processes > 0:
    kwargs['num_processes'] = num_processes
  if process_id >= 0:
    kwargs['process_id'] = process_id
  jax.distributed.initialize(**kwargs)
  logging.info(
    'jax.distributed: process %d of %d, %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every host, axis `data`."""
  return jax.make_mesh(
    (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Explicit,)
  )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a host pytree (identical on every process) on all devices, in buffers of the
  runtime's own.

  On the CPU a device array made from host memory may alias it (always for a view of a jax
  array's buffer, `np.asarray`, and for some numpy arrays), and a jitted step that donates such
  an array cannot update it in place: XLA allocates a second train state for the step's outputs
  and both stay alive. `device_put(..., may_alias=False)` copies into memory the runtime owns.
  """
  sharding = replicated(mesh)

  def place(x: Any) -> jax.Array:
    shared = jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(shared, sharding, may_alias=False)

  return jax.tree.map(place, tree)


def shard_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """This process's examples -> global arrays split over the `data` axis.

  Args:
    local_batch: pytree of arrays [local_examples, ...]; local_examples must be a multiple of
      the local device count, the same on every process.
  Returns:
    pytree of global arrays [local_examples * process_count, ...].
  """
  sharding = batch_sharded(mesh)
  local_devices = jax.local_device_count()

  def put(x):
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] % local_devices:
      raise ValueError(
        f'a batch of shape {x.shape} cannot be split over {local_devices} local '
        'devices: expected a leading example axis that is a multiple of it'
      )
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, local_batch)


def shard_device_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Like `shard_batch` for what the input pipeline yields: arrays shaped
  [local_devices, per_device_batch, ...] (device-major), flattened to [global_batch, ...]."""
  local_devices = jax.local_device_count()

  def flatten(x):
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] != local_devices:
      raise ValueError(
        f'a device batch of shape {x.shape}: expected [local_devices='
        f'{local_devices}, per_device_batch, ...]'
      )
    return x.reshape((-1,) + x.shape[2:])

  return shard_batch(jax.tree.map(flatten, local_batch), mesh)


def host_local_rows(tree: Any) -> Any:
  """This process's rows of batch-sharded global arrays, as NumPy, in global row order (the
  inverse of `shard_batch`). Fully addressable arrays (one process) come back whole."""

  def get(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
      return np.asarray(x)
    shards = {}
    for shard in x.addressable_shards:  # replicas of one row block appear once
      shards.setdefault(shard.index[0].start or 0, shard)
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])

  return jax.tree.map(get, tree)


def sum_over_processes(values: np.ndarray) -> np.ndarray:
  """Elementwise sum of a host array over all processes (itself with one process); a
  collective, so every process must call it at the same point."""
  values = np.asarray(values)
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


def sync_processes(name: str, timeout_seconds: float = 6 * 3600) -> None:
  """Barrier: returns once every process has called `sync_processes(name)` (at once alone).

  Uses the jax.distributed coordination service rather than a collective: a CPU (gloo)
  collective gives up when the processes arrive more than 30 s apart, which one process
  building a dataset or compiling more slowly easily exceeds. `name` must be unique in a run.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost as orbax_multihost  # the coordination client

  client = orbax_multihost.get_jax_distributed_client()
  client.wait_at_barrier(name, int(timeout_seconds * 1000))


class ProgramsBySize(abc.ABC):
  """One jitted program per input size (H, W), built on first use by the subclass's
  `build(image_size)`: whole scale-true slices come in a handful of bucketed sizes. Called as
  the program of the images' size; `lower` is jit's, for ahead-of-time compiling; `sizes`
  lists those built."""

  def __init__(self):
    self._by_size: dict[tuple[int, int], Any] = {}

  @abc.abstractmethod
  def build(self, image_size: tuple[int, int]) -> Any:
    """The jitted program for inputs of `image_size` (H, W)."""

  @property
  def sizes(self) -> list[tuple[int, int]]:
    return sorted(self._by_size)

  def for_size(self, image_size: tuple[int, int]) -> Any:
    image_size = tuple(int(n) for n in image_size)
    if image_size not in self._by_size:
      self._by_size[image_size] = self.build(image_size)
    return self._by_size[image_size]

  def __call__(self, variables, images):
    return self.for_size(images.shape[1:3])(variables, images)

  def lower(self, variables, images):
    return self.for_size(images.shape[1:3]).lower(variables, images)
