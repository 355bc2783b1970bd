"""What keeps a run's workdir safe: config checks on resume, one run at a time, only finite
checkpoints, unreadable checkpoints skipped, history kept with the checkpoint.

All on the toy task of helpers.py (compiles in about a second).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest

from cromss_jax import cli
from cromss_jax import train
from cromss_jax.train import run_guard
from helpers import complete_steps, flat, restore_step, toy_config, toy_task


@pytest.mark.slow
def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path):
  train.train_and_evaluate(toy_config(num_epochs=1), str(tmp_path), toy_task(2))
  changed = toy_config(num_epochs=2)
  changed.optimizer.learning_rate = 3e-2
  changed.objective.keep_ratio = 0.25
  with pytest.raises(cli.UserError) as info:
    train.train_and_evaluate(changed, str(tmp_path), toy_task(2))
  message = str(info.value)
  assert 'optimizer.learning_rate: 0.01 -> 0.03' in message
  assert 'objective.keep_ratio: 0.5 -> 0.25' in message
  assert 'training.num_epochs' not in message       # training longer is allowed
  assert '--allow_config_change' in message and '\n' not in message
  assert complete_steps(tmp_path) == [2], 'a refused resume must not touch the checkpoints'
  # Explicitly allowed: it resumes and records the new config.
  train.train_and_evaluate(changed, str(tmp_path), toy_task(2), allow_config_change=True)
  assert complete_steps(tmp_path) == [2, 4]
  recorded = json.loads((tmp_path / run_guard.CONFIG_FILE).read_text())
  assert recorded['optimizer']['learning_rate'] == 3e-2


@pytest.mark.slow
def test_resume_on_another_data_stream_is_refused(tmp_path):
  """The checkpoint records the stream (Data.stream); the step alone would point elsewhere."""
  stream = {'train_locations': 100, 'seed': 42}
  train.train_and_evaluate(toy_config(num_epochs=1), str(tmp_path), toy_task(2, stream=stream))
  assert restore_step(tmp_path, 2)[1]['data_stream'] == stream
  moved = dict(stream, train_locations=96)   # e.g. the data converted again with fewer
  with pytest.raises(cli.UserError) as info:
    train.train_and_evaluate(toy_config(num_epochs=2), str(tmp_path), toy_task(2, stream=moved))
  message = str(info.value)
  assert 'step 2' in message and 'train_locations: 100 -> 96' in message
  assert '--allow_config_change' in message and '\n' not in message
  assert complete_steps(tmp_path) == [2], 'a refused resume must not touch the checkpoints'
  # The same stream resumes; an explicitly allowed change does too, and is recorded.
  train.train_and_evaluate(toy_config(num_epochs=2), str(tmp_path), toy_task(2, stream=stream))
  train.train_and_evaluate(toy_config(num_epochs=3), str(tmp_path), toy_task(2, stream=moved),
                           allow_config_change=True)
  assert complete_steps(tmp_path)[-1] == 6
  assert restore_step(tmp_path, 6)[1]['data_stream'] == moved


def test_longer_training_and_moved_data_may_resume(tmp_path):
  train.train_and_evaluate(toy_config(num_epochs=1), str(tmp_path), toy_task(2))
  longer = toy_config(num_epochs=2)
  longer.data.dataset_dir = '/moved/elsewhere'
  longer.training.log_every_steps = 2
  state = train.train_and_evaluate(longer, str(tmp_path), toy_task(2))
  assert int(state.step) == 4


def test_two_runs_in_one_workdir_are_refused(tmp_path):
  with run_guard.WorkdirLock(str(tmp_path)):
    with pytest.raises(cli.UserError, match=rf'in use by pid {os.getpid()} '):
      train.train_and_evaluate(toy_config(num_epochs=1), str(tmp_path), toy_task(2))
  assert complete_steps(tmp_path) == []
  # The lock is gone with its holder: the run goes ahead.
  train.train_and_evaluate(toy_config(num_epochs=1), str(tmp_path), toy_task(2))
  assert complete_steps(tmp_path) == [2]


@pytest.mark.slow
def test_an_overflowing_update_is_refused_and_never_checkpointed(tmp_path):
  """A learning rate that overflows float32 makes every update infinite: each is refused, the
  state stays the initial (finite) one, and the stop message names a checkpoint that exists."""
  config = toy_config(num_epochs=5, max_nonfinite=3)
  config.optimizer.learning_rate = 1e39        # inf in float32 (the validator rejects it first)
  with pytest.raises(train.TrainingError) as info:
    train.train_and_evaluate(config, str(tmp_path), toy_task(2))
  steps = complete_steps(tmp_path)
  assert steps, 'the epoch-boundary checkpoint of the (unchanged) state was not written'
  for step in steps:
    for leaf in flat(restore_step(tmp_path, step)[0]).values():
      assert np.all(np.isfinite(leaf))
  message = str(info.value)
  assert re.search(rf'last good checkpoint \(step {steps[-1]}\)', message), message
  assert 'non-finite loss, gradient or update' in message


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(toy_config(num_epochs=2), str(tmp_path), toy_task(2))
  assert complete_steps(tmp_path) == [2, 4]
  reference = train.train_and_evaluate(toy_config(num_epochs=3), str(tmp_path / 'ref'),
                                       toy_task(2))
  # Damage every array file of the latest checkpoint (as a disk fault or a partial copy would).
  latest = tmp_path / 'checkpoints' / '4' / 'state'
  damaged = 0
  for root, _, names in os.walk(latest):
    for name in names:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and not name.endswith('.json'):
        with open(path, 'r+b') as f:
          f.truncate(16)
        damaged += 1
  assert damaged
  state = train.train_and_evaluate(toy_config(num_epochs=3), str(tmp_path), toy_task(2))
  assert 'cannot be read' in caplog.text and 'Resuming at step 2 ' in caplog.text
  assert int(state.step) == 6 and complete_steps(tmp_path) == [2, 4, 6]
  assert os.listdir(tmp_path / 'unreadable_checkpoints')
  for key, value in flat(reference).items():
    np.testing.assert_array_equal(flat(state)[key], value, err_msg=key)


def test_history_is_rewritten_when_a_finished_run_is_rerun(tmp_path):
  train.train_and_evaluate(toy_config(num_epochs=2), str(tmp_path), toy_task(2))
  history = json.loads((tmp_path / 'history.json').read_text())
  os.remove(tmp_path / 'history.json')       # the kill came between checkpoint and history
  train.train_and_evaluate(toy_config(num_epochs=2), str(tmp_path), toy_task(2))
  assert json.loads((tmp_path / 'history.json').read_text()) == history
  assert [h['epoch'] for h in history] == [1, 2]


def test_another_architecture_in_the_workdir_is_one_user_error(tmp_path):
  train.train_and_evaluate(toy_config(num_epochs=1), str(tmp_path), toy_task(2))
  with pytest.raises(cli.UserError) as info:
    train.train_and_evaluate(toy_config(num_epochs=2), str(tmp_path), toy_task(2, width=6))
  assert 'can be restored' in str(info.value) and '\n' not in str(info.value)
  shutil.rmtree(tmp_path / 'checkpoints')
