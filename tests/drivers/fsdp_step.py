"""One FSDP-sharded and one single-device train step on 4 simulated CPU devices; prints JSON."""
import json
import jax, numpy as np
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
