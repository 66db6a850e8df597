"""Activation rematerialisation that the CPU's scheduler cannot undo.

`recomputed(module, x)` is `module(x)` whose inner activations are not kept for the backward
pass: the backward pass runs the module's forward again from its input, then its gradient.

Why not `nn.remat` (`jax.checkpoint`): it keeps XLA from merging the recomputation with the
forward pass by an optimization barrier on the saved inputs, and XLA:CPU removes optimization
barriers early in its pipeline, after which common-subexpression elimination merges the two
again: the recomputation vanishes and every activation is kept, as without remat (XLA's plan
of the paper's step even grew; benchmarks/README.md, "Memory with the backbone recomputed").
Here the recomputation starts from `x + 0 * g0`, with g0 one element of the
output's cotangent: a value XLA cannot prove equal to `x` (0 * g0 is NaN for an infinite g0,
so it is not folded to 0), so it is neither merged with the forward nor scheduled before the
backward pass reaches the module, on every backend. A non-finite g0 makes this module's
gradients NaN, where they would have been non-finite anyway.

Variables: the module's parameters get gradients; its other collections (batch statistics) are
updated by the forward pass as usual, and read, not updated, by the recomputation. Training-mode
batch norm normalises with the statistics of the batch itself, so the recomputed values are the
forward's. Only the parameters may be differentiated (as the training step does): a gradient
with respect to the other collections is not defined here.
"""

from __future__ import annotations

import flax.linen as nn
import jax

Array = jax.Array


def recomputed(module: nn.Module, x: Array) -> Array:
  """`module(x)` with its activations recomputed in the backward pass (module docstring).

  module: a submodule created in the caller's compact method and not yet called, taking one
    array.
  """
  # An unbound copy for the backward pass, where no scope is available.
  detached = module.clone(parent=None)

  def call(mdl: nn.Module, x: Array) -> Array:
    return mdl(x)

  def forward(mdl: nn.Module, x: Array):
    snapshot = {name: dict(tree) for name, tree in mdl.variables.items() if name != 'params'}
    return mdl(x), (mdl.variables['params'], snapshot, x)

  def backward(residuals, y_cotangent):
    params, others, x = residuals
    x = x + (y_cotangent.reshape(-1)[0] * 0).astype(x.dtype)  # see the module docstring

    def pure(params, x):
      y, _ = detached.apply({'params': params, **others}, x, mutable=True)
      return y

    _, vjp = jax.vjp(pure, params, x)
    params_cotangent, x_cotangent = vjp(y_cotangent)
    return {'params': params_cotangent}, x_cotangent

  return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(module, x)
