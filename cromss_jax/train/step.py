"""The compiled train step: forward, loss, gradients and update as one XLA program."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cromss_jax import sharding
from cromss_jax.train import optimizer as optimizer_lib
from cromss_jax.train.state import TrainState
from cromss_jax.train.task import Batch, Learner, LossFn


def all_finite(tree) -> jax.Array:
  """One boolean: every element of every leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, lr_fn: Callable,
               steps_per_epoch: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update. A non-finite loss, gradient or update leaves the state unchanged (counted).

  The skip is one `lax.cond` around the whole update rather than a per-leaf select: the same
  result, and far less to compile (hundreds of selects would each become a kernel; see
  docs/PERFORMANCE.md).
  """
  epoch = (state.step // steps_per_epoch).astype(jnp.float32)
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (new_batch_stats, step_metrics)), grads = grad_fn(
      state.params, state.batch_stats, batch, epoch, rng)
  lr = lr_fn(state.step) * state.plateau.scale
  finite = jnp.isfinite(loss) & all_finite(grads)

  def update(_):
    directions, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, jax.tree.map(lambda d: -lr * d, directions))
    # An update that overflows (huge learning rate) is refused like a non-finite gradient, so
    # the state, and hence every checkpoint, only ever holds finite values.
    ok = all_finite(new_params) & all_finite(new_opt_state) & all_finite(new_batch_stats)
    return jax.lax.cond(ok, lambda: (new_params, new_batch_stats, new_opt_state, ok),
                        lambda: (state.params, state.batch_stats, state.opt_state, ok))

  def skip(_):
    return state.params, state.batch_stats, state.opt_state, jnp.array(False)

  params, batch_stats, opt_state, finite = jax.lax.cond(finite, update, skip, None)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1))
  step_metrics = dict(step_metrics, loss=loss, lr=lr, finite=finite.astype(jnp.float32))
  return new_state, step_metrics


def make_train_step(learner: Learner, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    state_shardings: Any, *, steps_per_epoch: int, total_steps: int,
                    tx: optax.GradientTransformation) -> Callable:
  """The jitted step `(state, batch) -> (state, metrics)` with explicit shardings.

  The state is donated (updated in place on the device); the batch is split over the mesh's
  data axes; metrics come back replicated. The one step the loop, the benchmark and the tests use.
  """
  step = functools.partial(train_step, loss_fn=learner.loss_fn, tx=tx,
                           lr_fn=optimizer_lib.learning_rate_fn(config, total_steps),
                           steps_per_epoch=steps_per_epoch)
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
