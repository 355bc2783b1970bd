"""The train state: one dataclass with everything a run needs to continue where it stopped."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from cromss_jax import models
from cromss_jax import sharding
from cromss_jax.train.task import Learner


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: Any            # optax reduce-on-plateau state; its `scale` multiplies the LR
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


def _state_factory(learner: Learner, config: ml_collections.ConfigDict, tx, plateau_tx):
  """(make(rng, inputs) -> the initial TrainState, its arguments)."""
  def make(rng, inputs):
    init_rng, state_rng = jax.random.split(rng)
    variables = learner.apply_init(learner.model, init_rng, learner.init_batch(), inputs)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), plateau=plateau_tx.init(params),
                      rng=state_rng, nonfinite_streak=jnp.zeros((), jnp.int32),
                      nonfinite_total=jnp.zeros((), jnp.int32))
  return make, (jax.random.PRNGKey(config.seed), learner.init_inputs())


def _abstract(make, args: tuple, mesh):
  shapes = jax.eval_shape(make, *args)
  shardings = sharding.state_shardings(mesh, shapes)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def abstract_state(learner: Learner, config: ml_collections.ConfigDict, mesh, tx, plateau_tx):
  """(shape/dtype/sharding tree of the state, shardings), without computing anything."""
  make, args = _state_factory(learner, config, tx, plateau_tx)
  return _abstract(make, args, mesh)


def init_state(learner: Learner, config: ml_collections.ConfigDict, mesh, tx, plateau_tx):
  """The initial state, created directly with its shardings (no host-side copy)."""
  make, args = _state_factory(learner, config, tx, plateau_tx)
  _, shardings = _abstract(make, args, mesh)   # the same `make`: jit reuses this trace
  # The arguments are the same on every host: replicated (host numpy arrays may be passed).
  init = models.jit_init(make, mesh.devices.flat[0].platform,
                         in_shardings=sharding.replicated(mesh), out_shardings=shardings)
  return init(*args), shardings
