"""The predict-memory benchmark runs end to end on a tiny scene and reports what it says."""
from cromss_jax.apps import benchmark_predict


def test_benchmark_predict_reports_peak_memory_and_skipped_windows(tmp_path):
  result = benchmark_predict.benchmark_predict(700, 900, valid=200, window=128, overlap=32,
                                               batch=4, network='toy',
                                               workdir=str(tmp_path))
  assert (result['height'], result['width'], result['valid_px']) == (700, 900, 200)
  assert result['windows'] == result['windows_computed'] + result['windows_skipped']
  assert 0 < result['windows_computed'] < result['windows_skipped']
  assert result['peak_rss_mib'] >= result['model_ready_rss_mib'] > 50
  assert (tmp_path / 'map.tif').exists() and (tmp_path / 'map.qml').exists()
