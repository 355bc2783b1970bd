"""The predict-memory benchmark runs end to end on a tiny scene and reports what it says."""
import pytest

from cromss_jax.apps import benchmark_predict


@pytest.mark.slow
def test_benchmark_predict_reports_peak_memory_and_skipped_windows(tmp_path):
  result = benchmark_predict.benchmark_predict(700, 900, valid=200, window=128, overlap=32,
                                               batch=4, network='toy',
                                               workdir=str(tmp_path))
  assert (result['height'], result['width'], result['valid_px']) == (700, 900, 200)
  assert result['windows'] == result['windows_computed'] + result['windows_skipped']
  assert 0 < result['windows_computed'] < result['windows_skipped']
  assert result['peak_rss_mib'] >= result['model_ready_rss_mib'] > 50
  assert (tmp_path / 'map.tif').exists() and (tmp_path / 'map.qml').exists()


@pytest.mark.slow
def test_benchmark_cli_predict_mode_prints_figures_as_last_json_line():
  import json
  import subprocess
  import sys
  proc = subprocess.run(
      [sys.executable, '-m', 'cromss_jax.benchmark', 'predict', '--scene_height', '500',
       '--scene_width', '600', '--scene_valid', '150', '--network', 'toy', '--batch', '4'],
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  figures = json.loads(proc.stdout.strip().splitlines()[-1])
  assert figures['mode'] == 'predict' and (figures['height'], figures['width']) == (500, 600)
  assert 'peak RSS' in proc.stdout and figures['peak_rss_mib'] > 0
