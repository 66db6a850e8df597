"""The train state and the jitted, data-parallel training step (the detection and
segmentation programs that validation runs are in inference/programs.py).

The step is per-device code in `jax.shard_map` inside `jax.jit` over the 1-D `data` mesh (pmap
semantics; see parallel.py): gradients, losses and batch statistics are averaged with
`lax.pmean`. Randomness is a pure function of (seed, step, global example index), so a run is
repeatable and independent of the device count.

A step whose loss or gradient is not finite changes nothing but two counters (it is skipped);
the trainer decides when too many in a row stop the run.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from imask_jax import host_memory, parallel
from imask_jax.models.build import init_variables
from imask_jax.models.mask_rcnn import MaskRCNN
from imask_jax.models.unet import UNet
from imask_jax.weights import pretrained

MODEL_INPUT_KEYS = ('image', 'gt_boxes', 'gt_classes', 'gt_masks', 'gt_valid')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied or skipped so far
  params: Any
  batch_stats: Any  # {} unless the backbone uses batch norm
  opt_state: Any
  nonfinite_in_a_row: jax.Array  # int32: consecutive skipped (non-finite) updates
  nonfinite_total: jax.Array  # int32


def init_state(
  model: MaskRCNN | UNet, tx: optax.GradientTransformation, seed: int, init_from: str = ''
) -> TrainState:
  """Fresh state on the host (the same on every process: it depends only on the seed and on
  `init_from`, a convert_weights file whose arrays replace the initial ones, see pretrained:
  Mask R-CNN's backbone and heads, or a U-Net's backbone encoder)."""
  variables = jax.jit(functools.partial(init_variables, model))(jax.random.PRNGKey(seed))
  ratios = model.spec.anchor_ratios if isinstance(model, MaskRCNN) else None
  variables = pretrained.init_from(variables, init_from, anchor_ratios=ratios)
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
    nonfinite_in_a_row=jnp.zeros((), jnp.int32),
    nonfinite_total=jnp.zeros((), jnp.int32),
  )


# The sampling keys are threefry keys whatever the default PRNG: jax.vmap of the 'rbg' bit
# generator draws a batch from one key (JAX's loop-free batching rule), so an example's draws
# would depend on which other examples share its device; threefry draws per key, so a run does
# not depend on the device count.
SAMPLING_PRNG = 'threefry2x32'


def example_keys(seed: int, step: jax.Array, first_index: jax.Array, count: int) -> jax.Array:
  """[count] typed threefry PRNG keys of examples first_index .. first_index + count - 1 of a
  step's batch (a function of the seed, the step and the global example index only)."""
  step_key = jax.random.fold_in(jax.random.key(seed, impl=SAMPLING_PRNG), step)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
    first_index + jnp.arange(count, dtype=jnp.int32)
  )


def make_train_step(
  model: MaskRCNN | UNet,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  seed: int,
  schedule: optax.Schedule | None = None,
):
  """jit(shard_map(per-device step)): (state, batch) -> (state, metrics), state donated.

  batch: the MODEL_INPUT_KEYS arrays, [global_batch, ...], split over `data`. metrics: float32
  scalars (loss terms, loss, grad_norm, finite, learning_rate if `schedule` is given) and the
  int32 counters nonfinite_in_a_row and nonfinite_total after the step.
  """

  def per_device(state: TrainState, batch: dict[str, jax.Array]):
    local = batch['image'].shape[0]
    first = jax.lax.axis_index(parallel.DATA_AXIS) * local
    keys = example_keys(seed, state.step, first, local)
    targets = {k: batch[k] for k in ('gt_boxes', 'gt_classes', 'gt_masks', 'gt_valid')}

    def loss_fn(params):
      variables = {'params': params}
      if state.batch_stats:
        variables['batch_stats'] = state.batch_stats
      (loss, terms), updates = model.apply(
        variables,
        batch['image'],
        targets,
        keys,
        True,
        method=type(model).losses,
        mutable=['batch_stats'],
      )
      return loss, (terms, updates)

    (loss, (terms, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Per-image mean losses on equal per-device batches: the mean over devices is the global one.
    grads, loss, terms = jax.lax.pmean((grads, loss, terms), parallel.DATA_AXIS)
    batch_stats = jax.lax.pmean(updates.get('batch_stats', state.batch_stats), parallel.DATA_AXIS)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # A non-finite step changes nothing but the counters. A branch, not a select between the
    # updated and the old state: XLA fuses the optimiser's update into both the new parameters
    # and such a select, so it copied every Adam moment to keep the old one (about a state's
    # worth of memory, benchmarks/README.md "Memory").
    def apply_update(operands):
      grads, opt_state, params = operands
      updates_, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates_), opt_state

    params, opt_state = jax.lax.cond(
      finite, apply_update, lambda o: (o[2], o[1]), (grads, state.opt_state, state.params)
    )
    in_a_row = jnp.where(finite, 0, state.nonfinite_in_a_row + 1)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), batch_stats, state.batch_stats
      ),
      opt_state=opt_state,
      nonfinite_in_a_row=in_a_row,
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = dict(
      terms,
      loss=loss,
      grad_norm=grad_norm,
      finite=finite.astype(jnp.float32),
      nonfinite_in_a_row=in_a_row,
      nonfinite_total=new_state.nonfinite_total,
    )
    if schedule is not None:
      # Skipped steps leave the optimiser's count alone: this is the rate this update used.
      metrics['learning_rate'] = jnp.asarray(
        schedule(state.step - state.nonfinite_total), jnp.float32
      )
    return new_state, metrics

  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(P(), P(parallel.DATA_AXIS)),
    out_specs=(P(), P()),
    check_vma=False,
  )
  return jax.jit(sharded, donate_argnums=0)


def model_variables(state: TrainState) -> dict[str, Any]:
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def compile_together(fn, args: tuple[Any, ...], name: str):
  """`fn` (jitted) compiled ahead of time for `args` (arrays or ShapeDtypeStructs), after which
  every process waits for the others: their first collective then starts together (CPU gloo
  collectives give up when processes arrive more than 30 s apart, and compile times differ).
  The memory the compiler freed is returned to the OS (`host_memory`)."""
  compiled = fn.lower(*args).compile()
  host_memory.release_freed_memory()
  parallel.sync_processes(f'imask_jax: compiled {name}')
  return compiled
