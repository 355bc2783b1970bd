"""Peak memory of mapping a large scene: `python -m cromss_jax.apps.benchmark_predict`.

  python -m cromss_jax.apps.benchmark_predict --height 10000 --width 10000 --valid 1024

Generates a 13-band uint16 S2 scene of HEIGHT x WIDTH px that is nodata (all zero) except a
VALID x VALID square in the middle (a sparse tiled GeoTIFF, so generating it costs neither time
nor disk), then maps it in a fresh process with the streaming mapper (`cromss_jax.mapping`, the
code behind `python -m cromss_jax.predict`) and a randomly initialised network (`--network
resnet18`: a ResNet-18 PSPNet transfer model as `configs/transfer.py` builds it; `toy`: one
per-pixel layer, to see the mapper alone). The child's peak resident set size is read from the
kernel (`wait4` rusage), and its RSS once the network is built and compiled (before any scene
is read) is reported beside it, so the difference is what the mapping itself holds.

Prints a table and, as the last line, one JSON object with the figures (the project's benchmark
convention). `benchmark_predict(...)` returns the same dict.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import numpy as np


def _scene(path: str, height: int, width: int, valid: int, seed: int = 0) -> None:
  """Sparse tiled GeoTIFF: only the tiles of the valid square are written (the rest reads 0)."""
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.transform import Affine  # pylint: disable=g-import-not-at-top
  from rasterio.windows import Window  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  spectra = rng.uniform(300, 3500, (4, 13))
  y0, x0 = (height - valid) // 2, (width - valid) // 2
  with rasterio.open(path, 'w', driver='GTiff', height=height, width=width, count=13,
                     dtype='uint16', crs='EPSG:32632', nodata=0, tiled=True, blockxsize=512,
                     blockysize=512, compress='deflate', sparse_ok=True, bigtiff='yes',
                     transform=Affine(10.0, 0, 500_000.0, 0, -10.0, 5_000_000.0)) as dst:
    for r in range(0, valid, 512):
      rows = min(512, valid - r)
      cover = rng.integers(0, 4, (rows, valid))
      block = spectra[cover].transpose(2, 0, 1) + rng.normal(0, 150, (13, rows, valid))
      dst.write(np.clip(block, 1, 10000).astype(np.uint16),
                window=Window(x0, y0 + r, valid, rows))


def _network(name: str):
  """(predictor, description) with random weights; nothing is loaded from disk."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cromss_jax import constants, mapping, models  # pylint: disable=g-import-not-at-top
  if name == 'toy':
    kernel = jax.random.normal(jax.random.PRNGKey(0), (13, 8))
    apply = jax.jit(lambda s2: jax.nn.softmax(models.unit_float(s2) @ kernel, -1))
    probs_fn = lambda inputs: apply(inputs['s2'])
    names = constants.DW_CLASSES[:8]
  elif name == 'resnet18':
    from configs import transfer as transfer_config  # pylint: disable=g-import-not-at-top
    from cromss_jax.models import decoders  # pylint: disable=g-import-not-at-top
    config = transfer_config.get_config()
    config.model.encoder = 'resnet18'
    config.model.compute_dtype = 'float32'
    model = decoders.build_transfer_model(config)
    variables = models.jit_init(lambda: model.init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 64, 64, 13)), train=False))()
    apply = jax.jit(lambda v, s2: jax.nn.softmax(model.apply(v, models.unit_float(s2),
                                                             train=False), -1))
    probs_fn = lambda inputs: apply(variables, inputs['s2'])
    names = constants.DFC_DW8_CLASSES
  else:
    raise ValueError(f'--network {name}: toy or resnet18')
  return mapping.Predictor(probs_fn=probs_fn, class_names=tuple(names),
                           s2_bands=constants.S2_BAND_SUBSETS[13], uses_s1=False,
                           description=f'random {name}')


def _worker(s2: str, out: str, network: str, window: int, overlap: int, batch: int) -> dict:
  from cromss_jax import mapping  # pylint: disable=g-import-not-at-top
  predictor = _network(network)
  np.asarray(predictor.probs_fn({'s2': np.zeros((batch, window, window, 13), np.uint8)}))
  ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  summary = mapping.predict_scene(predictor, out, s2_path=s2, window=window, overlap=overlap,
                                  batch=batch, progress=False)
  return {'model_ready_rss_mib': round(ready, 1), 'map_s': round(time.perf_counter() - t0, 2),
          'windows': summary['windows'], 'windows_computed': summary['windows_computed'],
          'windows_skipped': summary['windows_skipped']}


def benchmark_predict(height: int = 10_000, width: int = 10_000, *, valid: int = 1024,
                      window: int = 256, overlap: int = 64, batch: int = 16,
                      network: str = 'resnet18', workdir: str | None = None) -> dict:
  """Maps a generated HEIGHT x WIDTH scene in a child process; returns its peak RSS and more."""
  own_tmp = workdir is None
  workdir = workdir or tempfile.mkdtemp(prefix='benchmark_predict_')
  os.makedirs(workdir, exist_ok=True)
  s2, out = os.path.join(workdir, 's2.tif'), os.path.join(workdir, 'map.tif')
  t0 = time.perf_counter()
  _scene(s2, height, width, min(valid, height, width))
  generate_s = time.perf_counter() - t0
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get(
      'PYTHONPATH')])))
  command = [sys.executable, '-m', 'cromss_jax.apps.benchmark_predict', '--worker', '--s2', s2,
             '--out', out, '--network', network, f'--window={window}', f'--overlap={overlap}',
             f'--batch={batch}']
  t0 = time.perf_counter()
  child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
  stdout = child.stdout.read()
  _, status, usage = os.wait4(child.pid, 0)
  child.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  if child.returncode != 0:
    raise RuntimeError(f'mapping child failed with status {child.returncode}')
  figures = json.loads(stdout.strip().splitlines()[-1])
  result = {
      'mode': 'predict', 'height': height, 'width': width, 'valid_px': min(valid, height, width),
      'network': network, 'window': window, 'overlap': overlap, 'batch': batch,
      'peak_rss_mib': round(usage.ru_maxrss / 1024, 1), **figures,
      'child_wall_s': round(wall, 2), 'generate_s': round(generate_s, 2),
      'map_file_mib': round(os.path.getsize(out) / 2**20, 2), 'cpus': os.cpu_count(),
      'machine': platform.processor() or platform.machine(),
  }
  if own_tmp:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(workdir, ignore_errors=True)
  return result


def _define_flags() -> None:
  """Flags exist only when this module runs as a program (importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer('height', 10_000, 'Scene height in px.')
  flags.DEFINE_integer('width', 10_000, 'Scene width in px.')
  flags.DEFINE_integer('valid', 1024, 'Side of the valid (non-nodata) square in px.')
  flags.DEFINE_integer('window', 256, 'Window size in px.')
  flags.DEFINE_integer('overlap', 64, 'Window overlap in px.')
  flags.DEFINE_integer('batch', 16, 'Windows per forward pass.')
  flags.DEFINE_enum('network', 'resnet18', ['resnet18', 'toy'], 'Randomly initialised network.')
  flags.DEFINE_string('workdir', None, 'Keep the scene and the map here (default: a temp dir).')
  flags.DEFINE_bool('worker', False, 'Internal: map --s2 into --out and print the figures.')
  flags.DEFINE_string('s2', None, 'Internal (--worker).')
  flags.DEFINE_string('out', None, 'Internal (--worker).')


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {argv[1:]}')
  if f.worker:
    print(json.dumps(_worker(f.s2, f.out, f.network, f.window, f.overlap, f.batch)))
    return
  result = benchmark_predict(f.height, f.width, valid=f.valid, window=f.window,
                             overlap=f.overlap, batch=f.batch, network=f.network,
                             workdir=f.workdir)
  print(f'| scene | valid | network | windows (computed / skipped) | peak RSS | RSS with '
        f'network ready | map time |\n| --- | --- | --- | --- | --- | --- | --- |\n'
        f'| {result["height"]} x {result["width"]} | {result["valid_px"]}^2 | '
        f'{result["network"]} | {result["windows"]} ({result["windows_computed"]} / '
        f'{result["windows_skipped"]}) | {result["peak_rss_mib"]} MiB | '
        f'{result["model_ready_rss_mib"]} MiB | {result["map_s"]} s |')
  print(json.dumps(result))


def run() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
