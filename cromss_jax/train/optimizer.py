"""Optimiser and learning-rate schedules (the method's defaults are in configs/pretrain.py)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax import contrib as optax_contrib

from cromss_jax.train.task import train_everything


def create_optimizer(opt_cfg: ml_collections.ConfigDict,
                     trainable: Callable[[tuple[str, ...]], bool] = train_everything
                     ) -> optax.GradientTransformation:
  """Adam with coupled L2 (added to the gradient, as torch.optim.Adam's weight_decay).

  The learning rate is applied in the step (schedule x plateau scale), so this transformation
  returns Adam's direction only. Frozen parameters (trainable(path) False) get zero updates.
  """
  tx = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay),
                   optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps))
  if trainable is train_everything:  # no labels: the same state as plain Adam
    return tx

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'train' if trainable(_path_names(path)) else 'freeze', params)
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, 'key', getattr(k, 'name', str(k))) for k in path)


def learning_rate_fn(config: ml_collections.ConfigDict, total_steps: int) -> Callable:
  base = config.optimizer.learning_rate
  if config.schedule.name == 'cosine':
    return optax.cosine_decay_schedule(base, decay_steps=max(total_steps, 1))
  return lambda step: jnp.asarray(base, jnp.float32)


def create_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """torch ReduceLROnPlateau('min', threshold_mode='rel') semantics on the validation loss.

  torch reduces after MORE than `patience` bad epochs; optax after exactly `patience`, hence +1.
  """
  s = config.schedule
  return optax_contrib.reduce_on_plateau(factor=s.factor, patience=s.patience + 1,
                                         rtol=s.rel_threshold, atol=0.0,
                                         min_scale=(s.min_lr / config.optimizer.learning_rate))
