"""Training machinery shared by pretraining and transfer, and the CromSS pretraining task.

One compiled train step (jit with explicit in/out shardings and a donated state) runs the
forward passes, the loss, gradients and the update as a single XLA program; the epoch enters as
a value derived from the step inside the program, so nothing recompiles across epochs. A task
(`Task`) says what the model, loss, evaluation and data are; `train_and_evaluate` is the one
loop: evaluation each epoch, reduce-on-plateau, Orbax checkpoints (periodic, final, on SIGTERM),
automatic resume, TensorBoard summaries and a progress line.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from optax import contrib as optax_contrib

from cromss_jax import checkpointing
from cromss_jax import input_pipeline
from cromss_jax import metrics as metrics_lib
from cromss_jax import models
from cromss_jax import objective
from cromss_jax import sharding
from cromss_jax import visualize
from cromss_jax.config_validation import validate_mesh, validate_pretrain_config

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Any, Batch, jax.Array, jax.Array], tuple[jax.Array, tuple[Any, dict]]]


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. repeated non-finite losses); the last checkpoint is kept."""


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


@dataclasses.dataclass(frozen=True)
class Task:
  """What to train: the pieces that differ between pretraining and transfer.

  loss_fn(params, batch_stats, batch, epoch, rng) -> (loss, (new_batch_stats, metrics)).
  eval_fn(params, batch_stats, batch, epoch) -> dict of per-batch SUMS (added over the split).
  summarise(sums) -> dict of floats; must hold 'val_loss', which drives reduce-on-plateau.
  """
  name: str
  model: nn.Module
  init_batch: Callable[[], dict[str, np.ndarray]]
  apply_init: Callable[[nn.Module, jax.Array, Batch], Any]
  loss_fn: LossFn
  eval_fn: Callable[[Any, Any, Batch, jax.Array], dict[str, jax.Array]]
  summarise: Callable[[dict[str, np.ndarray]], dict[str, float]]
  train_iterator: Callable[[int], Iterator[dict[str, np.ndarray]]]
  eval_iterator: Callable[[], Iterator[dict[str, np.ndarray]]]
  steps_per_epoch: int
  global_batch_size: int
  trainable: Callable[[tuple[str, ...]], bool] | None = None
  panel_fn: Callable[[Any, Any, dict[str, np.ndarray], int, str], None] | None = None
  export_meta: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Optimiser and schedules
# ----------------------------------------------------------------------------------------------
def create_optimizer(opt_cfg: ml_collections.ConfigDict,
                     trainable: Callable[[tuple[str, ...]], bool] | None = None
                     ) -> optax.GradientTransformation:
  """Adam with coupled L2 (added to the gradient, as torch.optim.Adam's weight_decay).

  The learning rate is applied in the step (schedule x plateau scale), so this transformation
  returns Adam's direction only. Frozen parameters (trainable(path) False) get zero updates.
  """
  tx = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay),
                   optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps))
  if trainable is None:
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


# ----------------------------------------------------------------------------------------------
# The compiled step
# ----------------------------------------------------------------------------------------------
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, lr_fn: Callable,
               steps_per_epoch: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update. A non-finite loss or gradient leaves the state unchanged (but counted).

  The skip is one `lax.cond` around the whole update rather than a per-leaf select: the same
  result, and about 3x faster to compile on CPU (hundreds of selects each become a kernel).
  """
  epoch = (state.step // steps_per_epoch).astype(jnp.float32)
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (new_batch_stats, step_metrics)), grads = grad_fn(
      state.params, state.batch_stats, batch, epoch, rng)
  lr = lr_fn(state.step) * state.plateau.scale
  finite = jnp.isfinite(loss) & _all_finite(grads)

  def update(_):
    directions, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, jax.tree.map(lambda d: -lr * d, directions))
    return new_params, new_batch_stats, new_opt_state

  def skip(_):
    return state.params, state.batch_stats, state.opt_state

  params, batch_stats, opt_state = jax.lax.cond(finite, update, skip, None)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1))
  step_metrics = dict(step_metrics, loss=loss, lr=lr, finite=finite.astype(jnp.float32))
  return new_state, step_metrics


# ----------------------------------------------------------------------------------------------
# The CromSS pretraining task
# ----------------------------------------------------------------------------------------------
def _to_unit_float(x: jax.Array) -> jax.Array:
  """uint8 records -> [0, 1] floats (the normalisation itself happened at conversion)."""
  return x.astype(jnp.float32) / 255.0


def _pretrain_forward(model: nn.Module, params, batch_stats, batch: Batch, train: bool):
  variables = {'params': params, 'batch_stats': batch_stats}
  s1, s2 = _to_unit_float(batch['s1']), _to_unit_float(batch['s2'])
  if train:
    (z1, z2), updates = model.apply(variables, s1, s2, train=True, mutable=['batch_stats'])
    return z1, z2, updates['batch_stats']
  z1, z2 = model.apply(variables, s1, s2, train=False)
  return z1, z2, batch_stats


def _pretrain_prior(batch: Batch, obj_cfg: ml_collections.ConfigDict) -> jax.Array | None:
  if not obj_cfg.label_smoothing:
    return None
  return objective.smoothing_prior(batch['season_labels'], batch['season'], obj_cfg)


def pretrain_loss_fn(model: nn.Module, obj_cfg: ml_collections.ConfigDict) -> LossFn:
  def loss_fn(params, batch_stats, batch, epoch, rng):
    del rng  # the networks are deterministic; kept for tasks that need randomness
    z1, z2, new_batch_stats = _pretrain_forward(model, params, batch_stats, batch, True)
    loss, aux = objective.cromss_loss(z1, z2, batch['labels'], _pretrain_prior(batch, obj_cfg),
                                      epoch, obj_cfg)
    labels = batch['labels']
    step_metrics = {
        'seg_loss': aux['seg_loss'], 'cons_loss': aux['cons_loss'],
        'keep_ratio': aux['keep_ratio'],
        'seg_weight_s1': jnp.mean(aux['seg_weights_s1']),
        'seg_weight_s2': jnp.mean(aux['seg_weights_s2']),
        'cons_weight_s1': jnp.mean(aux['cons_weights_s1']),
        'cons_weight_s2': jnp.mean(aux['cons_weights_s2']),
        'train_acc_s1': jnp.mean(jnp.argmax(z1, -1) == labels),
        'train_acc_s2': jnp.mean(jnp.argmax(z2, -1) == labels),
    }
    return loss, (new_batch_stats, step_metrics)
  return loss_fn


def pretrain_eval_fn(model: nn.Module, obj_cfg: ml_collections.ConfigDict,
                     has_clean: bool) -> Callable:
  num_classes = obj_cfg.num_classes

  def eval_fn(params, batch_stats, batch, epoch):
    del epoch
    z1, z2, _ = _pretrain_forward(model, params, batch_stats, batch, False)
    valid = batch['valid'].astype(bool)
    pixel_mask = jnp.broadcast_to(valid[:, None, None], batch['labels'].shape)
    n = jnp.sum(valid.astype(jnp.float32))
    sums = {'val_loss_sum': objective.validation_loss(z1, z2, batch['labels'], obj_cfg,
                                                      mask=pixel_mask) * n,
            'val_samples': n}
    for name, z in (('s1', z1), ('s2', z2)):
      pred = jnp.argmax(z, -1)
      sums[f'cm_noisy_{name}'] = metrics_lib.confusion_matrix(batch['labels'], pred,
                                                              num_classes, pixel_mask)
      if has_clean:
        sums[f'cm_clean_{name}'] = metrics_lib.confusion_matrix(batch['clean_labels'], pred,
                                                                num_classes, pixel_mask)
    return sums
  return eval_fn


def summarise_confusions(sums: dict[str, np.ndarray]) -> dict[str, float]:
  out = {'val_loss': float(sums['val_loss_sum'] / max(float(sums['val_samples']), 1.0))}
  for key, value in sums.items():
    if key.startswith('cm_'):
      scores = metrics_lib.scores_from_confusion(value)
      name = key[3:]
      out[f'miou_{name}'] = scores['miou']
      out[f'oa_{name}'] = scores['oa']
  return out


def create_pretrain_task(config: ml_collections.ConfigDict) -> Task:
  info = input_pipeline.pretrain_info(config)
  obj_cfg = config.objective
  model = models.build_pretrain_model(config.model, obj_cfg.num_classes, config.data.s2_bands)
  crop = config.data.crop_size

  def init_batch():
    return {'s1': np.zeros((1, crop, crop, config.model.s1_channels), np.uint8),
            's2': np.zeros((1, crop, crop, config.data.s2_bands), np.uint8)}

  def apply_init(module, rng, batch):
    return module.init(rng, _to_unit_float(batch['s1']), _to_unit_float(batch['s2']),
                       train=False)

  def panel(params, batch_stats, batch, epoch, path):
    visualize.write_pretrain_panel(model, obj_cfg, params, batch_stats, batch, epoch, path)

  return Task(
      name='pretrain', model=model, init_batch=init_batch, apply_init=apply_init,
      loss_fn=pretrain_loss_fn(model, obj_cfg),
      eval_fn=pretrain_eval_fn(model, obj_cfg, info.has_clean_labels),
      summarise=summarise_confusions,
      train_iterator=lambda start: input_pipeline.create_pretrain_iterator(
          config, 'train', start_step=start),
      eval_iterator=lambda: input_pipeline.create_pretrain_iterator(config, 'validation'),
      steps_per_epoch=info.steps_per_epoch,
      global_batch_size=config.training.global_batch_size,
      panel_fn=panel)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class _StopFlag:
  """Set by SIGTERM (preemption): the loop saves a checkpoint at the next step and exits."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: checkpointing and stopping at the next step.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _state_factory(task: Task, config: ml_collections.ConfigDict, tx, plateau_tx):
  def make(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = task.apply_init(task.model, init_rng, task.init_batch())
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), plateau=plateau_tx.init(params),
                      rng=state_rng, nonfinite_streak=jnp.zeros((), jnp.int32),
                      nonfinite_total=jnp.zeros((), jnp.int32))
  return make, jax.random.PRNGKey(config.seed)


def abstract_state(task: Task, config: ml_collections.ConfigDict, mesh, tx, plateau_tx):
  """(shape/dtype/sharding tree of the state, shardings), without computing anything."""
  make, rng = _state_factory(task, config, tx, plateau_tx)
  shapes = jax.eval_shape(make, rng)
  shardings = sharding.state_shardings(mesh, shapes)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def init_state(task: Task, config: ml_collections.ConfigDict, mesh, tx, plateau_tx):
  """The initial state, created directly with its shardings (no host-side copy)."""
  make, rng = _state_factory(task, config, tx, plateau_tx)
  _, shardings = abstract_state(task, config, mesh, tx, plateau_tx)
  return jax.jit(make, out_shardings=shardings)(rng), shardings


def sum_over_split(eval_step: Callable, params, batch_stats,
                   host_batches: Iterator[dict[str, np.ndarray]], mesh,
                   epoch) -> tuple[dict[str, np.ndarray] | None, dict | None]:
  """Adds eval_step's per-batch sums over a whole split; also returns its first host batch.

  Sums are accumulated in float64 / int64 on the host so long splits lose no counts.
  """
  totals: dict[str, np.ndarray] | None = None
  first_batch = None
  for host_batch in host_batches:
    if first_batch is None:
      first_batch = host_batch
    batch = sharding.host_batch_to_global(host_batch, mesh)
    sums = jax.device_get(eval_step(params, batch_stats, batch, epoch))
    sums = {k: np.asarray(v, np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer)
                          else np.float64) for k, v in sums.items()}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  return totals, first_batch


def _evaluate(task: Task, eval_step, state: TrainState, mesh) -> tuple[dict, dict | None]:
  totals, first_batch = sum_over_split(eval_step, state.params, state.batch_stats,
                                       task.eval_iterator(), mesh,
                                       state.step // task.steps_per_epoch)
  if totals is None:
    raise TrainingError('The validation split is empty; convert with a larger --val-fraction.')
  return task.summarise(totals), first_batch


def _write_summaries(writer, step: int, values: Mapping[str, float]) -> None:
  if writer is None:
    return
  with writer.as_default(step=step):
    for key, value in values.items():
      tf.summary.scalar(key, value)
  writer.flush()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       task: Task | None = None) -> TrainState:
  """Trains until config.training.num_epochs, resuming from the workdir's latest checkpoint.

  SIGTERM at any point (also while compiling or restoring) checkpoints at the next step and
  returns; rerunning resumes.
  """
  with _StopFlag() as stop:
    return _train_and_evaluate(config, workdir, task, stop)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task | None,
                        stop: _StopFlag) -> TrainState:
  if task is None:
    validate_pretrain_config(config, device_count=jax.device_count())
    task = create_pretrain_task(config)
  else:
    validate_mesh(config, jax.device_count())
  tf.io.gfile.makedirs(workdir)
  mesh = sharding.create_mesh(config)
  steps_per_epoch = task.steps_per_epoch
  num_epochs = config.training.num_epochs
  total_steps = num_epochs * steps_per_epoch
  tx = create_optimizer(config.optimizer, task.trainable)
  plateau_tx = create_plateau(config)
  lr_fn = learning_rate_fn(config, total_steps)

  manager = checkpointing.create_manager(workdir, keep=config.training.keep_checkpoints)
  history: list[dict] = []
  if manager.latest_step() is not None:  # resume: restore into the abstract state, no init
    abstract, state_shardings = abstract_state(task, config, mesh, tx, plateau_tx)
    state, meta = checkpointing.restore_latest(manager, abstract)
    history = list(meta.get('history', []))
  else:
    state, state_shardings = init_state(task, config, mesh, tx, plateau_tx)
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info('Resuming at step %d (epoch %d).', start_step, start_step // steps_per_epoch)

  batch_sh = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=task.loss_fn, tx=tx, lr_fn=lr_fn,
                        steps_per_epoch=steps_per_epoch),
      in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, repl),
      donate_argnums=0)
  eval_step = jax.jit(task.eval_fn, out_shardings=repl)
  plateau_update = jax.jit(lambda p, v: plateau_tx.update({}, p, value=v)[1])

  is_main = jax.process_index() == 0
  writer = (tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
            if is_main else None)
  log_every = config.training.log_every_steps
  max_nonfinite = config.training.max_consecutive_nonfinite

  def meta() -> dict:
    return {'history': history, 'task': task.name, 'steps_per_epoch': steps_per_epoch,
            'config': config.to_json_best_effort(), **task.export_meta}

  if start_step >= total_steps:
    logging.info('Nothing to do: step %d >= %d total steps.', start_step, total_steps)
    return state

  train_iter = task.train_iterator(start_step)
  window: list[dict] = []
  window_start = time.perf_counter()
  window_first_step = start_step
  for step in range(start_step, total_steps):
    host_batch = next(train_iter)
    state, step_metrics = step_fn(state, sharding.host_batch_to_global(host_batch, mesh))
    window.append(step_metrics)
    done = step + 1
    at_boundary = done % log_every == 0 or done % steps_per_epoch == 0
    if at_boundary:
      fetched = jax.device_get(window)
      streak = int(jax.device_get(state.nonfinite_streak))
      means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      elapsed = time.perf_counter() - window_start
      rate = (done - window_first_step) * task.global_batch_size / max(elapsed, 1e-9)
      eta = (total_steps - done) * elapsed / max(done - window_first_step, 1)
      logging.info('step %d/%d epoch %d  loss %.4f  lr %.3g  %.1f img/s  ETA %s%s',
                   done, total_steps, done // steps_per_epoch, means['loss'], means['lr'],
                   rate, _format_duration(eta),
                   f'  skipped(non-finite) {int(jax.device_get(state.nonfinite_total))}'
                   if means['finite'] < 1 else '')
      _write_summaries(writer, done, {f'train/{k}': v for k, v in means.items()}
                       | {'train/imgs_per_s': rate})
      window, window_start, window_first_step = [], time.perf_counter(), done
      if streak >= max_nonfinite:
        raise TrainingError(
            f'{streak} consecutive steps had a non-finite loss or gradient (limit '
            f'config.training.max_consecutive_nonfinite={max_nonfinite}); stopping. The last '
            f'good checkpoint is in {manager.directory}. Lower the learning rate or check the '
            'data for NaN/inf.')
    # Hosts agree on stopping at boundaries; a single process can stop at any step.
    preempted = (_any_host(stop.requested) if at_boundary
                 else stop.requested and jax.process_count() == 1)
    if done % steps_per_epoch == 0:
      epoch = done // steps_per_epoch
      if epoch % config.training.eval_every_epochs == 0 or epoch == num_epochs:
        summary, first_val = _evaluate(task, eval_step, state, mesh)
        if config.schedule.name == 'plateau':
          state = state.replace(plateau=plateau_update(state.plateau,
                                                       jnp.float32(summary['val_loss'])))
        summary['lr_scale'] = float(jax.device_get(state.plateau.scale))
        history.append({'epoch': epoch, 'step': done, **summary})
        logging.info('epoch %d  %s', epoch,
                     '  '.join(f'{k} {v:.4f}' for k, v in summary.items()))
        _write_summaries(writer, done, {f'val/{k}': v for k, v in summary.items()})
        panel_every = config.training.panel_every_epochs
        if (task.panel_fn and is_main and panel_every and epoch % panel_every == 0
            and first_val is not None):
          path = os.path.join(workdir, 'panels', f'epoch_{epoch:04d}.png')
          task.panel_fn(state.params, state.batch_stats, first_val, epoch, path)
      if epoch % config.training.checkpoint_every_epochs == 0 or epoch == num_epochs:
        checkpointing.save(manager, done, state, meta())
    if preempted:
      if manager.latest_step() != done:  # the epoch boundary may have just saved this step
        checkpointing.save(manager, done, state, meta())
      logging.warning('Stopped for preemption at step %d; rerun the same command to resume.',
                      done)
      break
  if is_main:
    with tf.io.gfile.GFile(os.path.join(workdir, 'history.json'), 'w') as f:
      json.dump(history, f, indent=1)
  manager.close()
  return state


def _any_host(flag: bool) -> bool:
  """True when any host was asked to stop (only synchronised when several processes run)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.any(flags))


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h:d}:{m:02d}:{s:02d}'
