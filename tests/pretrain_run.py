"""The expensive artifacts of the training tests, made once and removed after their last use.

A 5-location demo dataset (4 train, 1 validation locations, clean labels) and run A, one
in-process `train.train_and_evaluate` of the tiny config (helpers.TINY). When a two-process test
is selected, the two-process run (tests/drivers/two_process_train.py) is started in the
background before run A, so that the two overlap. Used by test_train.py and test_export.py,
whose tests form the xdist group GROUP; conftest.py calls `release` after the group's last test
(~1.4 GB of checkpoints and exports), and a later user would make the run again.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cromss_jax import checkpointing
from cromss_jax import input_pipeline
from cromss_jax import sharding
from cromss_jax import train
from cromss_jax.tasks import pretrain
from helpers import TINY_CONFIG, Proc, cli_overrides, flat, save_npz, tiny_config
from helpers import REPO

GROUP = 'pretrain_run'
_SHARED: dict[str, Any] = {}
MULTIPROCESS_TESTS = ('test_two_processes_match_one_process',
                      'test_export_reads_checkpoint_of_multiprocess_run')


def _make_dataset(root: Path) -> str:
  from data_prep import make_demo, ssl4eo
  raw = root / 'raw'
  make_demo.make_demo(raw, locations=5, seed=0, dfc_validation=0, dfc_test=0, scene_size=None)
  ssl = raw / 'ssl4eo'
  out = root / 'ssl4eo_s12_nol'
  ssl4eo.main(['--s1', str(ssl / 's1'), '--s2', str(ssl / 's2c'),
               '--labels', str(ssl / 'labels' / 'noisy_manifest.csv'),
               '--clean-labels', str(ssl / 'labels' / 'clean_manifest.csv'),
               '--out', str(out), '--val-fraction', '0.25', '--workers', '1'])
  return str(out)


def _save_initial_state(dataset_dir: str, path: Path) -> None:
  """train.init_state of the tiny config (the same program run A compiles) as numpy."""
  config = tiny_config(dataset_dir)
  learner = pretrain.create_pretrain_learner(config)
  state, _ = train.init_state(learner, config, sharding.create_mesh(config),
                              train.create_optimizer(config.optimizer),
                              train.create_plateau(config))
  save_npz(path, flat(state))


def _save_fixed_batches(dataset_dir: str, path: Path) -> None:
  """Run A's first two training batches and its validation batch, as run A sees them."""
  config = tiny_config(dataset_dir)
  arrays = {}
  train_iter = input_pipeline.create_pretrain_iterator(config, 'train', start_step=0)
  for step in range(2):
    for key, value in next(train_iter).items():
      arrays[f'train{step}/{key}'] = value
  for key, value in next(input_pipeline.create_pretrain_iterator(config, 'validation')).items():
    arrays[f'val/{key}'] = value
  np.savez(path, **arrays)


DRIVER = Path(__file__).resolve().parent / 'drivers' / 'two_process_train.py'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch_multiprocess(root: Path, dataset_dir: str) -> dict:
  """Starts two processes (CPU, one device each) training 2 steps on run A's fixed batches."""
  workdir = root / 'mp_workdir'
  port = _free_port()
  tests = str(Path(__file__).resolve().parent)   # the driver imports helpers
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO), tests, os.environ.get('PYTHONPATH', '')]))
  procs = []
  for process_id in range(2):
    args = [sys.executable, str(DRIVER), str(root / 'batches.npz'), str(root / 'init.npz'),
            f'--config={TINY_CONFIG}',
            f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
            '--num_processes=2', f'--process_id={process_id}',
            *cli_overrides(dataset_dir, **{'training.num_epochs': 1})]
    procs.append(Proc(args, root / f'mp_process_{process_id}.log', env=env, background=True))
  return {'procs': procs, 'workdir': str(workdir), 'started': time.monotonic(),
          'init': str(root / 'init.npz')}


def _run_a(dataset_dir: str, workdir: Path) -> dict:
  """Run A in-process, counting how often the train and eval functions are traced."""
  config = tiny_config(dataset_dir, **{'training.panel_every_epochs': 1})
  task = pretrain.create_pretrain_task(config)
  traces = {'loss_fn': 0, 'eval_fn': 0}
  loss_fn, eval_fn = task.learner.loss_fn, task.evaluation.eval_fn

  def counted_loss(*args):
    traces['loss_fn'] += 1
    return loss_fn(*args)

  @functools.wraps(eval_fn)   # the program keeps its name: the CLI runs load it from the cache
  def counted_eval(*args):
    traces['eval_fn'] += 1
    return eval_fn(*args)

  task = dataclasses.replace(
      task, learner=dataclasses.replace(task.learner, loss_fn=counted_loss),
      evaluation=dataclasses.replace(task.evaluation, eval_fn=counted_eval))
  start = time.perf_counter()
  state = train.train_and_evaluate(config, str(workdir), task)
  return {'state': state, 'traces': traces, 'config': config,
          'seconds': time.perf_counter() - start}


def _once(key: str, make: Callable[[], Any]) -> Any:
  """_SHARED[key], made by `make` the first time. A failure is kept and raised again, so that
  the many tests using a broken artifact fail at once instead of each making it again."""
  if key not in _SHARED:
    try:
      _SHARED[key] = make()
    except KeyboardInterrupt:
      raise
    except BaseException as error:   # pytest.fail (a timed-out process) is not an Exception
      _SHARED[key] = error
      raise
  if isinstance(_SHARED[key], BaseException):
    raise RuntimeError(f'making the shared {key} failed in an earlier test') from _SHARED[key]
  return _SHARED[key]


def _make_shared_run(tmp_path_factory, request) -> dict:
  root = tmp_path_factory.mktemp('train_shared')
  run = {'dataset': _make_dataset(root), 'init': str(root / 'init.npz'), 'root': root}
  # Compiles the init program that run A then loads from the persistent cache.
  _save_initial_state(run['dataset'], root / 'init.npz')
  if any(item.name in MULTIPROCESS_TESTS for item in request.session.items):
    _save_fixed_batches(run['dataset'], root / 'batches.npz')
    mp = _launch_multiprocess(root, run['dataset'])
    run['mp'] = mp
    request.config.add_cleanup(lambda: [p.kill() for p in mp['procs']])
  run['a'] = _run_a(run['dataset'], root / 'A')
  run['a_workdir'] = str(root / 'A')
  return run


def shared_run(tmp_path_factory, request) -> dict:
  """Dataset + run A (+ the background two-process run when its test is selected), once."""
  return _once('run', lambda: _make_shared_run(tmp_path_factory, request))


def _export(run: dict) -> dict:
  out = Path(run['root']) / 'export' / 'E'
  out.parent.mkdir()
  proc = Proc([sys.executable, '-m', 'cromss_jax.export',
               f'--workdir={run["a_workdir"]}', f'--out={out}'], out.parent / 'export.log')
  rc = proc.wait()
  assert rc == 0, proc.tail()
  state, meta, step = checkpointing.load_latest_checkpoint(run['a_workdir'])
  return {'out': out, 'stdout': proc.text, 'state': state, 'meta': meta, 'step': step,
          'init': run['init'], 'workdir': run['a_workdir'],
          'variables': {'params': state['params'], 'batch_stats': state['batch_stats']}}


def exported_run(tmp_path_factory, request) -> dict:
  """Run A exported by the CLI (`python -m cromss_jax.export`), once."""
  run = shared_run(tmp_path_factory, request)
  return _once('exported', lambda: _export(run))


def release() -> None:
  """Removes the shared run from disk and memory (the background processes are done by now).

  Called only after passing tests (conftest.py); what a failed set-up left stays for inspection
  and its processes are killed at the end of the session (`add_cleanup`)."""
  run = _SHARED.get('run')
  if isinstance(run, dict):
    for proc in run.get('mp', {}).get('procs', ()):
      proc.kill()
    shutil.rmtree(run['root'], ignore_errors=True)
  _SHARED.clear()
