"""The training system: config errors, one compiled step, non-finite steps, kill/resume, hosts.

Expensive artifacts are made once by `shared_run` (also used by test_export.py):
a 5-location demo dataset (4 train, 1 validation locations, clean labels) and run A, one
in-process `train.train_and_evaluate` of the tiny config (ResNet-18 mid fusion, float32, 64 px
crops, global batch 2, 3 epochs x 2 steps, a checkpoint every epoch). The subprocess runs (the
CLI kill/resume chain, the two-process run) compile the same programs; the persistent XLA
cache configured by conftest.py lets the CLI runs load them instead of compiling again. The
two-process run is started in the background before run A, so that the two overlap.

The non-finite and SIGTERM edge cases use a toy Task (a conv + BatchNorm + dense model on
synthetic numpy batches), which compiles in about a second.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cromss_jax import checkpointing
from cromss_jax import train
from cromss_jax.tasks import pretrain
from cromss_jax.train import state as state_lib
from cromss_jax.config_validation import ConfigError

import pretrain_run
from helpers import toy_config, toy_task
from helpers import (PROCESS_TIMEOUT_S, TMP_SUFFIX, TOTAL_STEPS, Proc, array_digests,
                     assert_trees_equal, cli_command, complete_steps, flat,
                     read_scalars, restore_step, tiny_config)

# Both modules use the one shared pretraining run: keep them on one xdist worker.
pytestmark = pytest.mark.xdist_group(pretrain_run.GROUP)



@pytest.fixture   # made once (pretrain_run memoises it); see test_export.exported
def shared(tmp_path_factory, request):
  return pretrain_run.shared_run(tmp_path_factory, request)


# ------------------------------------------------------------------------------------------------
# 1. Config errors: rejected before anything is compiled, with a message that says what to change
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('changes, devices, expected', [
    ({'training.global_batch_size': 3}, 2,
     [r'config\.training\.global_batch_size=3 is not divisible by the 2 devices of the mesh',
      'pick a multiple of 2']),
    ({'mesh.data': 2}, 1, [r'config\.mesh\.data=2', r'device count \(1\)', 'use -1']),
    ({'mesh.fsdp': 2}, 1, [r'config\.mesh\.fsdp=2',
                           r'positive divisor of the device count \(1\)']),
    ({'model.fusion': 'early'}, 1, [r"config\.model\.fusion='early'", r"'mid', 'late'"]),
    ({'data.s2_bands': 5}, 1, [r'config\.data\.s2_bands=5', 'one of 13, 12, 9, 3']),
    ({'data.crop_size': 288}, 1, [r'config\.data\.crop_size=288', r'tile_size=264',
                                  'use a crop <= the tile']),
    # The records hold 264 px tiles; the pipeline rejects a config that says otherwise.
    ({'data.tile_size': 128}, 1, [r'config\.data\.tile_size=128', '264x264',
                                  r'--config\.data\.tile_size=264']),
], ids=['batch-vs-devices', 'mesh-data', 'mesh-fsdp', 'fusion', 's2-bands', 'crop-gt-tile',
        'tile-vs-records'])
def test_config_errors_fail_before_compiling(shared, tmp_path, monkeypatch, changes, devices,
                                             expected):
  config = tiny_config(shared['dataset'], **changes)

  def no_compile(*args, **kwargs):
    raise AssertionError('init_state (the first compilation) ran before the config was rejected')
  monkeypatch.setattr(state_lib, 'init_state', no_compile)
  if devices != 1:   # what train_and_evaluate sees on a machine with `devices` devices
    monkeypatch.setattr(jax, 'device_count', lambda: devices)
  workdir = tmp_path / 'w'
  with pytest.raises((ConfigError, ValueError)) as info:
    train.train_and_evaluate(config, str(workdir), pretrain.create_pretrain_task(config))
  message = str(info.value)
  for pattern in expected:
    assert re.search(pattern, message), f'{pattern!r} not in {message!r}'
  assert not workdir.exists(), 'the workdir was created before the config was rejected'


def test_cli_rejects_a_bad_override_naming_the_key(shared, tmp_path):
  proc = Proc(cli_command(tmp_path / 'w', shared['dataset'], **{'objective.consistency': 'foo'}),
              tmp_path / 'cli.log')
  assert proc.wait() != 0
  assert re.search(r"config\.objective\.consistency='foo' is not allowed; expected one of "
                   r"'ce', 'kl', 'mse', 'none'", proc.text), proc.tail()
  assert 'Traceback' not in proc.text and 'step 1/' not in proc.text
  assert not (tmp_path / 'w').exists()


# ------------------------------------------------------------------------------------------------
# 2. One compiled step across epochs; history, TensorBoard, panels
# ------------------------------------------------------------------------------------------------
def test_run_traces_the_step_once_and_writes_history_summaries_panels(shared):
  a, workdir = shared['a'], Path(shared['a_workdir'])
  assert a['traces'] == {'loss_fn': 1, 'eval_fn': 1}, (
      f'{a["traces"]}: the train/eval step was traced more than once over 3 epochs')
  state = a['state']
  assert int(state.step) == TOTAL_STEPS
  assert int(state.nonfinite_total) == 0 and int(state.nonfinite_streak) == 0
  assert complete_steps(workdir) == [2, 4, 6]

  history = json.loads((workdir / 'history.json').read_text())
  assert [h['epoch'] for h in history] == [1, 2, 3]
  assert [h['step'] for h in history] == [2, 4, 6]
  for entry in history:
    for key in ('val_loss', 'miou_noisy_s1', 'miou_noisy_s2', 'miou_clean_s1', 'miou_clean_s2',
                'lr_scale'):
      assert np.isfinite(entry[key]), (key, entry)
    for key in ('miou_noisy_s1', 'miou_noisy_s2', 'miou_clean_s1', 'miou_clean_s2'):
      assert 0 <= entry[key] <= 100, (key, entry)

  scalars = read_scalars(workdir)
  assert sorted(scalars['train/loss']) == list(range(1, TOTAL_STEPS + 1))
  assert sorted(scalars['val/val_loss']) == [2, 4, 6]
  for tag in ('train/lr', 'train/finite', 'train/seg_loss', 'train/imgs_per_s',
              'val/miou_clean_s2', 'val/lr_scale'):
    assert tag in scalars, sorted(scalars)
  assert scalars['val/val_loss'][6] == pytest.approx(history[-1]['val_loss'], rel=1e-6)

  panels = sorted((workdir / 'panels').glob('*.png'))
  assert [p.name for p in panels] == ['epoch_0001.png', 'epoch_0002.png', 'epoch_0003.png']
  for panel in panels:
    assert panel.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and panel.stat().st_size > 1000


# ------------------------------------------------------------------------------------------------
# 3. Non-finite steps (toy task) and in-process SIGTERM at exact steps
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_batch_is_skipped_and_training_continues(tmp_path):
  yielded: list[int] = []
  state = train.train_and_evaluate(toy_config(num_epochs=5), str(tmp_path),
                                   toy_task(1, nan_steps={2}, yielded=yielded))
  assert yielded == [0, 1, 2, 3, 4]
  assert int(state.step) == 5
  assert int(state.nonfinite_total) == 1 and int(state.nonfinite_streak) == 0
  states = {step: restore_step(tmp_path, step)[0] for step in complete_steps(tmp_path)}
  assert sorted(states) == [1, 2, 3, 4, 5]
  before, after = states[2], states[3]          # around the NaN batch (step index 2)
  for part in ('params', 'batch_stats', 'opt_state'):
    assert_trees_equal(after[part], before[part], f'{part} after the NaN step')
  assert int(after['step']) == 3 and int(after['nonfinite_streak']) == 1
  assert int(after['nonfinite_total']) == 1
  for step in (2, 4, 5):    # every finite step updates the parameters
    prev, cur = flat(states[step - 1]['params']), flat(states[step]['params'])
    assert any(not np.array_equal(prev[k], cur[k]) for k in cur), f'step {step} did not update'
  for leaf in flat(states[5]).values():
    assert np.all(np.isfinite(leaf))
  assert int(states[4]['nonfinite_streak']) == 0 and int(states[4]['nonfinite_total']) == 1


@pytest.mark.slow
def test_consecutive_nan_batches_stop_training_and_keep_last_good_checkpoint(tmp_path):
  yielded: list[int] = []
  with pytest.raises(train.TrainingError) as info:
    train.train_and_evaluate(toy_config(num_epochs=5, max_nonfinite=3), str(tmp_path),
                             toy_task(2, nan_steps=set(range(2, 100)), yielded=yielded))
  message = str(info.value)
  assert 'max_consecutive_nonfinite=3' in message and '3 consecutive steps' in message
  assert str(tmp_path) in message
  # Steps 0..4 ran; batch 5 was already read (the loop reads one batch ahead).
  assert yielded == [0, 1, 2, 3, 4, 5], 'stopped at the wrong step (log_every_steps=1)'
  assert complete_steps(tmp_path) == [2, 4]
  good, latest = restore_step(tmp_path, 2)[0], restore_step(tmp_path, 4)[0]
  # The checkpoint written during the streak holds the last good update (step 2's).
  for part in ('params', 'batch_stats', 'opt_state'):
    assert_trees_equal(latest[part], good[part], f'{part} of the latest checkpoint')
  for leaf in flat(latest).values():
    assert np.all(np.isfinite(leaf))
  assert int(latest['nonfinite_streak']) == 2 and int(good['nonfinite_streak']) == 0


@pytest.fixture(scope='module')
def toy_reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('toy_reference')
  state = train.train_and_evaluate(toy_config(num_epochs=3), str(workdir), toy_task(2))
  return state, json.loads((workdir / 'history.json').read_text())


@pytest.mark.slow
@pytest.mark.parametrize('signal_step', [2, 3], ids=['at-epoch-end', 'mid-epoch'])
def test_sigterm_checkpoints_stops_and_resumes_exactly(tmp_path, toy_reference, signal_step):
  """SIGTERM while batch k is read (the loop reads it during step k-1, double buffering):
  checkpoint at k, stop; a rerun finishes like an unbroken run.

  k=2 is the end of epoch 1, where the regular epoch checkpoint is also due.
  """
  with pytest.raises(train.Preempted) as stopped:
    train.train_and_evaluate(toy_config(num_epochs=3), str(tmp_path),
                             toy_task(2, sigterm_before={signal_step}))
  assert stopped.value.step == signal_step
  assert int(stopped.value.state.step) == signal_step
  assert complete_steps(tmp_path)[-1] == signal_step
  assert signal.getsignal(signal.SIGTERM) is not None   # the previous handler is back
  final = train.train_and_evaluate(toy_config(num_epochs=3), str(tmp_path), toy_task(2))
  reference, reference_history = toy_reference
  assert_trees_equal(final, reference, 'resumed state')
  assert json.loads((tmp_path / 'history.json').read_text()) == reference_history


# ------------------------------------------------------------------------------------------------
# 4. The CLI killed (SIGKILL at a random point, SIGKILL during a checkpoint write), preempted
#    (SIGTERM) and rerun reproduces run A exactly
# ------------------------------------------------------------------------------------------------
def test_cli_kill_resume_and_preemption_reproduce_uninterrupted_run(shared, tmp_path):
  workdir = tmp_path / 'B'
  ckpt_dir = workdir / 'checkpoints'
  # One complete checkpoint kept (run A keeps 3): each is ~270 MB, and the runs below also
  # check that replacing the previous checkpoint survives a kill.
  command = cli_command(workdir, shared['dataset'], **{'training.keep_checkpoints': 1})
  runs: list[str] = []

  # (1) SIGKILL at a random moment after the first checkpoint is complete.
  proc = Proc(command, tmp_path / 'run1.log')
  proc.wait_for(r'Saved checkpoint at step 2 ')
  delay = random.uniform(0.0, 1.0)
  time.sleep(delay)
  proc.kill()
  assert proc.p.returncode == -signal.SIGKILL, f'run 1 ended by itself:\n{proc.tail()}'
  assert complete_steps(workdir)[-1] >= 2
  runs.append(f'run 1: SIGKILL {delay:.2f} s after checkpoint 2; complete: '
              f'{complete_steps(workdir)}')

  # (2) SIGKILL while Orbax writes a checkpoint (its temporary directory exists).
  before = set(os.listdir(ckpt_dir))
  proc = Proc(command, tmp_path / 'run2.log')
  deadline = time.monotonic() + PROCESS_TIMEOUT_S
  tmp_name = None
  while tmp_name is None:
    new = [n for n in os.listdir(ckpt_dir) if TMP_SUFFIX in n and n not in before]
    if new:
      tmp_name = new[0]
      proc.kill()
    elif proc.p.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'no checkpoint write was seen:\n{proc.tail()}')
    else:
      time.sleep(0.002)
  tmp_step = int(tmp_name.split('.')[0])
  caught_mid_write = (ckpt_dir / tmp_name).exists()
  assert caught_mid_write, (f'the kill came after Orbax finalised {tmp_name} (the write took '
                            'less than the polling interval)')
  assert tmp_step not in complete_steps(workdir), 'an interrupted write left a "complete" step'
  runs.append(f'run 2: SIGKILL during the write of step {tmp_step} ({tmp_name} left behind); '
              f'complete: {complete_steps(workdir)}')

  # (3) SIGTERM mid-run: checkpoint at the step it stops at, exit status 143 (requeue me).
  resume = complete_steps(workdir)[-1]
  proc = Proc(command, tmp_path / 'run3.log')
  proc.wait_for(rf'Resuming at step {resume} ')
  proc.wait_for(rf'step {resume + 1}/{TOTAL_STEPS} ')
  proc.p.send_signal(signal.SIGTERM)
  rc = proc.wait()
  assert rc == 143, f'SIGTERM run exited with {rc}:\n{proc.tail()}'
  stopped = int(re.search(r'Stopped for preemption at step (\d+)', proc.text).group(1))
  assert resume < stopped <= TOTAL_STEPS
  assert complete_steps(workdir)[-1] == stopped
  assert not (ckpt_dir / f'{tmp_step}{TMP_SUFFIX}').exists() or tmp_step > stopped
  runs.append(f'run 3: resumed at {resume}, SIGTERM, stopped at {stopped}')

  # (4) Rerun to the end.
  proc = Proc(command, tmp_path / 'run4.log')
  rc = proc.wait()
  assert rc == 0, proc.tail()
  if stopped < TOTAL_STEPS:
    assert f'Resuming at step {stopped} ' in proc.text
  runs.append(f'run 4: resumed at {stopped}, finished')
  print('\n'.join(runs))

  b_state, b_meta, b_step = checkpointing.load_latest_checkpoint(str(workdir))
  a_state, a_meta, a_step = checkpointing.load_latest_checkpoint(shared['a_workdir'])
  assert b_step == a_step == TOTAL_STEPS
  assert complete_steps(workdir) == [TOTAL_STEPS]   # keep_checkpoints=1 held across the kills
  assert_trees_equal(b_state, a_state, 'killed/resumed run vs run A')   # bitwise
  assert b_meta['history'] == a_meta['history']
  assert json.loads((workdir / 'history.json').read_text()) == a_meta['history']
  b_config, a_config = json.loads(b_meta['config']), json.loads(a_meta['config'])
  assert b_config['objective']['keep_ratio'] == 0.3       # the CLI override reached the run
  assert a_config['training'].pop('panel_every_epochs') == 1
  assert b_config['training'].pop('panel_every_epochs') == 0
  assert a_config['training'].pop('keep_checkpoints') == 3
  assert b_config['training'].pop('keep_checkpoints') == 1
  assert b_config == a_config


# ------------------------------------------------------------------------------------------------
# 5. Two processes (jax.distributed on CPU, one device each) == one process on the global batch
# ------------------------------------------------------------------------------------------------
def test_two_processes_match_one_process(shared):
  """Two CLI-configured processes train 2 steps, each feeding its half of run A's batches.

  Reference: run A (one process, one device, the same global batches), its checkpoint at step 2
  and its TensorBoard losses. The step-1 loss is computed from identical parameters, so it
  must agree to float32 rounding: BatchNorm statistics over each half alone would change it.
  Parameters agree only loosely, and that is inherent, not a defect: float32 gradients of this
  tiny-batch network carry ~0.5% (of each tensor's largest entry) rounding noise (measured: the
  1-device and the 2-device float32 gradients are both ~0.5% off a float64 gradient, while in
  float64 the two agree to 1e-14), and Adam's first steps move every parameter by ~lr*sign(g),
  so noise-level gradient entries can flip a step: |diff| <= 2 steps * 2 * 1.0014 * lr.
  """
  mp = shared.get('mp')
  assert mp is not None, 'the two-process run was not started'
  procs = mp['procs']
  for proc in procs:
    rc = proc.wait()
    assert rc == 0, f'process failed (rc {rc}):\n{proc.tail(60)}'
  for i, proc in enumerate(procs):
    assert f'Process {i} of 2; 1 local / 2 global devices.' in proc.text
    assert f'process {i} of 2 feeds rows slice({i}, {i + 1}, None)' in proc.text
    assert 'DRIVER DONE' in proc.text
  workdir = mp['workdir']
  replicas = [json.loads(Path(workdir, f'replica_{i}.json').read_text()) for i in range(2)]
  assert replicas[1] == replicas[0], [k for k in replicas[0]
                                      if replicas[1].get(k) != replicas[0][k]]
  assert complete_steps(workdir) == [2]
  mp_state, mp_meta = restore_step(workdir, 2)
  saved = flat(mp_state)
  assert sorted(replicas[0]) == sorted(k for k in saved if not k.startswith('opt_state/'))
  saved_digests = array_digests({k: saved[k] for k in replicas[0]})
  assert saved_digests == replicas[0], [k for k in replicas[0]
                                        if saved_digests[k] != replicas[0][k]]

  # Process 0 alone writes the summaries and history.json.
  assert len(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))) == 1
  with open(os.path.join(workdir, 'history.json')) as f:
    assert json.load(f) == mp_meta['history']

  ref_state, ref_meta = restore_step(shared['a_workdir'], 2)
  ref = flat(ref_state)
  mp_scalars, ref_scalars = read_scalars(workdir), read_scalars(shared['a_workdir'])
  loss1, ref_loss1 = mp_scalars['train/loss'][1], ref_scalars['train/loss'][1]
  loss2, ref_loss2 = mp_scalars['train/loss'][2], ref_scalars['train/loss'][2]
  assert loss1 == pytest.approx(ref_loss1, rel=2e-6), 'step-1 loss differs: BN not global?'
  assert loss2 == pytest.approx(ref_loss2, rel=1e-3)
  mp_val, ref_val = mp_meta['history'][0], ref_meta['history'][0]
  for key in ('val_loss', 'miou_noisy_s1', 'miou_noisy_s2', 'miou_clean_s1', 'miou_clean_s2'):
    assert mp_val[key] == pytest.approx(ref_val[key], rel=2e-2, abs=0.5), key

  assert int(saved['step']) == 2 and int(saved['nonfinite_total']) == 0
  np.testing.assert_array_equal(saved['rng'], ref['rng'])
  lr = tiny_config(shared['dataset']).optimizer.learning_rate
  params = [k for k in ref if k.startswith('params/')]
  stats = [k for k in ref if k.startswith('batch_stats/')]
  max_param_diff = max(float(np.max(np.abs(saved[k] - ref[k]))) for k in params)
  assert max_param_diff <= 2 * 2 * 1.0014 * lr + 1e-6
  # Relative to how far 2 steps moved the parameters (from the initial state).
  init = dict(np.load(mp['init']))
  moved = np.sqrt(sum(np.sum((ref[k] - init[k]).astype(np.float64) ** 2) for k in params))
  diff = np.sqrt(sum(np.sum((saved[k] - ref[k]).astype(np.float64) ** 2) for k in params))
  stat_norm = np.sqrt(sum(np.sum(ref[k].astype(np.float64) ** 2) for k in stats))
  stat_diff = np.sqrt(sum(np.sum((saved[k] - ref[k]).astype(np.float64) ** 2) for k in stats))
  print(f'\ntwo processes vs one: step-1 loss {loss1!r} vs {ref_loss1!r}, step-2 loss {loss2!r} '
        f'vs {ref_loss2!r}; params max |diff| {max_param_diff:.3g} (bound {4.0056 * lr:.3g}), '
        f'|diff|/|update| {diff / moved:.3g}; batch_stats |diff|/|stats| '
        f'{stat_diff / stat_norm:.3g}; '
        f'wall {time.monotonic() - mp["started"]:.0f} s since launch')
  assert diff / moved < 0.3
  assert stat_diff / stat_norm < 1e-2


def test_export_reads_checkpoint_of_multiprocess_run(shared, tmp_path):
  """A checkpoint written by two processes restores onto this one device."""
  mp = shared.get('mp')
  assert mp is not None, 'the two-process run was not started'
  assert all(proc.wait() == 0 for proc in mp['procs']), 'the two-process run failed'
  state, _, step = checkpointing.load_latest_checkpoint(mp['workdir'])
  assert step == 2 and 'params' in state
