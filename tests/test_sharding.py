"""Mesh and shardings: FSDP-sharded training equals single-device training.

Runs in a subprocess with 4 simulated CPU devices (the device count is fixed when JAX starts).
"""
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = textwrap.dedent('''
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from configs import pretrain
    from cromss_jax import sharding, train
    from cromss_jax.tasks import pretrain as pretrain_task
    from cromss_jax.config_validation import ConfigError, validate_mesh

    def run(data, fsdp, devices):
      cfg = pretrain.get_config()
      cfg.model.encoder = 'resnet18'
      cfg.model.compute_dtype = 'float32'
      cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
      size, batch = 64, 4
      cfg.data.crop_size = size
      learner = pretrain_task.create_pretrain_learner(cfg)
      mesh = sharding.create_mesh(cfg, devices)
      tx = train.create_optimizer(cfg.optimizer)
      state, shardings = train.init_state(learner, cfg, mesh, tx, train.create_plateau(cfg))
      step = train.make_train_step(learner, cfg, mesh, shardings, steps_per_epoch=10,
                                   total_steps=10, tx=tx)
      rng = np.random.default_rng(0)
      losses, after_first = [], None
      for _ in range(2):
        host = {'s1': rng.integers(0, 256, (batch, size, size, 2), dtype=np.uint8),
                's2': rng.integers(0, 256, (batch, size, size, 13), dtype=np.uint8),
                'labels': rng.integers(0, 9, (batch, size, size)).astype(np.int32),
                'season_labels': rng.integers(0, 9, (batch, 4, size, size)).astype(np.uint8),
                'season': rng.integers(0, 4, (batch,)).astype(np.int32)}
        state, metrics = step(state, sharding.host_batch_to_global(host, mesh))
        losses.append(float(metrics['loss']))
        if after_first is None:
          after_first = jax.device_get((state.params, state.batch_stats))
      kernel = state.params['encoder_s2']['layer4']['block0']['conv2']['kernel']
      return after_first, losses, str(kernel.sharding.spec)

    single, single_losses, single_spec = run(1, 1, jax.devices()[:1])
    fsdp, fsdp_losses, fsdp_spec = run(2, 2, jax.devices())
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in
                            zip(jax.tree.leaves(single[0]), jax.tree.leaves(fsdp[0]))])
    stats_diff = max(float(np.max(np.abs(a - b))) for a, b in
                     zip(jax.tree.leaves(single[1]), jax.tree.leaves(fsdp[1])))
    cfg = pretrain.get_config()
    cfg.training.global_batch_size = 4
    try:
      validate_mesh(cfg, 3)   # global batch 4 is not divisible by 3 devices
      batch_error = ''
    except ConfigError as err:
      batch_error = str(err)
    print(json.dumps({'single_losses': single_losses, 'fsdp_losses': fsdp_losses,
                      'max_param_diff': float(diffs.max()),
                      'share_params_within_1e-5': float(np.mean(diffs <= 1e-5)),
                      'max_batch_stats_diff': stats_diff, 'single_spec': single_spec,
                      'fsdp_spec': fsdp_spec, 'batch_error': batch_error}))
''')


def test_fsdp_mesh_trains_like_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, '-c', _DRIVER], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  # Same maths, different reduction order across 4 devices: float32 rounding only.
  assert abs(out['single_losses'][0] - out['fsdp_losses'][0]) < 1e-4 * abs(out['single_losses'][0])
  assert abs(out['single_losses'][1] - out['fsdp_losses'][1]) < 1e-3 * abs(out['single_losses'][1])
  # State after the first step. Adam's first update is g / (|g| + eps): where |g| ~ eps (1e-8),
  # float rounding of the gradient can flip its sign, so a few entries may differ by 2 x lr.
  # Nearly all entries must agree tightly, and none beyond that bound.
  assert out['share_params_within_1e-5'] > 0.98
  assert out['max_param_diff'] <= 2 * 5e-3 + 1e-6
  assert out['max_batch_stats_diff'] < 1e-5   # BN statistics span the global batch either way
  assert 'fsdp' not in out['single_spec']      # replicated on one device
  assert 'fsdp' in out['fsdp_spec']       # large kernels are split over the fsdp axis
  assert 'not divisible' in out['batch_error'] and 'global_batch_size' in out['batch_error']
