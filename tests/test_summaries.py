"""TensorBoard summaries written without TensorFlow, read back by TensorFlow's own reader."""
import glob
import os
import subprocess
import sys

import pytest

from cromss_jax.train import summaries
from helpers import REPO, read_scalars


def test_events_are_read_back_by_tensorflow(tmp_path):
  logdir = tmp_path / 'tensorboard'
  writer = summaries.ScalarWriter(str(logdir))
  assert not logdir.exists()                       # nothing is created before the first write
  with writer:   # (values are stored as float32, as tf.summary stores them)
    writer.write_scalars(1, {'train/loss': 2.5, 'train/lr': 0.125})
    writer.write_scalars(2, {'train/loss': 1.25})
    # Flushed at every write: a run killed now keeps both steps.
    assert read_scalars(str(tmp_path)) == {'train/loss': {1: 2.5, 2: 1.25},
                                           'train/lr': {1: 0.125}}
  with summaries.ScalarWriter(str(logdir)) as resumed:  # a resumed run adds a file of its own
    resumed.write_scalars(3, {'train/loss': 0.5})
  assert len(glob.glob(str(logdir / 'events.out.tfevents.*'))) == 2
  assert read_scalars(str(tmp_path))['train/loss'] == {1: 2.5, 2: 1.25, 3: 0.5}

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  first_file = sorted(glob.glob(str(logdir / 'events.out.tfevents.*')))[0]
  first_event = next(iter(tf.compat.v1.train.summary_iterator(first_file)))
  assert first_event.file_version == 'brain.Event:2'


@pytest.mark.slow
def test_pretraining_modules_and_summaries_do_not_import_tensorflow(tmp_path):
  """Pretraining reads with grain and its converter writes array_record: TensorFlow (~9 s of
  CPU to import) must stay out of both."""
  (tmp_path / 'dataset_info.json').write_text('{}')
  code = f"""
import sys
from cromss_jax import input_pipeline, train
from cromss_jax.apps import main
from cromss_jax.tasks import pretrain
from cromss_jax.train import summaries
from data_prep import ssl4eo
with summaries.ScalarWriter({str(tmp_path / 'tb')!r}) as writer:
  writer.write_scalars(1, {{'loss': 1.0}})
input_pipeline._find_dataset_dir({str(tmp_path)!r}, input_pipeline._PRETRAIN)
import numpy as np, tensorflow_datasets as tfds
from data_prep import common
features = tfds.features.FeaturesDict({{'x': tfds.features.Tensor(shape=(2,), dtype=np.int64)}})
assert common._serialize(features, {{'x': np.array([1, 2])}})   # the converter's records
print(sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')))
"""
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == '[]'
