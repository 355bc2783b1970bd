"""The demo (`make demo`, `python -m cromss_jax.demo`) over a folder that an earlier run left.

The whole demo takes ~7-8 minutes on 2 cores and is not run here; each of its stages is the
project's own command, tested in the modules of those commands.
"""
import json
import subprocess
import sys

import pytest

from data_prep import common
from data_prep import make_demo
from helpers import REPO


@pytest.mark.slow
def test_an_earlier_versions_records_give_one_error_that_says_how_to_start_over(tmp_path):
  out = tmp_path / 'demo_out'
  make_demo.make_demo(out / 'raw', locations=2, seed=0, dfc_validation=0, dfc_test=0,
                      scene_size=None)
  # What a version that wrote TFRecord shards left: its plan names no file format.
  state = out / 'tfds' / 'ssl4eo_s12_nol' / common.STATE_DIR
  state.mkdir(parents=True)
  plan = json.dumps({'dataset': 'ssl4eo_s12_nol', 'shards': []})
  (state / 'plan.json').write_text(plan)

  proc = subprocess.run([sys.executable, '-m', 'cromss_jax.demo', f'--out={out}'], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert 'tfrecord shards of an earlier conversion' in errors[0]
  assert f'The demo resumes from what it finds in {out} and cannot use' in errors[0]
  assert '`make clean`' in errors[0] and 'DEMO_DIR=' in errors[0]
  assert '--overwrite' not in errors[0]   # the converter's advice; the demo has no such flag
  # Nothing written over the earlier files.
  assert sorted(p.name for p in (out / 'tfds' / 'ssl4eo_s12_nol').iterdir()) == [
      common.STATE_DIR]
  assert sorted(p.name for p in state.iterdir()) == ['plan.json']
  assert (state / 'plan.json').read_text() == plan
