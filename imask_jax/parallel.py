"""Data parallelism with pmap semantics, written with `jax.shard_map` over a 1-D mesh.

All devices of all hosts form one `data` axis. Train state is replicated; a global batch is
split along its leading axis; per-device code averages gradients and batch statistics with
`lax.pmean(..., DATA_AXIS)`. This is what `jax.pmap` means, and what it now lowers to; writing
it directly keeps us on the maintained API and lets `jax.jit` see the whole step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts multi-host JAX when asked to, by flags or by the cluster's environment.

  With no arguments and no cluster environment this is a no-op, so one-machine runs need
  nothing. On CPU the cross-process collectives need gloo.
  """
  explicit = bool(coordinator_address) or num_processes > 1
  env_cluster = any(k in os.environ for k in ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
                                               'JAX_COORDINATOR_ADDRESS'))
  if not explicit and not env_cluster:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs: dict[str, Any] = {}
  if coordinator_address:
    kwargs['coordinator_address'] = coordinator_address
  if num_processes > 0:
    kwargs['num_processes'] = num_processes
  if process_id >= 0:
    kwargs['process_id'] = process_id
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every host, axis `data`."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Explicit,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a host pytree (identical on every process) on all devices."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      tree)


def shard_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Turns this process's part of the batch into one global array per leaf.

  Args:
    local_batch: pytree of arrays shaped [local_devices, per_device_batch, ...] (what the
      input pipeline yields) or [local_examples, ...].
  Returns:
    pytree of global arrays shaped [global_batch, ...], split over the `data` axis.
  """
  sharding = batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    if x.ndim >= 2 and x.shape[0] == jax.local_device_count():
      x = x.reshape((-1,) + x.shape[2:])
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, local_batch)


def data_parallel(fn: Callable[..., Any], mesh: jax.sharding.Mesh, *,
                  batch_argnums: tuple[int, ...], out_batched: Any = False) -> Callable[..., Any]:
  """Wraps per-device `fn` in shard_map: args in `batch_argnums` are split, the rest replicated.

  `out_batched` is a pytree prefix of booleans saying which outputs are per-example (split)
  rather than replicated (already reduced with pmean inside `fn`).
  """

  def specs_for_args(num_args: int):
    return tuple(P(DATA_AXIS) if i in batch_argnums else P() for i in range(num_args))

  def wrapped(*args):
    out_specs = jax.tree.map(lambda b: P(DATA_AXIS) if b else P(), out_batched)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs_for_args(len(args)),
                         out_specs=out_specs, check_vma=False)(*args)

  return wrapped


def pmean_if_bound(tree: Any, axis_name: str = DATA_AXIS) -> Any:
  """`lax.pmean` over `axis_name` inside shard_map; identity when the axis is not bound."""
  try:
    return jax.lax.pmean(tree, axis_name)
  except NameError:
    return tree


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
