"""Land-cover maps of whole Sentinel scenes with a transferred or a pretrained CromSS model.

  python -m cromss_jax.predict --model MODEL --s2 scene_s2.tif [--s1 scene_s1.tif] \
      --out map.tif [--window 256] [--overlap 64] [--batch 16] [--confidence]

MODEL is either
* a transfer workdir (its latest checkpoint and config; classes constants.DFC_DW8_CLASSES), or
* a pretraining export, `EXPORT/pretrain_model` or `EXPORT` itself (`python -m
  cromss_jax.export`; the whole two-branch network, 9 Dynamic World classes). It predicts from
  the S2 branch alone, or, when --s1 is given, from the mean of the two branches' softmax
  probabilities (each branch seeing its own sensor).

Inputs (GeoTIFF, any size): S2 L1C with the 13 bands B1..B12 (incl. B8A, B10) in SPEC order as
reflectance x 1e4, or exactly the model's band subset (e.g. 9 bands for an s2_bands=9 model)
already in the subset's order; S1 with 2 bands VV, VH in dB on the same grid (shape, CRS and
transform) as S2. S2-less S1 transfer models take --s1 alone. Bands are normalised exactly as
the converters did (constants.normalise_to_uint8, then / 255).

The scene is cut into windows of --window px overlapping by --overlap px, padded by reflection
at the borders so every pixel is covered; each window's softmax probabilities are weighted by a
2-D raised-cosine taper over the overlap (complementary: the weights of neighbouring windows add
to 1) and the accumulated probabilities are normalised by the accumulated weights, so no seams
appear. Windows go through one jitted function in batches of --batch.

Output: a uint8 GeoTIFF with the input's CRS and transform, class indices with a colour table
(constants.DW_PALETTE), nodata 255 where the input has none (a pixel whose bands all equal the
file's nodata value or are all 0, or with any NaN/inf; for S1-only models: all bands nodata or
NaN/inf); with --confidence a second band holds round(max probability x 255), capped at 254 so
that 255 stays nodata. The file is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging

from cromss_jax import constants
from cromss_jax import evaluate
from cromss_jax import exports
from cromss_jax import models
from cromss_jax.models import decoders

NODATA = 255
ROWS_PER_READ = 256      # rows read and normalised at a time (bounds the float64 temporaries)

ProbsFn = Callable[[Mapping[str, np.ndarray]], jax.Array]


class PredictionError(ValueError):
  """Inputs or arguments that cannot be used; the message names the file or the flag."""


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A window classifier and what it reads.

  probs_fn maps {'s2': uint8 [b, h, w, bands], 's1': uint8 [b, h, w, 2]} (only the keys the
  model reads) to float32 class probabilities [b, h, w, C].
  """
  probs_fn: ProbsFn
  class_names: tuple[str, ...]
  s2_bands: tuple[int, ...] | None   # indices into constants.S2_BANDS, in model order; None: no S2
  uses_s1: bool
  description: str

  @property
  def primary(self) -> str:
    """The input that sets the output grid and the nodata mask."""
    return 's2' if self.s2_bands is not None else 's1'


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def _jit_probs(apply: Callable, variables) -> ProbsFn:
  variables = jax.device_put(variables)
  compiled = jax.jit(apply)
  return lambda inputs: compiled(variables, {k: jnp.asarray(v) for k, v in inputs.items()})


def _transfer_predictor(workdir: str, dtype: str | None) -> Predictor:
  config, variables, _, step = evaluate.load_transfer_checkpoint(workdir)
  if dtype:
    config.model.compute_dtype = dtype
  model = decoders.build_transfer_model(config)
  modality = config.transfer.modality

  def apply(v, inputs):
    logits = model.apply(v, evaluate.unit_float(inputs[modality]), train=False)
    return jax.nn.softmax(logits, axis=-1)

  return Predictor(
      probs_fn=_jit_probs(apply, variables), class_names=evaluate.class_names(config),
      s2_bands=(constants.S2_BAND_SUBSETS[int(config.data.s2_bands)] if modality == 's2'
                else None),
      uses_s1=modality == 's1',
      description=f'{evaluate.run_name(config)}, step {step} of {os.path.abspath(workdir)}')


def _pretrain_predictor(path: str, with_s1: bool, dtype: str | None) -> Predictor:
  variables, meta = exports.load_exported(path)
  if meta.get('kind') != 'pretrain_model':
    raise PredictionError(f'{path} is a {meta.get("kind")!r} export; an encoder alone cannot '
                          'classify. Use EXPORT/pretrain_model or a transfer workdir.')
  config = ml_collections.ConfigDict(meta['config'])
  if dtype:
    config.model.compute_dtype = dtype
  num_classes = int(meta['num_classes'])
  s2_bands = int(config.data.s2_bands)
  model = models.build_pretrain_model(config.model, num_classes, s2_bands)
  s1_channels = int(config.model.s1_channels)

  def apply(v, inputs):
    s2 = evaluate.unit_float(inputs['s2'])
    s1 = (evaluate.unit_float(inputs['s1']) if with_s1
          else jnp.zeros(s2.shape[:3] + (s1_channels,), jnp.float32))  # branch unused: removed
    z1, z2 = model.apply(v, s1, s2, train=False)
    probs = jax.nn.softmax(z2, axis=-1)
    if with_s1:
      probs = (probs + jax.nn.softmax(z1, axis=-1)) / 2
    return probs

  names = tuple(meta.get('classes', constants.DW_CLASSES))[:num_classes]
  mode = 'mean of S1 and S2 branches' if with_s1 else 'S2 branch'
  return Predictor(
      probs_fn=_jit_probs(apply, variables), class_names=names,
      s2_bands=constants.S2_BAND_SUBSETS[s2_bands], uses_s1=with_s1,
      description=f'CromSS {config.model.fusion} pretraining model ({config.model.encoder}, '
                  f'{mode}), step {meta.get("source_step")} of {meta.get("source_workdir")}')


def load_predictor(model_path: str, *, with_s1: bool = False,
                   compute_dtype: str | None = None) -> Predictor:
  """A transfer workdir or a pretraining export (EXPORT/pretrain_model or EXPORT)."""
  path = os.path.abspath(os.path.expanduser(model_path.rstrip('/')))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return _transfer_predictor(path, compute_dtype)
  if os.path.isfile(path + '.json'):
    return _pretrain_predictor(path, with_s1, compute_dtype)
  if os.path.isfile(os.path.join(path, 'pretrain_model.json')):
    return _pretrain_predictor(os.path.join(path, 'pretrain_model'), with_s1, compute_dtype)
  raise PredictionError(f'--model {model_path}: neither a transfer workdir (no checkpoints/) nor '
                        'a pretraining export (no pretrain_model.json).')


# ----------------------------------------------------------------------------------------------
# Rasters
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RasterInfo:
  path: str
  height: int
  width: int
  count: int
  crs: object
  transform: object
  nodata: float | None


def raster_info(path: str, what: str) -> RasterInfo:
  import rasterio  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise PredictionError(f'{what} file {path} does not exist (or is not a file).')
  try:
    with rasterio.open(path) as src:
      return RasterInfo(path=path, height=src.height, width=src.width, count=src.count,
                        crs=src.crs, transform=src.transform, nodata=src.nodata)
  except rasterio.errors.RasterioError as err:
    raise PredictionError(f'{what} file {path} cannot be read as a raster: {err}') from None


def check_same_grid(a: RasterInfo, b: RasterInfo) -> None:
  """S1 and S2 must share shape, CRS and transform (to 1e-6 of a pixel)."""
  if (a.height, a.width) != (b.height, b.width):
    raise PredictionError(f'{b.path} is {b.height}x{b.width} px but {a.path} is '
                          f'{a.height}x{a.width}; S1 and S2 must be on the same grid.')
  if a.crs != b.crs:
    raise PredictionError(f'{b.path} has CRS {b.crs} but {a.path} has {a.crs}; S1 and S2 must '
                          'be on the same grid.')
  pixel = max(abs(a.transform.a), abs(a.transform.e), 1e-12)
  if not np.allclose(tuple(a.transform)[:6], tuple(b.transform)[:6], rtol=0, atol=1e-6 * pixel):
    raise PredictionError(f'{b.path} has transform {tuple(b.transform)[:6]} but {a.path} has '
                          f'{tuple(a.transform)[:6]}; S1 and S2 must be on the same grid.')


def _bands_to_read(info: RasterInfo, modality: str, subset: tuple[int, ...]) -> list[int]:
  """1-based band indexes of the model's bands in the file, or a PredictionError."""
  if modality == 's1':
    if info.count != len(constants.S1_BANDS):
      raise PredictionError(f'{info.path} has {info.count} bands; an S1 input needs 2 (VV, VH '
                            'in dB).')
    return [1, 2]
  full = len(constants.S2_BANDS)
  if info.count == full:
    return [i + 1 for i in subset]
  if info.count == len(subset):
    return list(range(1, info.count + 1))
  names = ', '.join(constants.S2_BANDS[i] for i in subset)
  alternative = f' or {len(subset)} (the model\'s bands {names}, in that order)' if len(
      subset) != full else ''
  raise PredictionError(f'{info.path} has {info.count} bands; an S2 input needs {full} '
                        f'(B1..B12 incl. B8A and B10, SPEC order){alternative}.')


def read_normalised(info: RasterInfo, modality: str,
                    subset: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [H, W, bands] normalised as the converters did, bool [H, W] nodata mask)."""
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.windows import Window  # pylint: disable=g-import-not-at-top

  indexes = _bands_to_read(info, modality, subset)
  if modality == 's1':
    mean, std = constants.S1_MEAN, constants.S1_STD
  else:
    mean = [constants.S2_MEAN[i] for i in subset]
    std = [constants.S2_STD[i] for i in subset]
  image = np.empty((info.height, info.width, len(indexes)), np.uint8)
  nodata = np.zeros((info.height, info.width), bool)
  try:
    with rasterio.open(info.path) as src:
      for r0 in range(0, info.height, ROWS_PER_READ):
        rows = min(ROWS_PER_READ, info.height - r0)
        block = src.read(indexes, window=Window(0, r0, info.width, rows))
        block = np.moveaxis(block, 0, -1)                       # [rows, W, bands]
        finite = np.isfinite(block) if np.issubdtype(block.dtype, np.floating) else None
        marked = (np.zeros(block.shape, bool) if info.nodata is None or math.isnan(info.nodata)
                  else block == info.nodata)
        if modality == 's1':
          bad = np.all(marked | ~finite, -1) if finite is not None else np.all(marked, -1)
        else:
          bad = np.all(marked, -1) | np.all(block == 0, -1)
          if finite is not None:
            bad |= np.any(~finite, -1)
        nodata[r0:r0 + rows] = bad
        image[r0:r0 + rows], _ = constants.normalise_to_uint8(block, mean, std)
  except rasterio.errors.RasterioError as err:
    raise PredictionError(f'{info.path} cannot be read: {err}') from None
  return image, nodata


# ----------------------------------------------------------------------------------------------
# Sliding windows
# ----------------------------------------------------------------------------------------------
def taper(window: int, overlap: int) -> np.ndarray:
  """1-D raised-cosine weights: rise over `overlap` px at each end, 1 between, never 0.

  With windows `window - overlap` apart, the rising end of one and the falling end of the
  previous add to exactly 1, so blending only mixes where windows overlap.
  """
  weights = np.ones(window, np.float64)
  if overlap > 0:
    rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
    weights[:overlap] = rise
    weights[window - overlap:] = np.minimum(weights[window - overlap:], rise[::-1])
  return weights.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WindowGrid:
  """Window origins in padded coordinates; scene pixel (y, x) is padded (y + margin, x + margin)."""
  window: int
  stride: int
  margin: int
  rows: int          # windows per column
  cols: int          # windows per row
  padded_height: int
  padded_width: int

  @classmethod
  def create(cls, height: int, width: int, window: int, overlap: int) -> 'WindowGrid':
    stride = window - overlap
    margin = overlap // 2

    def count(size: int) -> int:
      return 1 + max(0, math.ceil((size + 2 * margin - window) / stride))

    rows, cols = count(height), count(width)
    return cls(window, stride, margin, rows, cols, (rows - 1) * stride + window,
               (cols - 1) * stride + window)


def reflect_indices(start: int, length: int, size: int) -> np.ndarray:
  """Indices start..start+length-1 mirrored into [0, size) (numpy 'reflect': edge not repeated)."""
  idx = np.arange(start, start + length)
  if size == 1:
    return np.zeros(length, np.int64)
  period = 2 * (size - 1)
  idx = np.abs(idx) % period
  return np.where(idx >= size, period - idx, idx)


def _row_inputs(images: Mapping[str, np.ndarray], grid: WindowGrid, row: int
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  height, width = next(iter(images.values())).shape[:2]
  ys = reflect_indices(row * grid.stride - grid.margin, grid.window, height)
  for col in range(grid.cols):
    xs = reflect_indices(col * grid.stride - grid.margin, grid.window, width)
    yield col, {k: v[ys[:, None], xs[None, :]] for k, v in images.items()}


def blended_rows(predictor: Predictor, images: Mapping[str, np.ndarray], grid: WindowGrid,
                 batch: int, progress: Callable[[int], None] | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (first scene row, probabilities [rows, W, C]) in order, covering the scene once.

  One strip of `window` padded rows is accumulated at a time; after each row of windows its
  first `stride` rows receive no further contributions and are emitted.
  """
  height, width = next(iter(images.values())).shape[:2]
  weights = np.outer(taper(grid.window, grid.window - grid.stride),
                     taper(grid.window, grid.window - grid.stride))
  acc = None
  norm = np.zeros((grid.window, grid.padded_width), np.float32)
  for row in range(grid.rows):
    pending = []
    windows = list(_row_inputs(images, grid, row))
    for start in range(0, len(windows), batch):
      chunk = windows[start:start + batch]
      stacked = {k: np.stack([w[k] for _, w in chunk]) for k in chunk[0][1]}
      if len(chunk) < batch:   # fixed batch shape: one compilation for the whole scene
        stacked = {k: np.concatenate([v, np.zeros((batch - len(chunk),) + v.shape[1:], v.dtype)])
                   for k, v in stacked.items()}
      pending.append(([c for c, _ in chunk], predictor.probs_fn(stacked)))  # async dispatch
    for cols, probs in pending:
      probs = np.asarray(probs, np.float32)
      if acc is None:
        acc = np.zeros((grid.window, grid.padded_width, probs.shape[-1]), np.float32)
      for i, col in enumerate(cols):
        x0 = col * grid.stride
        acc[:, x0:x0 + grid.window] += probs[i] * weights[..., None]
        norm[:, x0:x0 + grid.window] += weights
      if progress is not None:
        progress(len(cols))
    done = grid.stride if row < grid.rows - 1 else grid.window
    y0 = row * grid.stride - grid.margin        # scene row of the strip's first row
    first, last = max(y0, 0), min(y0 + done, height)
    if last > first:
      strip = slice(first - y0, last - y0)
      scene_cols = slice(grid.margin, grid.margin + width)
      yield first, acc[strip, scene_cols] / norm[strip, scene_cols, None]
    acc = np.concatenate([acc[done:], np.zeros_like(acc[:done])])
    norm = np.concatenate([norm[done:], np.zeros_like(norm[:done])])


def _write_class_map(path: str, reference: RasterInfo, predictor: Predictor,
                     rows: Iterator[tuple[int, np.ndarray]], nodata: np.ndarray,
                     confidence: bool) -> dict[str, int]:
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.windows import Window  # pylint: disable=g-import-not-at-top

  num_classes = len(predictor.class_names)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
  counts = np.zeros(num_classes, np.int64)
  profile = dict(driver='GTiff', height=reference.height, width=reference.width,
                 count=2 if confidence else 1, dtype='uint8', crs=reference.crs,
                 transform=reference.transform, nodata=NODATA, compress='deflate')
  try:
    with rasterio.open(tmp, 'w', **profile) as dst:
      for first, probs in rows:
        n = probs.shape[0]
        invalid = nodata[first:first + n]
        classes = np.argmax(probs, axis=-1).astype(np.uint8)
        classes[invalid] = NODATA
        counts += np.bincount(classes[~invalid].ravel(), minlength=num_classes)[:num_classes]
        window = Window(0, first, reference.width, n)
        dst.write(classes, 1, window=window)
        if confidence:
          conf = np.minimum(np.rint(np.max(probs, axis=-1) * 255.0), NODATA - 1).astype(np.uint8)
          conf[invalid] = NODATA
          dst.write(conf, 2, window=window)
      palette = {i: tuple(constants.DW_PALETTE[i % len(constants.DW_PALETTE)]) + (255,)
                 for i in range(num_classes)}
      palette[NODATA] = (0, 0, 0, 0)
      dst.write_colormap(1, palette)
      dst.set_band_description(1, 'class')
      if confidence:
        dst.set_band_description(2, 'confidence: round(max probability x 255), max 254')
      dst.update_tags(classes=json.dumps(list(predictor.class_names)),
                      model=predictor.description)
      dst.update_tags(1, **{str(i): name for i, name in enumerate(predictor.class_names)})
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return {name: int(c) for name, c in zip(predictor.class_names, counts)}


def predict_scene(predictor: Predictor, out_path: str, *, s2_path: str | None = None,
                  s1_path: str | None = None, window: int = 256, overlap: int = 64,
                  batch: int = 16, confidence: bool = False,
                  progress: bool = True) -> dict[str, object]:
  """Classifies a whole scene and writes the GeoTIFF; returns a summary (pixels per class)."""
  if window < 32 or window % 32:
    raise PredictionError(f'--window={window} must be a positive multiple of 32 (the encoder '
                          'downsamples 5 times).')
  if not 0 <= overlap < window:
    raise PredictionError(f'--overlap={overlap} must be in [0, --window={window}).')
  if batch < 1:
    raise PredictionError(f'--batch={batch} must be >= 1.')
  if predictor.s2_bands is not None and not s2_path:
    raise PredictionError(f'{predictor.description} reads Sentinel-2: give --s2.')
  if predictor.uses_s1 and not s1_path:
    raise PredictionError(f'{predictor.description} reads Sentinel-1: give --s1.')
  infos = {}
  if predictor.s2_bands is not None:
    infos['s2'] = raster_info(s2_path, 'S2')
  elif s2_path:
    logging.warning('%s reads S1 only; ignoring --s2 %s.', predictor.description, s2_path)
  if predictor.uses_s1:
    infos['s1'] = raster_info(s1_path, 'S1')
  elif s1_path:
    logging.warning('%s does not read S1; ignoring --s1 %s.', predictor.description, s1_path)
  reference = infos[predictor.primary]
  for modality, info in infos.items():     # band counts and grids before any heavy reading
    _bands_to_read(info, modality, predictor.s2_bands or ())
    check_same_grid(reference, info)

  images, masks = {}, {}
  for modality, info in infos.items():
    images[modality], masks[modality] = read_normalised(info, modality, predictor.s2_bands or ())
  nodata = masks[predictor.primary]
  grid = WindowGrid.create(reference.height, reference.width, window, overlap)
  total = grid.rows * grid.cols
  logging.info('%s: %dx%d px, %d windows of %d px (overlap %d) with %s.', reference.path,
               reference.height, reference.width, total, window, overlap, predictor.description)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with tqdm(total=total, unit='window', disable=not progress, file=sys.stderr) as bar:
    rows = blended_rows(predictor, images, grid, batch, progress=bar.update)
    counts = _write_class_map(out_path, reference, predictor, rows, nodata, confidence)
  return {'out': out_path, 'height': reference.height, 'width': reference.width,
          'windows': total, 'nodata_pixels': int(nodata.sum()), 'pixels_per_class': counts}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _define_flags() -> None:
  """CLI flags, defined only when run as a program (allow_override: export defines --out)."""
  flags.DEFINE_string('model', None, 'Transfer workdir, or pretraining export '
                      '(EXPORT/pretrain_model or EXPORT).')
  flags.DEFINE_string('s2', None, 'Sentinel-2 L1C GeoTIFF (13 bands, or the model\'s subset).')
  flags.DEFINE_string('s1', None, 'Sentinel-1 GeoTIFF (VV, VH in dB) on the S2 grid.')
  flags.DEFINE_string('out', None, 'Output class map (GeoTIFF).', allow_override=True)
  flags.DEFINE_integer('window', 256, 'Window size in px (multiple of 32).')
  flags.DEFINE_integer('overlap', 64, 'Overlap of neighbouring windows in px.')
  flags.DEFINE_integer('batch', 16, 'Windows per forward pass.')
  flags.DEFINE_bool('confidence', False, 'Add a confidence band (max probability x 255).')
  flags.DEFINE_string('compute_dtype', None, 'Override the model\'s compute dtype '
                      '(float32 | bfloat16); e.g. float32 on CPUs.')
  flags.mark_flags_as_required(['model', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    predictor = load_predictor(f.model, with_s1=bool(f.s1), compute_dtype=f.compute_dtype)
    summary = predict_scene(predictor, f.out, s2_path=f.s2, s1_path=f.s1, window=f.window,
                            overlap=f.overlap, batch=f.batch, confidence=f.confidence)
  except (PredictionError, FileNotFoundError) as err:
    sys.exit(f'error: {err}')
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
