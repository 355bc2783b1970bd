"""The benchmark CLI keeps its contract: a table, then one JSON line with the figures.

Only the contract and the sanity of the figures are tested; speed targets live in the
benchmark's output (docs/PERFORMANCE.md), never in tests.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_benchmark_prints_figures_as_last_json_line():
  result = subprocess.run(
      [sys.executable, '-m', 'cromss_jax.benchmark', 'step', '--encoder', 'resnet18',
       '--batch', '2', '--size', '64', '--steps', '2', '--warmup', '1', '--dtype', 'f32',
       '--peak_tflops', '1.0'],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.strip().splitlines() if l.strip()]
  figures = json.loads(lines[-1])
  assert 'CromSS train step: resnet18 mid, batch 2, 64x64, f32' in result.stdout
  for key in ('imgs_per_s', 'step_ms', 'compile_s', 'peak_bytes', 'mfu'):
    assert key in figures
  assert figures['loss_finite'] is True
  assert figures['step_ms'] > 0 and figures['compile_s'] > 0 and figures['peak_bytes'] > 0
  assert abs(figures['imgs_per_s'] - 2 / (figures['step_ms'] / 1e3)) < 0.05 * figures['imgs_per_s']
  # MFU with a 1 TFLOP/s peak: 129.73 GFLOP x (64/256)^2 x 2 per step over the step time.
  expected_mfu = 129.73e9 / 16 * 2 / (figures['step_ms'] / 1e3) / 1e12
  assert abs(figures['mfu'] - expected_mfu) < 1e-3 + 0.01 * expected_mfu
