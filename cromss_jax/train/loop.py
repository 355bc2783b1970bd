"""The training loop shared by every task: evaluation, schedules, checkpoints, resume.

Evaluation each epoch, reduce-on-plateau, Orbax checkpoints (periodic, final, on SIGTERM),
automatic resume, TensorBoard summaries and a progress line. The epoch enters the compiled
step as a value derived from the step counter, so nothing recompiles across epochs.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from cromss_jax import checkpointing
from cromss_jax import cli
from cromss_jax import sharding
from cromss_jax import utils
from cromss_jax.config_validation import validate_mesh
from cromss_jax.train import optimizer as optimizer_lib
from cromss_jax.train import run_guard
from cromss_jax.train import state as state_lib
from cromss_jax.train import step as step_lib
from cromss_jax.train import summaries
from cromss_jax.train.state import TrainState
from cromss_jax.train.task import Task


class TrainingError(cli.UserError):
  """Training cannot go on (e.g. repeated non-finite losses); the last checkpoint is kept."""


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
  evaluation = task.evaluation
  totals, first_batch = sum_over_split(eval_step, state.params, state.batch_stats,
                                       evaluation.eval_iterator(), mesh,
                                       state.step // task.data.steps_per_epoch)
  if totals is None:
    raise TrainingError('The validation split is empty; convert with a larger --val-fraction.')
  return evaluation.summarise(totals), first_batch


def _write_summaries(writer: summaries.ScalarWriter | None, step: int,
                     values: Mapping[str, float]) -> None:
  if writer is not None:
    writer.write_scalars(step, values)


def _write_history(workdir: str, history: list[dict]) -> None:
  utils.write_json(os.path.join(workdir, 'history.json'), history)


class Preempted(Exception):
  """SIGTERM stopped the run before it was complete; the state at `step` is checkpointed."""

  def __init__(self, step: int, state: TrainState):
    super().__init__(f'stopped for preemption at step {step}; the state is checkpointed: rerun '
                     'the same command to resume')
    self.step = step
    self.state = state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task, *,
                       allow_config_change: bool = False) -> TrainState:
  """Trains until config.training.num_epochs, resuming from the workdir's latest checkpoint.

  SIGTERM at any point (also while compiling or restoring) checkpoints at the next step and
  raises `Preempted`; rerunning resumes. A workdir made with another config is refused (the
  differing keys are named) unless `allow_config_change`; two runs in one workdir at once are
  refused (a lock file holds the owner's pid).
  """
  validate_mesh(config, jax.device_count())
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  # Process 0 alone writes the TensorBoard summaries.
  writer = (summaries.ScalarWriter(os.path.join(workdir, 'tensorboard'))
            if jax.process_index() == 0 else None)
  with run_guard.WorkdirLock(workdir), _StopFlag() as stop, \
      contextlib.nullcontext() if writer is None else writer:
    run_guard.check_and_record_config(workdir, config, allow_change=allow_config_change)
    return _train_and_evaluate(config, workdir, task, stop, writer, allow_config_change)


def _check_stream(recorded: Mapping | None, stream: Mapping, step: int, allow_change: bool
                  ) -> None:
  """Refuses to resume a data stream other than the checkpoint's (see task.Data.stream)."""
  if recorded is None or dict(recorded) == dict(stream):
    return
  differing = '; '.join(f'{k}: {recorded.get(k, "<absent>")!r} -> {stream.get(k, "<absent>")!r}'
                        for k in sorted(set(recorded) | set(stream))
                        if recorded.get(k) != stream.get(k))
  if not allow_change:
    raise cli.UserError(
        f'the checkpoint at step {step} was written with another training data stream '
        f'({differing}), so resuming would not continue its sequence of batches. Point '
        'config.data.dataset_dir at the same data, or pass --allow_config_change to resume '
        'with the new stream.')
  logging.warning('Resuming step %d with another data stream: %s.', step, differing)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task,
                        stop: _StopFlag, writer: summaries.ScalarWriter | None,
                        allow_config_change: bool = False) -> TrainState:
  learner, data = task.learner, task.data
  mesh = sharding.create_mesh(config)
  steps_per_epoch = data.steps_per_epoch
  num_epochs = config.training.num_epochs
  total_steps = num_epochs * steps_per_epoch
  tx = optimizer_lib.create_optimizer(config.optimizer, learner.trainable)
  plateau_tx = optimizer_lib.create_plateau(config)

  manager = checkpointing.create_manager(workdir, keep=config.training.keep_checkpoints)
  history: list[dict] = []
  restored = None
  if manager.all_steps():  # resume: restored into the abstract state, no init
    abstract, state_shardings = state_lib.abstract_state(learner, config, mesh, tx, plateau_tx)
    restored = checkpointing.restore_latest(manager, abstract)
  if restored is not None:
    state, meta = restored
    history = list(meta.get('history', []))
    _check_stream(meta.get('data_stream'), data.stream, int(jax.device_get(state.step)),
                  allow_config_change)
  else:  # fresh: init_state traces the init once, for its shapes, shardings and program
    state, state_shardings = state_lib.init_state(learner, config, mesh, tx, plateau_tx)
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info('Resuming at step %d (epoch %d).', start_step, start_step // steps_per_epoch)

  is_main = jax.process_index() == 0
  if start_step >= total_steps:
    logging.info('Nothing to do: step %d >= %d total steps.', start_step, total_steps)
    if is_main:  # a kill between the last checkpoint and history.json loses nothing
      _write_history(workdir, history)
    manager.close()
    return state

  step_fn = step_lib.make_train_step(learner, config, mesh, state_shardings,
                                     steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                     tx=tx)
  eval_step = jax.jit(task.evaluation.eval_fn, out_shardings=sharding.replicated(mesh))
  plateau_update = jax.jit(lambda p, v: plateau_tx.update({}, p, value=v)[1])
  # One program for the check before each save (eagerly it would be two per array shape).
  state_is_finite = jax.jit(
      lambda s: step_lib.all_finite((s.params, s.batch_stats, s.opt_state)),
      out_shardings=sharding.replicated(mesh))

  log_every = config.training.log_every_steps
  max_nonfinite = config.training.max_consecutive_nonfinite

  def last_checkpoint() -> str:
    latest = manager.latest_step()
    if latest is None:
      return 'No checkpoint was written (none was finite)'
    return f'The last good checkpoint (step {latest}) is in {manager.directory}'

  def save(step: int) -> None:
    if not bool(jax.device_get(state_is_finite(state))):
      raise TrainingError(f'The state at step {step} holds non-finite values and was not saved. '
                          f'{last_checkpoint()}. Lower the learning rate or check the data.')
    checkpointing.save(manager, step, state,
                       {'history': history, 'task': task.name,
                        'steps_per_epoch': steps_per_epoch, 'data_stream': dict(data.stream),
                        'config': config.to_json_best_effort(), **task.checkpoint_meta})

  train_iter = data.train_iterator(start_step)
  window: list[dict] = []
  window_start = time.perf_counter()
  window_first_step = start_step
  input_wait = 0.0

  def next_batch():
    """The next batch, already on its way to the devices (time spent here = input wait)."""
    nonlocal input_wait
    wait_start = time.perf_counter()
    batch = sharding.host_batch_to_global(next(train_iter), mesh)
    input_wait += time.perf_counter() - wait_start
    return batch

  # Double buffer: step s is dispatched (asynchronously) before batch s+1 is read and sent,
  # so the host's work and the transfer overlap the device's compute.
  batch = next_batch()
  for step in range(start_step, total_steps):
    state, step_metrics = step_fn(state, batch)
    if step + 1 < total_steps:
      batch = next_batch()
    window.append(step_metrics)
    done = step + 1
    at_boundary = done % log_every == 0 or done % steps_per_epoch == 0
    if at_boundary:
      fetched = jax.device_get(window)
      streak = int(jax.device_get(state.nonfinite_streak))
      means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      elapsed = time.perf_counter() - window_start
      rate = (done - window_first_step) * data.global_batch_size / max(elapsed, 1e-9)
      eta = (total_steps - done) * elapsed / max(done - window_first_step, 1)
      logging.info('step %d/%d epoch %d  loss %.4f  lr %.3g  %.1f img/s  input wait %.0f%%  '
                   'ETA %s%s', done, total_steps, done // steps_per_epoch, means['loss'],
                   means['lr'], rate, 100 * input_wait / max(elapsed, 1e-9),
                   _format_duration(eta),
                   f'  skipped(non-finite) {int(jax.device_get(state.nonfinite_total))}'
                   if means['finite'] < 1 else '')
      _write_summaries(writer, done, {f'train/{k}': v for k, v in means.items()}
                       | {'train/imgs_per_s': rate})
      window, window_start, window_first_step, input_wait = [], time.perf_counter(), done, 0.0
      if streak >= max_nonfinite:
        raise TrainingError(
            f'{streak} consecutive steps had a non-finite loss, gradient or update (limit '
            f'config.training.max_consecutive_nonfinite={max_nonfinite}); stopping. '
            f'{last_checkpoint()}. Lower the learning rate or check the data for NaN/inf.')
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
        panel = task.evaluation.panel
        if (panel and is_main and panel_every and epoch % panel_every == 0
            and first_val is not None):
          panel(state.params, state.batch_stats, first_val, epoch,
                os.path.join(workdir, 'panels', f'epoch_{epoch:04d}.png'))
      if epoch % config.training.checkpoint_every_epochs == 0 or epoch == num_epochs:
        save(done)
    if preempted:
      if manager.latest_step() != done:  # the epoch boundary may have just saved this step
        save(done)
      manager.close()
      logging.warning('Stopped for preemption at step %d; rerun the same command to resume.',
                      done)
      raise Preempted(done, state)
  if is_main:
    _write_history(workdir, history)
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
