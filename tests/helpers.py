"""Helpers shared by the test modules: tiny configs, subprocesses, checkpoint and tree checks."""
from __future__ import annotations

import glob
import hashlib
import os
import signal
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import pretrain as pretrain_config
from cromss_jax import train

REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = '.orbax-checkpoint-tmp'
# The published normalisation statistics (docs/METHOD.md §2.2), written out here again so that
# tests check the converters against numbers that do not come from cromss_jax.constants.
S1_STATS = ((-12.54847273, 5.25697717), (-20.19237134, 5.91150917))
S2_MEAN = np.array([1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545, 1549.44374991,
                    2091.74883118, 2371.7172463, 2299.90463006, 2560.29504086, 830.06605044,
                    22.10351321, 2177.07172323, 1524.06546312])
S2_STD = np.array([786.78685367, 850.34818441, 875.06484736, 1138.84957046, 1122.17775652,
                   1161.59187054, 1274.39184232, 1248.42891965, 1345.52684884, 577.31607053,
                   51.15431158, 1336.09932639, 1136.53823676])

# Hang guard for every subprocess: generous for a cold compile on a slow 2-core machine.
PROCESS_TIMEOUT_S = 420

# The tiny pretraining config shared by every real-model run (in-process and CLI): the `tiny`
# variant of configs/pretrain.py plus TINY. keep_ratio 0.3 (default 0.5) proves that a CLI
# override reaches the objective: the CLI runs pass it as --config.objective.keep_ratio=0.3
# and must reproduce the in-process run exactly.
TINY_CONFIG = 'configs/pretrain.py:tiny'
TINY = {'objective.keep_ratio': 0.3}
_TINY_TRAINING = pretrain_config.get_config('tiny').training
NUM_EPOCHS = _TINY_TRAINING.num_epochs
TOTAL_STEPS = NUM_EPOCHS * _TINY_TRAINING.steps_per_epoch


def read_pretrain_locations(dataset_dir, split: str) -> list[dict[str, Any]]:
  """The `ssl4eo_s12_nol` records of `split` ('train', 'train+validation') regrouped per
  location in the converter's old one-example-per-location shape, so that tests compare whole
  locations: s1 [T,S,S,2], s2 [T,S,S,B], labels [T,S,S] (= season_labels), clean_labels
  [T,S,S] (when stored), acquisition_ids [T], s1_acquisition_ids [T], location_id,
  s2_band_names, crs, transform.

  Reads through `as_data_source` (random access; the shards are array_record) and checks the
  layout the loader relies on: record i of a split is season i % T of location i // T, and the
  T records of a location agree on everything that is per location.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder_from_directory(os.fspath(dataset_dir))
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD, builder.info.file_format
  assert 'labels' not in builder.info.features  # season_labels[season] is the noisy label.
  t = builder.info.features['season_labels'].shape[0]
  per_location = ('location_id', 'season_labels', 's2_band_names', 'crs', 'transform')
  locations = []
  for part in split.split('+'):
    source = builder.as_data_source(part)
    assert len(source) == builder.info.splits[part].num_examples
    assert len(source) % t == 0, (part, len(source), t)
    for start in range(0, len(source), t):
      group = [source[i] for i in range(start, start + t)]
      assert [int(r['season']) for r in group] == list(range(t)), (part, start)
      first = group[0]
      for r in group[1:]:
        assert sorted(r) == sorted(first), (part, start)
        for key in per_location:
          np.testing.assert_array_equal(r[key], first[key], err_msg=f'{part} {start} {key}')
      location = {
          's1': np.stack([r['s1'] for r in group]),
          's2': np.stack([r['s2'] for r in group]),
          'labels': first['season_labels'],
          'acquisition_ids': np.array([r['acquisition_id'] for r in group], object),
          's1_acquisition_ids': np.array([r['s1_acquisition_id'] for r in group], object),
          'location_id': np.int64(first['location_id']),
          's2_band_names': first['s2_band_names'], 'crs': first['crs'],
          'transform': first['transform']}
      if 'clean_labels' in first:
        location['clean_labels'] = np.stack([r['clean_labels'] for r in group])
      locations.append(location)
  ids = [int(loc['location_id']) for loc in locations]
  assert len(set(ids)) == len(ids), ids  # Each location's T records once, consecutively.
  return locations


def write_tfds_folder(folder: str, name: str, features, splits: dict[str, list[list[dict]]],
                      file_format: str = 'tfrecord') -> str:
  """A TFDS folder of `splits` {split: [[example, ...] per shard]}, in either record format."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  os.makedirs(folder)
  template = tfds.core.ShardedFileTemplate(
      data_dir=tfds.core.Path(folder), template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
      dataset_name=name, filetype_suffix=file_format)
  split_infos = []
  for split, shards in splits.items():
    for i, shard in enumerate(shards):
      path = os.path.join(folder, f'{name}-{split}.{file_format}-{i:05d}-of-{len(shards):05d}')
      if file_format == 'array_record':
        writer = ArrayRecordWriter(path, 'group_size:1,uncompressed')
        for example in shard:
          writer.write(features.serialize_example(example))
        writer.close()
      else:
        with tf.io.TFRecordWriter(path) as writer:
          for example in shard:
            writer.write(features.serialize_example(example))
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[len(shard) for shard in shards], num_bytes=0,
        filename_template=template.replace(split=split)))
  info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(name=name, version=tfds.core.Version('1.0.0'),
                                        data_dir=folder, module_name=''),
      features=features)
  info.set_file_format(tfds.core.FileFormat(file_format))
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(folder)
  return folder


def tiny_config(dataset_dir: str, **changes: Any):
  """The tiny variant with TINY and `changes` ({'training.num_epochs': 1, ...}) applied."""
  config = pretrain_config.get_config('tiny')
  config.data.dataset_dir = str(dataset_dir)
  for key, value in {**TINY, **changes}.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def cli_overrides(dataset_dir: str, **changes: Any) -> list[str]:
  return [f'--config.data.dataset_dir={dataset_dir}'] + [
      f'--config.{k}={v}' for k, v in {**TINY, **changes}.items()]


# ------------------------------------------------------------------------------------------------
# Checkpoints, TensorBoard and subprocess helpers
# ------------------------------------------------------------------------------------------------
def _key_name(entry) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flat(tree) -> dict[str, np.ndarray]:
  """{'params/encoder_s1/conv1/kernel': array, ...}; TrainStates and restored dicts agree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(e) for e in path): np.asarray(v) for path, v in leaves}


def unflat(arrays: dict[str, np.ndarray], prefix: str) -> dict:
  """The nested dict under `prefix` ('params') of a `flat` dict."""
  out: dict = {}
  for key, value in arrays.items():
    parts = key.split('/')
    if parts[0] != prefix:
      continue
    node = out
    for part in parts[1:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out


def array_digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
  """Bitwise fingerprints (dtype, shape, SHA-256 of the bytes): processes compare their copies
  of a state through these instead of writing ~100 MB each to the test's disk."""
  return {key: f'{value.dtype}{value.shape}:'
               f'{hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}'
          for key, value in arrays.items()}


def save_npz(path, arrays: dict[str, np.ndarray]) -> None:
  """`np.savez` (np.load reads it), with all-zero arrays deflated: Adam's moments at init are
  2/3 of a train state (~200 MB of the tiny config's 290 MB) and deflate to almost nothing,
  while deflating the weights would cost seconds for a few per cent."""
  with zipfile.ZipFile(path, 'w', allowZip64=True) as archive:
    for key, value in arrays.items():
      value = np.asarray(value)
      info = zipfile.ZipInfo(key + '.npy')
      info.compress_type = zipfile.ZIP_STORED if value.any() else zipfile.ZIP_DEFLATED
      with archive.open(info, 'w', force_zip64=True) as member:
        np.lib.format.write_array(member, value, allow_pickle=False)


def complete_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def restore_step(workdir, step: int) -> tuple[dict, dict]:
  """(state, meta) of one checkpoint step, on one device, whatever topology wrote it."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  with ocp.CheckpointManager(
      directory, item_names=('state', 'meta'),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()}) as manager:
    metadata = manager.item_metadata(step)['state']
    tree = metadata.tree if hasattr(metadata, 'tree') else metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return restored['state'], dict(restored['meta'])


def read_scalars(workdir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the TensorBoard event files of a workdir."""
  import tensorflow as tf
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        number = (float(tf.make_ndarray(value.tensor)) if value.HasField('tensor')
                  else float(value.simple_value))
        out.setdefault(value.tag, {})[int(event.step)] = number
  return out


def assert_trees_equal(actual: dict, expected: dict, what: str) -> None:
  a, e = flat(actual), flat(expected)
  assert sorted(a) == sorted(e), f'{what}: different structures'
  for key in e:
    np.testing.assert_array_equal(a[key], e[key], err_msg=f'{what}: {key}')


class Proc:
  """A subprocess whose merged stdout/stderr is collected line by line (and kept in a file).

  Foreground processes still running when their test ends are killed (`_kill_leftovers`).
  """
  foreground: list['Proc'] = []

  def __init__(self, args: list[str], log_path, env: dict | None = None,
               background: bool = False):
    if not background:
      Proc.foreground.append(self)
    self.args = args
    self.log_path = Path(log_path)
    self.lines: list[str] = []
    self._cond = threading.Condition()
    self.p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, bufsize=1)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    with open(self.log_path, 'w') as log:
      for line in self.p.stdout:
        log.write(line)
        log.flush()
        with self._cond:
          self.lines.append(line)
          self._cond.notify_all()
    with self._cond:
      self._cond.notify_all()

  @property
  def text(self) -> str:
    with self._cond:
      return ''.join(self.lines)

  def tail(self, n: int = 40) -> str:
    return ''.join(self.text.splitlines(keepends=True)[-n:])

  def wait_for(self, pattern: str, timeout: float = PROCESS_TIMEOUT_S) -> re.Match:
    """The first match of `pattern` in the output; fails if the process ends or time runs out."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    with self._cond:
      while True:
        match = regex.search(''.join(self.lines))
        if match:
          return match
        if not self._reader.is_alive():
          pytest.fail(f'{self.args} exited (rc {self.p.poll()}) before printing {pattern!r}:\n'
                      f'{self.tail()}')
        left = deadline - time.monotonic()
        if left <= 0:
          self.kill()
          pytest.fail(f'{pattern!r} not printed within {timeout} s:\n{self.tail()}')
        self._cond.wait(min(left, 1.0))

  def wait(self, timeout: float = PROCESS_TIMEOUT_S) -> int:
    try:
      rc = self.p.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'{self.args} did not finish within {timeout} s:\n{self.tail()}')
    self._reader.join(30)
    return rc

  def kill(self) -> None:
    if self.p.poll() is None:
      self.p.kill()   # SIGKILL
      self.p.wait(60)


def cli_command(workdir, dataset_dir, **changes) -> list[str]:
  return [sys.executable, '-m', 'cromss_jax.main', f'--config={TINY_CONFIG}',
          f'--workdir={workdir}', *cli_overrides(dataset_dir, **changes)]


# ------------------------------------------------------------------------------------------------
# A toy task for the training machinery
# ------------------------------------------------------------------------------------------------
class ToyModel(nn.Module):
  width: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(1)(nn.relu(x).mean(axis=(1, 2)))[:, 0]


def toy_batch(step: int, nan: bool = False) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(step)
  x = rng.normal(size=(4, 8, 8, 2)).astype(np.float32)
  y = (x.mean(axis=(1, 2, 3)) * 3.0 + 1.0).astype(np.float32)
  if nan:
    x[:] = np.nan
  return {'x': x, 'y': y}


def toy_task(steps_per_epoch: int, nan_steps=(), sigterm_before=(), yielded=None,
             width: int = 4, stream: dict | None = None) -> train.Task:
  """A conv + BatchNorm + dense regression task on synthetic batches: compiles in about a second."""
  model = ToyModel(width)
  yielded = [] if yielded is None else yielded

  def loss_fn(params, batch_stats, batch, epoch, rng):
    del epoch, rng
    out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch['x'],
                               train=True, mutable=['batch_stats'])
    loss = jnp.mean((out - batch['y']) ** 2)
    return loss, (updates['batch_stats'], {'mse': loss})

  def eval_fn(params, batch_stats, batch, epoch):
    del epoch
    out = model.apply({'params': params, 'batch_stats': batch_stats}, batch['x'], train=False)
    return {'se': jnp.sum((out - batch['y']) ** 2), 'n': jnp.float32(out.shape[0])}

  def train_iterator(start):
    step = start
    while True:
      if step in sigterm_before:
        os.kill(os.getpid(), signal.SIGTERM)   # handled by train's SIGTERM handler
      yielded.append(step)
      yield toy_batch(step, nan=step in nan_steps)
      step += 1

  return train.Task(
      name='toy',
      learner=train.Learner(
          model=model, init_batch=lambda: {'x': np.zeros((1, 8, 8, 2), np.float32)},
          apply_init=lambda module, rng, batch, _: module.init(rng, batch['x'], train=False),
          loss_fn=loss_fn),
      data=train.Data(train_iterator=train_iterator, steps_per_epoch=steps_per_epoch,
                      global_batch_size=4, stream=stream or {}),
      evaluation=train.Evaluation(
          eval_fn=eval_fn, summarise=lambda sums: {'val_loss': float(sums['se'] / sums['n'])},
          eval_iterator=lambda: iter([toy_batch(10_000)])))


def toy_config(num_epochs: int, max_nonfinite: int = 3):
  config = pretrain_config.get_config()
  config.training.update(num_epochs=num_epochs, global_batch_size=4, log_every_steps=1,
                         checkpoint_every_epochs=1, eval_every_epochs=1, keep_checkpoints=50,
                         panel_every_epochs=0, max_consecutive_nonfinite=max_nonfinite)
  config.optimizer.learning_rate = 1e-2
  return config


class TinyClassifier(nn.Module):
  """Per-pixel (kernel 1) or 5x5-receptive-field (two 3x3 convs) classifier for mapping tests."""
  kernel: int
  num_classes: int = 5

  @nn.compact
  def __call__(self, x):
    k = (self.kernel, self.kernel)
    x = nn.relu(nn.Conv(16, k, padding='SAME')(x))
    return nn.Conv(self.num_classes, k, padding='SAME')(x)


def patchy_s2_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
  """13-band uint16 L1C-like reflectances [13, H, W]: 25 px patches of 4 "land covers"
  (distinct spectra) plus noise, so that a network's classes vary over the scene."""
  rng = np.random.default_rng(seed)
  cover = rng.integers(0, 4, (-(-height // 25), -(-width // 25)))
  cover = np.kron(cover, np.ones((25, 25), int))[:height, :width]
  spectra = rng.uniform(300, 3500, (4, 13))
  scene = spectra[cover].transpose(2, 0, 1) + rng.normal(0, 150, (13, height, width))
  return np.clip(scene, 1, 10000).astype(np.uint16)
