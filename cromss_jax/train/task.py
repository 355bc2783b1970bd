"""The contract between a task (what to train) and the training loop (how).

A task is three parts, so that each user builds only what it needs: the benchmark and the
sharding tests build a `Learner` alone (model + loss: all `make_train_step` needs); the loop
takes a whole `Task` (learner + data + evaluation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np

Batch = Mapping[str, jax.Array]
HostBatch = dict[str, np.ndarray]
LossFn = Callable[[Any, Any, Batch, jax.Array, jax.Array], tuple[jax.Array, tuple[Any, dict]]]
EvalFn = Callable[[Any, Any, Batch, jax.Array], dict[str, jax.Array]]
PanelFn = Callable[[Any, Any, HostBatch, int, str], None]


def train_everything(path: tuple[str, ...]) -> bool:
  del path
  return True


def no_init_inputs() -> None:
  return None


@dataclasses.dataclass(frozen=True)
class Learner:
  """The model and its training loss.

  init_batch() -> a host batch of the input shapes (for `init`);
  init_inputs() -> host arrays that the init takes as arguments (a pretrained encoder), so that
    they are not compiled in as constants: one init program then serves every encoder of the
    same shapes, and its compiled form can be cached;
  apply_init(model, rng, batch, inputs) -> the variables {'params', 'batch_stats'};
  loss_fn(params, batch_stats, batch, epoch, rng) -> (loss, (new_batch_stats, metrics));
  trainable(path) -> False for parameters that must not change (frozen encoders).
  """
  model: nn.Module
  init_batch: Callable[[], HostBatch]
  apply_init: Callable[[nn.Module, jax.Array, HostBatch, Any], Any]
  loss_fn: LossFn
  trainable: Callable[[tuple[str, ...]], bool] = train_everything
  init_inputs: Callable[[], Any] = no_init_inputs


@dataclasses.dataclass(frozen=True)
class Data:
  """The training stream: `train_iterator(start_step)` resumes exactly at `start_step`.

  `stream` names everything besides the step that fixes the sequence of batches (dataset size,
  seed, batch, ...). It is saved in every checkpoint, and a resume with another stream is
  refused: the step alone would then point at other batches than those of the interrupted run.
  """
  train_iterator: Callable[[int], Iterator[HostBatch]]
  steps_per_epoch: int
  global_batch_size: int
  stream: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Evaluation over a whole split, run each `training.eval_every_epochs`.

  eval_fn(params, batch_stats, batch, epoch) -> dict of per-batch SUMS (added over the split);
  summarise(sums) -> dict of floats; must hold 'val_loss' (drives reduce-on-plateau);
  panel(params, batch_stats, first_batch, epoch, png_path) writes a picture (or nothing).
  """
  eval_fn: EvalFn
  summarise: Callable[[dict[str, np.ndarray]], dict[str, float]]
  eval_iterator: Callable[[], Iterator[HostBatch]]
  panel: PanelFn | None = None


@dataclasses.dataclass(frozen=True)
class Task:
  """What to train: learner, data and evaluation, and what a checkpoint should record."""
  name: str
  learner: Learner
  data: Data
  evaluation: Evaluation
  checkpoint_meta: dict = dataclasses.field(default_factory=dict)
