"""Benchmarks: the compiled pretraining step, the input pipeline, and GeoTIFF conversion.

  python -m cromss_jax.benchmark step  --encoder resnet50 --fusion mid --batch 128 --size 256 \
      --steps 20 --dtype bf16
  python -m cromss_jax.benchmark step --compare_torch          # same step in PyTorch, ratio
  python -m cromss_jax.benchmark step_torch                     # the PyTorch step alone
  python -m cromss_jax.benchmark input [--dataset_dir DIR]      # samples/s, bytes, memory
  python -m cromss_jax.benchmark convert [--locations 16]       # locations/s of data_prep.ssl4eo

Each mode prints a human-readable table and, as its LAST stdout line, one JSON object with the
figures. The step is timed on device-resident synthetic inputs (no input pipeline), after
warm-up, each step individually with block_until_ready; the median and the 10th/90th
percentiles are reported. MFU counts 129.73 GFLOP per 256x256 sample (docs/METHOD.md §3: forward +
backward of both branches), scaled by (size/256)^2, over the device's dense bf16 (or f32) peak
from the table below, or --peak_tflops.

With --compare_torch (CPU; needs torch, e.g. `pip install torch==2.13.0`) the same networks are
built in PyTorch (`cromss_jax.torch_step`) and one JAX step and one PyTorch step are timed
alternately, so both see the same load on shared cores; the ratio of images/s is reported.
`step_torch` times the PyTorch step alone, for runs of separate processes (A B A B): in one
process the idle threads of one framework can spin while the other computes.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import flags
from absl import logging

from cromss_jax import cli

GFLOP_PER_SAMPLE_256 = 129.73
# Dense peak TFLOP/s per chip by (device kind substring, dtype); vendor figures.
PEAK_TFLOPS = {
    ('H200', 'bf16'): 989.0, ('H200', 'f32'): 67.0,
    ('H100', 'bf16'): 989.0, ('H100', 'f32'): 67.0,
    ('A100', 'bf16'): 312.0, ('A100', 'f32'): 19.5,
    ('TPU v4', 'bf16'): 275.0, ('TPU v5 lite', 'bf16'): 197.0, ('TPU v5e', 'bf16'): 197.0,
    ('TPU v5p', 'bf16'): 459.0, ('TPU v6', 'bf16'): 918.0,
}

_MODE_HELP = 'step (default), step_torch, input, convert or predict'
_MODES = ('step', 'step_torch', 'input', 'convert', 'predict')
flags.DEFINE_string('encoder', 'resnet50', 'step: resnet18 | resnet34 | resnet50')
flags.DEFINE_string('fusion', 'mid', 'step: mid | late')
flags.DEFINE_integer('batch', 4, 'step: global batch size')
flags.DEFINE_integer('size', 128, 'step: crop size in pixels')
flags.DEFINE_integer('steps', 10, 'step: timed steps after warm-up')
flags.DEFINE_integer('warmup', 2, 'step: untimed steps after compilation')
flags.DEFINE_enum('dtype', 'f32', ['bf16', 'f32'], 'step: compute dtype')
flags.DEFINE_integer('s2_bands', 13, 'step: S2 channels (13, 12, 9 or 3)')
flags.DEFINE_integer('tile', None, 'step: synthetic tile size the step crops --size out of '
                     '(default: --size; the release: 264)')
flags.DEFINE_enum('feed', 'synthetic', ['synthetic', 'pipeline'],
                  'step: device-resident synthetic batch (timed per step), or the real input '
                  'pipeline on --dataset_dir (default: generated) timed end to end')
flags.DEFINE_float('peak_tflops', None, 'step: device peak for MFU (default: table by device)')
flags.DEFINE_bool('compare_torch', False,
                  'step: also time the same networks in PyTorch (f32, CPU), one JAX step and one '
                  'PyTorch step alternately, and report the ratio of images/s')
flags.DEFINE_string('dataset_dir', None, 'input: converted ssl4eo_s12_nol dir (default: demo)')
flags.DEFINE_integer('input_batches', 30, 'input: batches to time')
flags.DEFINE_integer('input_batch', 32, 'input: batch size')
flags.DEFINE_integer('input_prefetch', None, 'input: batches read ahead (default: the config)')
flags.DEFINE_integer('input_workers', None, 'input: reader processes (default: the config\'s '
                     'data.num_workers; 0 = threads of this process)')
flags.DEFINE_integer('locations', 16, 'convert/input: demo locations to generate')
flags.DEFINE_integer('workers', None, 'convert: worker processes (default: all cores)')
flags.DEFINE_integer('scene_height', 10_000, 'predict: scene height in px')
flags.DEFINE_integer('scene_width', 10_000, 'predict: scene width in px')
flags.DEFINE_integer('scene_valid', 1024, 'predict: side of the valid (non-nodata) square in px')
flags.DEFINE_enum('network', 'resnet18', ['resnet18', 'toy'],
                  'predict: the (randomly initialised) network that maps the scene')
FLAGS = flags.FLAGS


def _peak_tflops(dtype: str) -> float | None:
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops
  kind = jax.devices()[0].device_kind
  for (name, table_dtype), value in PEAK_TFLOPS.items():
    if name.lower() in kind.lower() and table_dtype == dtype:
      return value
  return None


def _usable_cores() -> int:
  """Cores this process may run on (`taskset` narrows it), as XLA:CPU sizes its thread pool."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _print_table(title: str, rows: list[tuple[str, Any]], figures: dict) -> None:
  width = max(len(k) for k, _ in rows)
  print(title)
  for key, value in rows:
    print(f'  {key:<{width}}  {value}')
  print(json.dumps(figures))
  sys.stdout.flush()


def _step_figures(seconds: list[float], batch: int) -> tuple[np.ndarray, float, float]:
  """(step times in ms, their median, images/s at the median) of timed steps."""
  times_ms = np.asarray(seconds) * 1e3
  step_ms = float(np.median(times_ms))
  return times_ms, step_ms, batch / (step_ms / 1e3)


class _PipelineFeed:
  """The real pretraining input pipeline feeding the step; `wait` sums the host-side time."""

  def __init__(self, iterator, mesh):
    self._iterator = iterator
    self._mesh = mesh
    self.wait = 0.0

  def next_batch(self):
    from cromss_jax import sharding
    t0 = time.perf_counter()
    batch = sharding.host_batch_to_global(next(self._iterator), self._mesh)
    self.wait += time.perf_counter() - t0
    return batch


def _pipeline_feed(config, mesh) -> _PipelineFeed:
  """Generated (or --dataset_dir) records through create_pretrain_iterator, endless."""
  from cromss_jax import input_pipeline
  dataset_dir = FLAGS.dataset_dir
  if not dataset_dir:
    tmp = tempfile.mkdtemp(prefix='cromss_bench_')
    dataset_dir = os.path.join(tmp, 'records')
    _convert_raw(_generate_raw(tmp, FLAGS.locations), dataset_dir)
  config.data.dataset_dir = dataset_dir
  if FLAGS.input_workers is not None:
    config.data.num_workers = FLAGS.input_workers
  if FLAGS.input_prefetch is not None:
    config.data.prefetch = FLAGS.input_prefetch
  config.training.steps_per_epoch = 1000   # the split may hold fewer locations than a batch
  info = input_pipeline.pretrain_info(config)
  config.data.tile_size = info.tile_size
  return _PipelineFeed(input_pipeline.create_pretrain_iterator(config, 'train'), mesh)


# The LR schedule's length in the benchmarked step (the step's cost does not depend on it).
SCHEDULE_STEPS = 1000


def step_config(encoder: str, fusion: str, dtype: str, s2_bands: int, size: int,
                batch: int) -> Any:
  """The paper's pretraining config at the benchmark's settings (what `step` compiles)."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config()
  config.model.encoder = encoder
  config.model.fusion = fusion
  config.model.compute_dtype = 'bfloat16' if dtype == 'bf16' else 'float32'
  config.data.s2_bands = s2_bands
  config.data.crop_size = size
  config.training.global_batch_size = batch
  return config


def synthetic_host_batch(rng: np.random.Generator, batch: int, tile: int,
                         s2_bands: int) -> dict[str, np.ndarray]:
  """Random whole tiles as the pretraining pipeline gives them (the step crops out of them)."""
  return {
      's1': rng.integers(0, 256, (batch, tile, tile, 2), dtype=np.uint8),
      's2': rng.integers(0, 256, (batch, tile, tile, s2_bands), dtype=np.uint8),
      'labels': rng.integers(0, 9, (batch, tile, tile)).astype(np.uint8),
      'season_labels': rng.integers(0, 9, (batch, 4, tile, tile)).astype(np.uint8),
      'season': rng.integers(0, 4, (batch,)).astype(np.int32),
  }


def benchmark_step() -> dict:
  """Compile time, step time, images/s, MFU and memory of the full pretraining step."""
  from cromss_jax import sharding, train
  from cromss_jax.tasks import pretrain as pretrain_task

  config = step_config(FLAGS.encoder, FLAGS.fusion, FLAGS.dtype, FLAGS.s2_bands, FLAGS.size,
                       FLAGS.batch)
  size, batch = FLAGS.size, FLAGS.batch
  torch_step = None
  if FLAGS.compare_torch:  # first: a missing torch is reported before the long compile
    from cromss_jax import torch_step as torch_step_lib
    torch_step = torch_step_lib.build_torch_step(
        encoder=FLAGS.encoder, fusion=FLAGS.fusion, s2_bands=FLAGS.s2_bands,
        num_classes=config.objective.num_classes, batch=batch, size=size,
        learning_rate=config.optimizer.learning_rate,
        weight_decay=config.optimizer.weight_decay, threads=_usable_cores())
  learner = pretrain_task.create_pretrain_learner(config)
  mesh = sharding.create_mesh(config)
  tx = train.create_optimizer(config.optimizer)
  state, state_sh = train.init_state(learner, config, mesh, tx, train.create_plateau(config))

  feed = _pipeline_feed(config, mesh) if FLAGS.feed == 'pipeline' else None
  if feed is None:
    host_batch = synthetic_host_batch(np.random.default_rng(0), batch, FLAGS.tile or size,
                                      FLAGS.s2_bands)
    batch_arrays = jax.device_put(host_batch, sharding.batch_sharding(mesh))
  else:
    batch_arrays = feed.next_batch()
  step_fn = train.make_train_step(learner, config, mesh, state_sh,
                                  steps_per_epoch=SCHEDULE_STEPS, total_steps=SCHEDULE_STEPS,
                                  tx=tx)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(FLAGS.warmup):
    state, out = compiled(state, batch_arrays)
    if torch_step is not None:
      torch_step()
  jax.block_until_ready(state)
  load_start = os.getloadavg()[0]
  times, torch_times = [], []
  if feed is not None:   # end to end: the loop's double buffer, input wait measured
    batch_arrays = feed.next_batch()
    feed.wait = 0.0
    t_start = time.perf_counter()
    for step in range(FLAGS.steps):
      state, out = compiled(state, batch_arrays)
      if step + 1 < FLAGS.steps:
        batch_arrays = feed.next_batch()
    jax.block_until_ready((state, out))
    elapsed = time.perf_counter() - t_start
    times = [elapsed / FLAGS.steps] * FLAGS.steps
  for _ in range(FLAGS.steps if feed is None else 0):  # A B A B: both sides see the same load
    t0 = time.perf_counter()
    state, out = compiled(state, batch_arrays)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t0)
    if torch_step is not None:
      t0 = time.perf_counter()
      torch_loss = torch_step()
      torch_times.append(time.perf_counter() - t0)
  load_end = os.getloadavg()[0]
  times_ms, step_ms, imgs_per_s = _step_figures(times, batch)
  flop_per_step = GFLOP_PER_SAMPLE_256 * 1e9 * (size / 256) ** 2 * batch
  peak = _peak_tflops(FLAGS.dtype)
  n_devices = jax.device_count()
  mfu = (flop_per_step / (step_ms / 1e3)) / (peak * 1e12 * n_devices) if peak else None
  stats = jax.devices()[0].memory_stats() or {}
  peak_bytes = stats.get('peak_bytes_in_use')
  if peak_bytes is None:  # CPU: the compiled program's own accounting
    mem = compiled.memory_analysis()
    peak_bytes = int(getattr(mem, 'temp_size_in_bytes', 0) + getattr(
        mem, 'argument_size_in_bytes', 0) + getattr(mem, 'output_size_in_bytes', 0))
  finite = bool(np.isfinite(jax.device_get(out['loss'])))
  figures = {
      'mode': 'step', 'device': jax.devices()[0].device_kind, 'devices': n_devices,
      'encoder': FLAGS.encoder, 'fusion': FLAGS.fusion, 'batch': batch, 'size': size,
      'dtype': FLAGS.dtype, 'compile_s': round(compile_s, 2), 'step_ms': round(step_ms, 2),
      'step_ms_p10': round(float(np.percentile(times_ms, 10)), 2),
      'step_ms_p90': round(float(np.percentile(times_ms, 90)), 2),
      'imgs_per_s': round(imgs_per_s, 2), 'peak_bytes': int(peak_bytes),
      'mfu': None if mfu is None else round(mfu, 4), 'peak_tflops_used': peak,
      'loss_finite': finite, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'feed': FLAGS.feed, 'tile': int(batch_arrays['s1'].shape[1]),
      'load_avg': [round(load_start, 2), round(load_end, 2)]}
  rows = [('compile', f'{compile_s:.1f} s'),
          ('step time (median)', f'{step_ms:.1f} ms  (p10 {figures["step_ms_p10"]}, '
                                 f'p90 {figures["step_ms_p90"]})'),
          ('throughput', f'{imgs_per_s:.1f} images/s'),
          ('MFU', 'n/a (unknown device peak; pass --peak_tflops)' if mfu is None
           else f'{mfu * 100:.1f} % of {peak} TFLOP/s x {n_devices}'),
          ('peak memory', f'{peak_bytes / 2**30:.2f} GiB'),
          ('loss finite', finite)]
  if feed is not None:
    figures['input_wait_share'] = round(feed.wait / (FLAGS.steps * step_ms / 1e3), 4)
    rows.append(('input wait', f'{100 * figures["input_wait_share"]:.1f} % of the run '
                               f'(pipeline: {config.data.prefetch} reader threads'
                               f'{"" if not config.data.num_workers else ", " + str(config.data.num_workers) + " processes"})'))
  if torch_step is not None:
    import torch
    torch_ms, torch_step_ms, torch_imgs = _step_figures(torch_times, batch)
    figures.update({
        'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
        'torch_step_ms': round(torch_step_ms, 2),
        'torch_step_ms_p10': round(float(np.percentile(torch_ms, 10)), 2),
        'torch_step_ms_p90': round(float(np.percentile(torch_ms, 90)), 2),
        'torch_imgs_per_s': round(torch_imgs, 2),
        'torch_loss_finite': bool(np.isfinite(torch_loss)),
        'ratio_jax_to_torch': round(imgs_per_s / torch_imgs, 3)})
    rows += [('PyTorch step (median)', f'{torch_step_ms:.1f} ms  (p10 '
                                        f'{figures["torch_step_ms_p10"]}, p90 '
                                        f'{figures["torch_step_ms_p90"]}), torch '
                                        f'{torch.__version__}, {torch.get_num_threads()} threads'),
             ('PyTorch throughput', f'{torch_imgs:.1f} images/s'),
             ('JAX / PyTorch', f'{figures["ratio_jax_to_torch"]:.2f}x images/s')]
  rows.append(('load average', f'{load_start:.2f} -> {load_end:.2f}'))
  _print_table(
      f'CromSS train step: {FLAGS.encoder} {FLAGS.fusion}, batch {batch}, {size}x{size}, '
      f'{FLAGS.dtype}, {n_devices} x {figures["device"]}',
      rows, figures)
  return figures


def benchmark_step_torch() -> dict:
  """The PyTorch step alone (a process of its own): for A B A B runs against `step`."""
  from configs import pretrain
  from cromss_jax import torch_step as torch_step_lib
  config = pretrain.get_config()
  size, batch = FLAGS.size, FLAGS.batch
  torch_step = torch_step_lib.build_torch_step(
      encoder=FLAGS.encoder, fusion=FLAGS.fusion, s2_bands=FLAGS.s2_bands,
      num_classes=config.objective.num_classes, batch=batch, size=size,
      learning_rate=config.optimizer.learning_rate,
      weight_decay=config.optimizer.weight_decay, threads=_usable_cores())
  import torch
  for _ in range(FLAGS.warmup):
    torch_step()
  load_start = os.getloadavg()[0]
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    loss = torch_step()
    times.append(time.perf_counter() - t0)
  load_end = os.getloadavg()[0]
  times_ms, step_ms, imgs_per_s = _step_figures(times, batch)
  figures = {
      'mode': 'step_torch', 'device': 'cpu', 'encoder': FLAGS.encoder, 'fusion': FLAGS.fusion,
      'batch': batch, 'size': size, 'dtype': 'f32', 'torch_version': torch.__version__,
      'torch_threads': torch.get_num_threads(), 'step_ms': round(step_ms, 2),
      'step_ms_p10': round(float(np.percentile(times_ms, 10)), 2),
      'step_ms_p90': round(float(np.percentile(times_ms, 90)), 2),
      'imgs_per_s': round(imgs_per_s, 2), 'loss_finite': bool(np.isfinite(loss)),
      'load_avg': [round(load_start, 2), round(load_end, 2)]}
  _print_table(
      f'PyTorch train step: {FLAGS.encoder} {FLAGS.fusion}, batch {batch}, {size}x{size}, f32, '
      f'cpu, torch {torch.__version__}, {torch.get_num_threads()} threads',
      [('step time (median)', f'{step_ms:.1f} ms  (p10 {figures["step_ms_p10"]}, '
                              f'p90 {figures["step_ms_p90"]})'),
       ('throughput', f'{imgs_per_s:.1f} images/s'),
       ('loss finite', figures['loss_finite']),
       ('load average', f'{load_start:.2f} -> {load_end:.2f}')], figures)
  return figures


def _generate_raw(root: str, locations: int) -> str:
  from data_prep import make_demo
  raw = os.path.join(root, 'raw')
  make_demo.make_demo(raw, locations=locations, dfc_validation=0, dfc_test=0, scene_size=None)
  return raw


def _convert_raw(raw: str, out: str) -> dict:
  """data_prep.ssl4eo on generated data, as a user would run it; returns its summary."""
  from data_prep import ssl4eo  # pylint: disable=g-import-not-at-top
  root = os.path.join(raw, 'ssl4eo')
  argv = ['--s1', os.path.join(root, 's1'), '--s2', os.path.join(root, 's2c'),
          '--labels', os.path.join(root, 'labels', 'noisy_manifest.csv'), '--out', out,
          '--val-fraction', '0.1', '--examples-per-shard', '4']
  if FLAGS.workers:
    argv += ['--workers', str(FLAGS.workers)]
  return ssl4eo.main(argv)


def _rss_mib(pid: int) -> float:
  try:
    with open(f'/proc/{pid}/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def _child_pids(pid: int) -> list[int]:
  """Every descendant process (grain's workers), from /proc (Linux)."""
  out, todo = [], [pid]
  while todo:
    parent = todo.pop()
    try:
      for task in os.listdir(f'/proc/{parent}/task'):
        with open(f'/proc/{parent}/task/{task}/children', encoding='ascii') as f:
          children = [int(c) for c in f.read().split()]
        out += children
        todo += children
    except OSError:
      continue
  return out


def _cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process so far (Linux /proc)."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  except (OSError, IndexError, ValueError):
    return 0.0


def _pipeline_rss_mib(baseline_mib: float) -> float:
  """RSS of the pipeline: this process's growth since `baseline_mib` plus its workers."""
  own = _rss_mib(os.getpid()) - baseline_mib
  return own + sum(_rss_mib(pid) for pid in _child_pids(os.getpid()))


def benchmark_input() -> dict:
  """Samples/s, bytes read per sample and host memory of the pretraining input pipeline."""
  from configs import pretrain
  from cromss_jax import input_pipeline
  with tempfile.TemporaryDirectory() as tmp:
    dataset_dir = FLAGS.dataset_dir
    if not dataset_dir:
      dataset_dir = os.path.join(tmp, 'records')
      _convert_raw(_generate_raw(tmp, FLAGS.locations), dataset_dir)
    config = pretrain.get_config()
    config.data.dataset_dir = dataset_dir
    if FLAGS.input_workers is not None:
      config.data.num_workers = FLAGS.input_workers
    workers = config.data.num_workers
    if FLAGS.input_prefetch is not None:
      config.data.prefetch = FLAGS.input_prefetch
    config.training.global_batch_size = FLAGS.input_batch
    config.training.steps_per_epoch = FLAGS.input_batches + 1
    info = input_pipeline.pretrain_info(config, process_count=1)
    config.data.tile_size = info.tile_size
    config.data.crop_size = min(config.data.crop_size, info.tile_size)
    # Each sample reads exactly one record (group_size 1: one chunk per record).
    files = [os.path.join(info.dataset_dir, f) for f in os.listdir(info.dataset_dir)
             if f'-{info.train_split}.array_record-' in f]
    records = info.num_train_examples * info.num_seasons
    bytes_per_sample = sum(os.path.getsize(f) for f in files) / records
    baseline = _rss_mib(os.getpid())
    iterator = input_pipeline.create_pretrain_iterator(config, 'train', process_index=0,
                                                       process_count=1)
    next(iterator)  # start-up (workers, opening files) is not throughput
    peak_rss = 0.0
    workers_cpu = {pid: _cpu_seconds(pid) for pid in _child_pids(os.getpid())}
    own_cpu = _cpu_seconds(os.getpid())
    t0 = time.perf_counter()
    for _ in range(FLAGS.input_batches):
      next(iterator)
      peak_rss = max(peak_rss, _pipeline_rss_mib(baseline))
    elapsed = time.perf_counter() - t0
    own_cpu = _cpu_seconds(os.getpid()) - own_cpu
    workers_cpu = sum(_cpu_seconds(pid) - workers_cpu.get(pid, 0.0)
                      for pid in _child_pids(os.getpid()))
    del iterator
  samples = FLAGS.input_batches * config.training.global_batch_size
  rate = samples / elapsed
  cores = _usable_cores()
  cpu = own_cpu + workers_cpu
  figures = {'mode': 'input', 'samples_per_s': round(rate, 1),
             'samples_per_s_per_core': round(rate / cores, 1), 'cores': cores,
             'samples_per_cpu_s': round(samples / cpu, 1) if cpu > 0 else None,
             'cpu_s_main': round(own_cpu, 2), 'cpu_s_workers': round(workers_cpu, 2),
             'workers': workers, 'tile': info.tile_size, 'batch': config.training.global_batch_size,
             'bytes_per_sample': int(bytes_per_sample), 'pipeline_rss_mib': round(peak_rss),
             'load_avg': round(os.getloadavg()[0], 2)}
  _print_table(
      f'Pretraining input pipeline: {info.tile_size} px (location, season) records, whole '
      f'uint8 tiles, batch {config.training.global_batch_size}, '
      + (f'{workers} reader processes' if workers else
         f'{config.data.prefetch} reader threads'),
      [('throughput', f'{rate:.1f} samples/s'),
       ('per core', f'{rate / cores:.1f} samples/s ({cores} cores)'),
       ('per CPU second', f'{figures["samples_per_cpu_s"]} samples (main {own_cpu:.1f} s + '
                          f'workers {workers_cpu:.1f} s of CPU)'),
       ('bytes read per sample', f'{bytes_per_sample / 1e6:.3f} MB'),
       ('pipeline memory (peak RSS)', f'{peak_rss:.0f} MiB (this process\'s growth + workers)'),
       ('load average', figures['load_avg'])], figures)
  return figures


def benchmark_convert() -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    raw = _generate_raw(tmp, FLAGS.locations)
    t0 = time.perf_counter()
    _convert_raw(raw, os.path.join(tmp, 'records'))
    elapsed = time.perf_counter() - t0
  rate = FLAGS.locations / elapsed
  workers = FLAGS.workers or os.cpu_count()
  figures = {'mode': 'convert', 'locations_per_s': round(rate, 3), 'workers': workers,
             'locations': FLAGS.locations, 'seconds': round(elapsed, 2)}
  _print_table('GeoTIFF -> array_record conversion (SSL4EO-S12 layout, 4 seasons, 15 bands)',
               [('locations', FLAGS.locations), ('workers', workers),
                ('time', f'{elapsed:.1f} s'), ('rate', f'{rate:.2f} locations/s')], figures)
  return figures


def benchmark_predict() -> dict:
  """Peak memory and time of mapping a generated scene (cromss_jax.apps.benchmark_predict)."""
  from cromss_jax.apps import benchmark_predict as bp  # pylint: disable=g-import-not-at-top
  figures = bp.benchmark_predict(FLAGS.scene_height, FLAGS.scene_width, valid=FLAGS.scene_valid,
                                 batch=FLAGS.batch, network=FLAGS.network)
  _print_table(
      f'Mapping a {FLAGS.scene_height} x {FLAGS.scene_width} scene ({FLAGS.network}, '
      f'{FLAGS.scene_valid}^2 px valid, batch {FLAGS.batch})',
      [('windows (computed / skipped)', f'{figures["windows"]} ({figures["windows_computed"]} / '
                                        f'{figures["windows_skipped"]})'),
       ('peak RSS', f'{figures["peak_rss_mib"]} MiB'),
       ('RSS with the network ready', f'{figures["model_ready_rss_mib"]} MiB'),
       ('mapping time', f'{figures["map_s"]} s')], figures)
  return figures


def main(argv):
  mode = argv[1] if len(argv) > 1 else 'step'
  if len(argv) > 2 or mode not in _MODES:
    raise cli.UserError(f'usage: python -m cromss_jax.benchmark [{_MODE_HELP}] [--flags]')
  logging.set_verbosity(logging.WARNING)
  {'step': benchmark_step, 'step_torch': benchmark_step_torch, 'input': benchmark_input,
   'convert': benchmark_convert, 'predict': benchmark_predict}[mode]()


def run() -> None:
  cli.run_absl(main)


if __name__ == '__main__':
  run()
