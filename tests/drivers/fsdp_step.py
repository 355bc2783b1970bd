"""One single-device and one FSDP-sharded train step (2 steps each); prints JSON.

  fsdp_step.py single REF.npz   one device: the losses and the state after the first step
  fsdp_step.py fsdp REF.npz     4 devices (--xla_force_host_platform_device_count=4), mesh
                                data=2 x fsdp=2: compared with REF.npz, printed as JSON

The single-device run is a process of its own, built with the benchmark's own config, batch
and schedule (`python -m cromss_jax.benchmark step --encoder resnet18 --batch 4 --size 32
--dtype f32`: `benchmark.step_config`, `synthetic_host_batch`, `SCHEDULE_STEPS`): its init and step
programs are then the ones tests/test_benchmark.py compiles, and on the same xdist worker after
it (xdist_group 'resnet18_step') they load from the persistent compilation cache instead of
compiling again (~60 s on 2 cores). In a process that simulates 4 devices the cache key differs
even for one-device programs, hence two processes. What is tested (FSDP equals one device)
depends on neither the crop nor the schedule.
"""
import json
import sys

import jax
import numpy as np

from configs import pretrain
from cromss_jax import sharding, train
from cromss_jax.apps import benchmark
from cromss_jax.tasks import pretrain as pretrain_task
from cromss_jax.config_validation import ConfigError, validate_mesh

SIZE, BATCH = 32, 4   # keep in step with tests/test_benchmark.py (BENCH_STEP)


def run(data, fsdp, devices):
  cfg = benchmark.step_config('resnet18', 'mid', 'f32', 13, SIZE, BATCH)
  cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
  learner = pretrain_task.create_pretrain_learner(cfg)
  mesh = sharding.create_mesh(cfg, devices)
  tx = train.create_optimizer(cfg.optimizer)
  state, shardings = train.init_state(learner, cfg, mesh, tx, train.create_plateau(cfg))
  step = train.make_train_step(learner, cfg, mesh, shardings,
                               steps_per_epoch=benchmark.SCHEDULE_STEPS,
                               total_steps=benchmark.SCHEDULE_STEPS, tx=tx)
  rng = np.random.default_rng(0)
  losses, after_first = [], None
  for _ in range(2):
    host = benchmark.synthetic_host_batch(rng, BATCH, SIZE, 13)
    state, metrics = step(state, sharding.host_batch_to_global(host, mesh))
    losses.append(float(metrics['loss']))
    if after_first is None:
      after_first = jax.device_get((state.params, state.batch_stats))
  kernel = state.params['encoder_s2']['layer4']['block0']['conv2']['kernel']
  return after_first, losses, str(kernel.sharding.spec)


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


mode, ref_path = sys.argv[1:]
if mode == 'single':
  assert jax.device_count() == 1, jax.devices()
  (params, stats), losses, spec = run(1, 1, jax.devices())
  np.savez(ref_path, losses=np.asarray(losses), spec=np.asarray(spec),
           **{f'p{i}': x for i, x in enumerate(_leaves(params))},
           **{f's{i}': x for i, x in enumerate(_leaves(stats))})
  sys.exit(0)

assert mode == 'fsdp' and jax.device_count() == 4, (mode, jax.devices())
ref = np.load(ref_path)
(params, stats), fsdp_losses, fsdp_spec = run(2, 2, jax.devices())
params, stats = _leaves(params), _leaves(stats)
assert len(params) == len([k for k in ref if k.startswith('p')])
assert len(stats) == len([k for k in ref if k.startswith('s') and k != 'spec'])
diffs = np.concatenate([np.abs(ref[f'p{i}'] - x).ravel() for i, x in enumerate(params)])
stats_diff = max(float(np.max(np.abs(ref[f's{i}'] - x))) for i, x in enumerate(stats))
cfg = pretrain.get_config()
cfg.training.global_batch_size = 4
try:
  validate_mesh(cfg, 3)   # global batch 4 is not divisible by 3 devices
  batch_error = ''
except ConfigError as err:
  batch_error = str(err)
print(json.dumps({'single_losses': ref['losses'].tolist(), 'fsdp_losses': fsdp_losses,
                  'max_param_diff': float(diffs.max()),
                  'share_params_within_1e-5': float(np.mean(diffs <= 1e-5)),
                  'max_batch_stats_diff': stats_diff, 'single_spec': str(ref['spec']),
                  'fsdp_spec': fsdp_spec, 'batch_error': batch_error}))
