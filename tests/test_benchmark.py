"""The benchmark CLI keeps its contract: a table, then one JSON line with the figures.

Only the contract and the sanity of the figures are tested; speed targets live in the
benchmark's output (docs/PERFORMANCE.md), never in tests.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_benchmark(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'cromss_jax.benchmark', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False, env=env)


# The JAX step of every `step` test here: the smallest real one (what the tests check does not
# depend on the size). Its init and step programs (~60 s of compilation on 2 cores) are compiled
# once: the tests that run them share an xdist worker (group 'resnet18_step', with
# tests/test_sharding.py, whose single-device run builds the same programs,
# tests/drivers/fsdp_step.py) and load them from the persistent compilation cache after the first.
BENCH_STEP = ('--encoder', 'resnet18', '--fusion', 'mid', '--batch', '4', '--size', '32',
              '--dtype', 'f32')
# The same program twice on a 2-core machine: at most one of these compiles it.
resnet18_step = pytest.mark.xdist_group('resnet18_step')


# One process for both contracts of `step` (its figures; the PyTorch comparison): each start
# costs ~10 s of imports and loading the compiled step.
@pytest.mark.slow
@resnet18_step
def test_step_benchmark_prints_figures_and_compares_with_pytorch():
  result = _run_benchmark('step', *BENCH_STEP, '--steps', '2', '--warmup', '1',
                          '--peak_tflops', '1.0', '--compare_torch')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.strip().splitlines() if l.strip()]
  figures = json.loads(lines[-1])
  assert 'CromSS train step: resnet18 mid, batch 4, 32x32, f32' in result.stdout
  for key in ('imgs_per_s', 'step_ms', 'compile_s', 'peak_bytes', 'mfu'):
    assert key in figures
  assert figures['loss_finite'] is True
  assert figures['step_ms'] > 0 and figures['compile_s'] > 0 and figures['peak_bytes'] > 0
  assert abs(figures['imgs_per_s'] - 4 / (figures['step_ms'] / 1e3)) < 0.05 * figures['imgs_per_s']
  # MFU with a 1 TFLOP/s peak: 129.73 GFLOP x (32/256)^2 x 4 per step over the step time.
  expected_mfu = 129.73e9 / 64 * 4 / (figures['step_ms'] / 1e3) / 1e12
  assert abs(figures['mfu'] - expected_mfu) < 1e-3 + 0.01 * expected_mfu

  # The same step in PyTorch, side by side.
  assert 'JAX / PyTorch' in result.stdout and 'PyTorch throughput' in result.stdout
  assert figures['torch_loss_finite'] is True
  assert figures['torch_version'].startswith('2.') and figures['torch_threads'] >= 1
  assert figures['torch_step_ms'] > 0
  assert abs(figures['torch_imgs_per_s'] - 4 / (figures['torch_step_ms'] / 1e3)) < (
      0.05 * figures['torch_imgs_per_s'])
  ratio = figures['imgs_per_s'] / figures['torch_imgs_per_s']
  assert abs(figures['ratio_jax_to_torch'] - ratio) < 0.02 * ratio + 1e-3
  assert len(figures['load_avg']) == 2 and 'xla_flags' in figures


@pytest.mark.slow
def test_compare_torch_without_torch_is_one_error_line(tmp_path):
  # A `torch` package that fails to import stands in for an environment without PyTorch.
  fake = tmp_path / 'torch'
  fake.mkdir()
  (fake / '__init__.py').write_text("raise ImportError('No module named torch')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
  for mode, extra in (('step', ['--compare_torch']), ('step_torch', [])):
    result = _run_benchmark(mode, '--encoder', 'resnet18', '--batch', '2', '--size', '64',
                            '--steps', '1', *extra, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
    assert len(errors) == 1 and 'pip install torch==2.13.0' in errors[0], result.stderr[-2000:]
    assert 'Traceback' not in result.stderr and result.stdout.strip() == ''


@pytest.mark.slow
def test_step_torch_benchmark_prints_figures_as_last_json_line():
  result = _run_benchmark('step_torch', '--encoder', 'resnet18', '--fusion', 'late', '--batch',
                          '2', '--size', '32', '--steps', '1', '--warmup', '0')
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert 'PyTorch train step: resnet18 late, batch 2, 32x32, f32' in result.stdout
  assert figures['mode'] == 'step_torch' and figures['loss_finite'] is True
  assert figures['step_ms'] > 0 and figures['torch_threads'] >= 1
  assert abs(figures['imgs_per_s'] - 2 / (figures['step_ms'] / 1e3)) < 0.05 * figures['imgs_per_s']
  assert len(figures['load_avg']) == 2


@pytest.mark.slow
def test_unknown_benchmark_mode_is_one_error_line():
  result = _run_benchmark('steps')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: usage:')
  assert 'step_torch' in result.stderr


@pytest.mark.slow
def test_input_benchmark_reports_rate_bytes_and_memory():
  """`benchmark input` on generated 264 px data, one reader process: the documented figures."""
  result = _run_benchmark('input', '--locations', '3', '--input_batch', '2',
                          '--input_batches', '3', '--input_workers', '1')
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  assert 'Pretraining input pipeline: 264 px (location, season) records' in result.stdout
  assert figures['workers'] == 1 and figures['batch'] == 2 and figures['tile'] == 264
  assert figures['samples_per_s'] > 0
  assert abs(figures['samples_per_s_per_core'] * figures['cores'] - figures['samples_per_s']) < (
      0.01 * figures['samples_per_s'] + 0.2)
  # One record per sample: one season's S1 (2) + S2 (13) bands and the 4 season label maps,
  # uncompressed, plus the record's framing and the file's block padding.
  payload = 264 * 264 * (2 + 13 + 4)
  assert payload <= figures['bytes_per_sample'] <= payload * 1.2
  assert figures['pipeline_rss_mib'] > 0   # the worker process is counted
