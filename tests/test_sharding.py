"""Mesh and shardings: FSDP-sharded training equals single-device training.

The FSDP run is a subprocess with 4 simulated CPU devices (the device count is fixed when JAX
starts); the single-device reference, a subprocess of its own, builds the programs of
test_benchmark.py's `step` tests (see tests/drivers/fsdp_step.py): on the same xdist worker,
after them, it loads them from the persistent compilation cache.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = os.path.join(REPO, 'tests', 'drivers', 'fsdp_step.py')


@pytest.mark.slow
@pytest.mark.xdist_group('resnet18_step')
def test_fsdp_mesh_trains_like_one_device(tmp_path):
  ref = str(tmp_path / 'single.npz')
  for mode, devices in (('single', 1), ('fsdp', 4)):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, DRIVER, mode, ref], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, (mode, result.stderr[-3000:])
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
