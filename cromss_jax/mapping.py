"""Land-cover maps of whole Sentinel scenes: sliding windows streamed from GeoTIFF to a COG.

MODEL is either
* a transfer workdir (its latest checkpoint and config; classes constants.DFC_DW8_CLASSES), or
* a pretraining export, `EXPORT/pretrain_model` or `EXPORT` itself (`python -m
  cromss_jax.export`; the whole two-branch network, 9 Dynamic World classes). It predicts from
  the S2 branch alone, or, when S1 is given, from the mean of the two branches' softmax
  probabilities (each branch seeing its own sensor).

Inputs, as users have them:
* S2: one raster with the 13 L1C bands B1..B12 (incl. B8A, B10) in band order, the 12 L2A bands
  (no B10), exactly the model's band subset in the subset's order, or any bands named by their
  band descriptions (B1/B01...); or a FOLDER of one file per band (`B01.tif`, `B1.tif`,
  `T32UNU_..._B8A.jp2`, L2A `R10m/..._B02_10m.jp2`; the finest resolution of a band is used) at
  native resolution, each band resampled (bilinear, as the converter) onto the finest band's
  grid; or a VRT. Values are reflectance x 1e4; the +1000 DN offset of processing baseline
  >= 04.00 products is removed when the file declares it (or as `s2_offset` says).
* S1: VV, VH in dB. On another grid than S2 (CRS, pixel size, extent) it is reprojected onto
  the S2 grid on the fly (GDAL warped VRT, bilinear); it is refused only when it does not
  overlap S2. S2-less S1 transfer models take S1 alone.
* Rasters without a CRS are refused unless `allow_no_crs` (the map would have no location).
Bands are normalised exactly as the converters did (constants.normalise_to_uint8, then / 255),
with the per-band mean and std that the model's export records (else the converters' L1C ones).

The scene is cut into windows of `window` px overlapping by `overlap` px, padded by reflection
at the borders so every pixel is covered; each window's softmax probabilities are weighted by a
2-D raised-cosine taper over the overlap (complementary: the weights of neighbouring windows add
to 1) and the accumulated probabilities are normalised by the accumulated weights, so no seams
appear. Windows go through one jitted function in batches of `batch`.

Streaming, with memory independent of the scene size: the scene is processed in column blocks of
at most BLOCK_WIDTH output columns and, within a block, one row of windows at a time; only the
input rows of the current row of windows (for the block's columns) and one strip of
accumulated probabilities are held. A block also computes the windows it shares with its
neighbours, so every pixel receives all its windows' contributions in the same order as in a
whole-scene pass: the result is bit-identical to accumulating the whole scene at once. Windows
whose input is entirely nodata are skipped (their pixels are nodata in the map anyway).

Output: a Cloud-Optimised GeoTIFF (GDAL's COG driver: 512 px tiles, DEFLATE, nearest-neighbour
overviews) with the input's CRS and transform, uint8 class indices with a colour table
(constants.DW_PALETTE), nodata 255 where the input has none (a pixel whose bands all equal the
file's nodata value or are all 0, or with any NaN/inf; for S1-only models: all bands nodata or
NaN/inf); with `confidence` a second band holds round(max probability x 255), capped at 254 so
that 255 stays nodata. Beside MAP.tif: `MAP.tif.aux.xml` (GDAL category names and a raster
attribute table: value, class, colour, pixel count) and `MAP.qml`, a QGIS paletted style with the
class names and colours that QGIS applies when it opens the map. Every file is written under a
temporary name and renamed when complete; an output that is one of the inputs is refused before
anything is read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import uuid
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cromss_jax import cli
from cromss_jax import constants
from cromss_jax import exports
from cromss_jax import models
from cromss_jax import utils
from cromss_jax.models import decoders

NODATA = 255
TILE = 512               # COG tile size; column blocks are multiples of it (no shared tiles)
BLOCK_WIDTH = 4096       # output columns per column block: bounds memory for any scene width
NORMALISE_ROWS = 64      # rows normalised at a time on the float path (bounds float64 temporaries)
GDAL_CACHE_MB = 128      # GDAL's block cache (its default, 5 % of RAM, would dominate the RSS)
S2_RESAMPLING = 'bilinear'   # as data_prep.ssl4eo brings 20/60 m bands onto the 10 m grid
S1_RESAMPLING = 'bilinear'
RASTER_SUFFIXES = ('.tif', '.tiff', '.jp2', '.vrt')

ProbsFn = Callable[[Mapping[str, np.ndarray]], jax.Array]


class PredictionError(cli.UserError, ValueError):
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
  # modality -> (mean, std) per model band, from the model's metadata; else the converters'.
  normalisation: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = (
      dataclasses.field(default_factory=dict))

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


def _checkpoint_task(workdir: str) -> str | None:
  """The `task` recorded with the latest checkpoint (reads only its small JSON part)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'checkpoints')
  try:
    with ocp.CheckpointManager(directory, item_handlers={
        'meta': ocp.JsonCheckpointHandler()}) as manager:
      step = manager.latest_step()
      if step is None:
        return None
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(meta['meta']).get('task')
  except Exception as err:  # pylint: disable=broad-except
    raise PredictionError(f'--model {workdir}: its latest checkpoint cannot be read '
                          f'({type(err).__name__}: {" ".join(str(err).split())[:300]}).'
                          ) from None


def _transfer_predictor(workdir: str, dtype: str | None) -> Predictor:
  # The transfer task imports the tf.data input pipeline (TensorFlow: seconds and ~0.5 GB):
  # only here.
  from cromss_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from cromss_jax.tasks import transfer  # pylint: disable=g-import-not-at-top
  task = _checkpoint_task(workdir)
  if task is None:
    raise PredictionError(f'--model {workdir}: no complete checkpoint in '
                          f'{os.path.join(workdir, "checkpoints")}; train it first.')
  if task != 'transfer':
    hint = (f' Export its network with `python -m cromss_jax.export --workdir {workdir} --out '
            'EXPORT` and pass --model EXPORT (Dynamic World classes), or transfer it first.'
            if str(task).startswith('pretrain') else '')
    raise PredictionError(f'--model {workdir} is a {task!r} workdir; predict needs a transfer '
                          f'workdir or a pretraining export.{hint}')
  try:
    config, variables, _, step = checkpointing.load_transfer_checkpoint(workdir)
  except ValueError as err:
    raise PredictionError(f'--model {workdir}: {err}') from None
  if dtype:
    config.model.compute_dtype = dtype
  model = decoders.build_transfer_model(config)
  modality = config.transfer.modality

  def apply(v, inputs):
    logits = model.apply(v, models.unit_float(inputs[modality]), train=False)
    return jax.nn.softmax(logits, axis=-1)

  return Predictor(
      probs_fn=_jit_probs(apply, variables), class_names=transfer.class_names(config),
      s2_bands=(constants.S2_BAND_SUBSETS[int(config.data.s2_bands)] if modality == 's2'
                else None),
      uses_s1=modality == 's1',
      description=f'{transfer.run_name(config)}, step {step} of {os.path.abspath(workdir)}')


def _pretrain_predictor(path: str, with_s1: bool, dtype: str | None) -> Predictor:
  try:
    variables, meta = exports.load_exported(path)
  except (OSError, ValueError, KeyError) as err:
    raise PredictionError(f'--model {path}: the export cannot be read ({err}).') from None
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
    s2 = models.unit_float(inputs['s2'])
    s1 = (models.unit_float(inputs['s1']) if with_s1
          else jnp.zeros(s2.shape[:3] + (s1_channels,), jnp.float32))  # branch unused: removed
    z1, z2 = model.apply(v, s1, s2, train=False)
    probs = jax.nn.softmax(z2, axis=-1)
    if with_s1:
      probs = (probs + jax.nn.softmax(z1, axis=-1)) / 2
    return probs

  names = tuple(meta.get('classes', constants.DW_CLASSES))[:num_classes]
  mode = 'mean of S1 and S2 branches' if with_s1 else 'S2 branch'
  expected = {'s2': [constants.S2_BANDS[i] for i in constants.S2_BAND_SUBSETS[s2_bands]],
              's1': list(constants.S1_BANDS)}
  normalisation = {}
  for modality, bands in expected.items():
    recorded = meta.get(modality) or {}
    if not recorded.get('mean'):
      continue
    if list(recorded.get('bands', bands)) != bands or not (
        len(recorded['mean']) == len(recorded.get('std', ())) == len(bands)):
      raise PredictionError(f'{path}.json: {modality} bands {recorded.get("bands")} with '
                            f'{len(recorded["mean"])} means do not match the network\'s '
                            f'{bands}.')
    normalisation[modality] = (tuple(map(float, recorded['mean'])),
                               tuple(map(float, recorded['std'])))
  return Predictor(
      probs_fn=_jit_probs(apply, variables), class_names=names,
      s2_bands=constants.S2_BAND_SUBSETS[s2_bands], uses_s1=with_s1,
      normalisation=normalisation,
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
# Inputs: rasters read on the output grid
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


@contextlib.contextmanager
def _rasterio_errors(what: str) -> Iterator[None]:
  import rasterio  # pylint: disable=g-import-not-at-top
  try:
    yield
  except rasterio.errors.RasterioError as err:
    raise PredictionError(f'{what} cannot be read as a raster: '
                          f'{" ".join(str(err).split())}') from None


def _open(path: str):
  import rasterio  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
    return rasterio.open(path)


def raster_info(path: str, what: str) -> RasterInfo:
  if not os.path.isfile(path):
    raise PredictionError(f'{what} file {path} does not exist (or is not a file).')
  with _rasterio_errors(f'{what} file {path}'), _open(path) as src:
    return RasterInfo(path=path, height=src.height, width=src.width, count=src.count,
                      crs=src.crs, transform=src.transform, nodata=src.nodata)


def _same_grid(a: RasterInfo, b: RasterInfo) -> bool:
  if (a.height, a.width) != (b.height, b.width) or a.crs != b.crs:
    return False
  pixel = max(abs(a.transform.a), abs(a.transform.e), 1e-12)
  return bool(np.allclose(tuple(a.transform)[:6], tuple(b.transform)[:6], rtol=0,
                          atol=1e-6 * pixel))


def check_same_grid(a: RasterInfo, b: RasterInfo) -> None:
  """Shape, CRS and transform (to 1e-6 of a pixel) must agree, else a PredictionError."""
  if (a.height, a.width) != (b.height, b.width):
    raise PredictionError(f'{b.path} is {b.height}x{b.width} px but {a.path} is '
                          f'{a.height}x{a.width}; they must be on the same grid.')
  if a.crs != b.crs:
    raise PredictionError(f'{b.path} has CRS {b.crs} but {a.path} has {a.crs}; they must be on '
                          'the same grid.')
  if not _same_grid(a, b):
    raise PredictionError(f'{b.path} has transform {tuple(b.transform)[:6]} but {a.path} has '
                          f'{tuple(a.transform)[:6]}; they must be on the same grid.')


_BAND_IN_NAME = re.compile(r'(?:^|[^A-Za-z0-9])B(8A|1[0-2]|0?[1-9])(?=$|[^A-Za-z0-9])', re.I)


def s2_band_name(text: str) -> str | None:
  """'B02', 'b2', 'T32UNU_20200101T103321_B8A', 'B02_10m' -> 'B2' / 'B8A'; else None."""
  matches = _BAND_IN_NAME.findall(text or '')
  if len(matches) != 1:
    return None
  token = matches[0].upper()
  return 'B8A' if token == '8A' else f'B{int(token)}'


def _s2_file_layout(info: RasterInfo, descriptions: Sequence[str | None],
                    subset: tuple[int, ...]) -> tuple[int, ...]:
  """The S2 band (index into S2_BANDS) of each band of a file."""
  names = [s2_band_name(d) if d else None for d in descriptions]
  if all(names) and len(set(names)) == len(names):
    return tuple(constants.S2_BANDS.index(n) for n in names)
  full, l2a = len(constants.S2_BANDS), constants.S2_BAND_SUBSETS[12]
  if info.count == full:
    return tuple(range(full))
  if info.count == len(l2a):
    return l2a
  if info.count == len(subset):
    return subset
  names = ', '.join(constants.S2_BANDS[i] for i in subset)
  alternative = (f', or {len(subset)} (the model\'s bands {names}, in that order)'
                 if len(subset) not in (full, len(l2a)) else '')
  raise PredictionError(f'{info.path} has {info.count} bands; an S2 input needs 13 (L1C: B1..B12 '
                        f'incl. B8A and B10, in that order), 12 (L2A: the same without B10)'
                        f'{alternative}, or band descriptions naming its bands.')


def _missing_bands_error(where: str, missing: Sequence[int]) -> PredictionError:
  names = ', '.join(constants.S2_BANDS[i] for i in missing)
  hint = (' (L2A products have no B10: use a model trained on 12 bands, s2_bands=12)'
          if constants.S2_BANDS.index('B10') in missing else '')
  return PredictionError(f'{where} lacks band(s) {names} that the model reads{hint}.')


def _bounds(info_or_src) -> tuple[float, float, float, float]:
  from rasterio.transform import array_bounds  # pylint: disable=g-import-not-at-top
  return array_bounds(info_or_src.height, info_or_src.width, info_or_src.transform)


def _overlaps(src, grid: RasterInfo) -> bool:
  from rasterio.warp import transform_bounds  # pylint: disable=g-import-not-at-top
  try:
    west, south, east, north = transform_bounds(src.crs, grid.crs, *_bounds(src), densify_pts=21)
  except Exception:  # pylint: disable=broad-except  (no valid transformation between the CRSs)
    return False
  gw, gs, ge, gn = _bounds(grid)
  return all(map(math.isfinite, (west, south, east, north))) and (
      min(east, ge) > max(west, gw) and min(north, gn) > max(south, gs))


@dataclasses.dataclass
class _Part:
  """Bands of one dataset (a file, or a warped VRT of it on the output grid), in model order."""
  dataset: Any
  indexes: list[int]
  nodata: float | None
  owned: list[Any]          # datasets to close, last first
  offsets: tuple[float, ...] = ()   # S2 DN offset per band, removed before normalising


class Source:
  """One model input read on the output grid: `read(window)` -> [rows, cols, bands] raw values."""

  def __init__(self, modality: str, what: str, parts: list[_Part], files: list[str],
               notes: list[str], owned: Sequence[Any] = ()):
    self.modality = modality
    self.owned = list(owned)    # datasets the parts read from: closed after the parts
    self.what = what
    self.parts = parts
    self.files = files          # every file read (for the --out check)
    self.notes = notes          # what was done to bring it onto the grid (logged)

  @property
  def offsets(self) -> np.ndarray:
    """DN offset of every band (0 where none)."""
    return np.asarray([o for part in self.parts
                       for o in (part.offsets or (0.0,) * len(part.indexes))], np.float64)

  def close(self) -> None:
    for dataset in [d for part in self.parts for d in reversed(part.owned)] + self.owned:
      dataset.close()

  def read(self, window) -> tuple[np.ndarray, np.ndarray]:
    """(values [rows, cols, bands], marked-as-nodata bool [rows, cols, bands])."""
    values, marked = [], []
    with _rasterio_errors(self.what):
      for part in self.parts:
        block = np.moveaxis(part.dataset.read(part.indexes, window=window), 0, -1)
        values.append(block)
        marked.append(np.zeros(block.shape, bool) if part.nodata is None or math.isnan(
            part.nodata) else block == part.nodata)
    if len(values) == 1:
      return values[0], marked[0]
    dtype = np.result_type(*[v.dtype for v in values])
    return (np.concatenate([v.astype(dtype, copy=False) for v in values], -1),
            np.concatenate(marked, -1))


def _warped(src, grid: RasterInfo, resampling: str):
  from rasterio.enums import Resampling  # pylint: disable=g-import-not-at-top
  from rasterio.vrt import WarpedVRT  # pylint: disable=g-import-not-at-top
  floating = np.issubdtype(np.dtype(src.dtypes[0]), np.floating)
  nodata = src.nodata if src.nodata is not None else (np.nan if floating else 0)
  return WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width,
                   height=grid.height, resampling=Resampling[resampling], nodata=nodata)


def _describe_grid(info) -> str:
  return (f'{info.width}x{info.height} px of {abs(info.transform.a):g} x '
          f'{abs(info.transform.e):g} in {info.crs}')


def _find_band_files(folder: str) -> dict[int, list[str]]:
  found: dict[int, list[str]] = {}
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    if os.path.relpath(root, folder).count(os.sep) >= 2:   # folder, R10m/.., no deeper
      dirs[:] = []
    for name in sorted(files):
      stem, suffix = os.path.splitext(name)
      if (name.startswith('.') or suffix.lower() not in RASTER_SUFFIXES or
          stem.upper().startswith('MSK_')):          # SAFE quality masks (MSK_DETFOO_B01.jp2)
        continue
      band = s2_band_name(stem)
      if band is not None:
        found.setdefault(constants.S2_BANDS.index(band), []).append(os.path.join(root, name))
  return found


def _s2_folder_source(folder: str, subset: tuple[int, ...], allow_no_crs: bool,
                      s2_offset: str | float = 'auto') -> tuple[Source, RasterInfo]:
  found = _find_band_files(folder)
  if not found:
    raise PredictionError(f'S2 folder {folder} holds no band files (B01.tif, B1.tif, '
                          '..._B8A.jp2, .tif/.jp2/.vrt).')
  missing = [i for i in subset if i not in found]
  if missing:
    raise _missing_bands_error(f'S2 folder {folder}', missing)
  opened, chosen = [], {}
  try:
    for band in subset:
      best = None
      for path in found[band]:
        with _rasterio_errors(f'S2 band file {path}'):
          src = _open(path)
        opened.append(src)
        if src.count != 1:
          raise PredictionError(f'S2 band file {path} has {src.count} bands; a band file has 1.')
        if best is None or abs(src.transform.a) < abs(best.transform.a):
          best = src
      chosen[band] = best
    reference = min(chosen.values(), key=lambda s: abs(s.transform.a) * abs(s.transform.e))
    grid = RasterInfo(path=folder, height=reference.height, width=reference.width, count=len(
        subset), crs=reference.crs, transform=reference.transform, nodata=reference.nodata)
    _require_crs(grid, 'S2', allow_no_crs)
    parts, resampled = [], []
    for band in subset:
      src = chosen[band]
      info = RasterInfo(src.name, src.height, src.width, 1, src.crs, src.transform, src.nodata)
      offset = (_dn_offset(src.name, s2_offset),)
      if _same_grid(grid, info):
        parts.append(_Part(src, [1], src.nodata, [], offset))
        continue
      if src.crs is None or grid.crs is None:
        raise PredictionError(f'S2 band file {src.name} is not on the grid of '
                              f'{reference.name} and has no CRS to resample it by.')
      if not _overlaps(src, grid):
        raise PredictionError(f'S2 band file {src.name} does not overlap {reference.name}.')
      vrt = _warped(src, grid, S2_RESAMPLING)
      parts.append(_Part(vrt, [1], vrt.nodata, [vrt], offset))
      resampled.append(constants.S2_BANDS[band])
    notes = [f'S2 from {len(subset)} band files in {folder} on the grid of '
             f'{os.path.basename(reference.name)} ({_describe_grid(grid)})']
    if resampled:
      notes.append(f'bands {", ".join(resampled)} resampled onto it on the fly ({S2_RESAMPLING})')
    notes += _offset_note(f'S2 folder {folder}', [p.offsets[0] for p in parts], s2_offset)
    used = {id(s) for s in chosen.values()}
    for src in opened:
      if id(src) not in used:
        src.close()
    opened = [s for s in opened if id(s) in used]
    files = sorted({f for s in opened for f in s.files})
    return Source('s2', f'S2 folder {folder}', parts, files, notes, owned=opened), grid
  except BaseException:
    for src in opened:
      src.close()
    raise


def _dn_offset(path: str, s2_offset: str | float) -> float:
  """The S2 DN offset to remove: `s2_offset` when a number, else what the file declares
  (processing baseline >= 04.00 products store reflectance x 1e4 + 1000; see
  data_prep.common.s2_dn_offset for the tags that say so), 0 when it says nothing."""
  if str(s2_offset) != 'auto':
    return float(s2_offset)
  from data_prep import common  # pylint: disable=g-import-not-at-top
  try:
    return float(common.s2_dn_offset(common.read_info(path)))
  except common.BadInput as err:
    raise PredictionError(f'S2 file {path}: {err.args[-1]} (pass --s2_offset 0 or 1000 to '
                          'say which).') from None


def _offset_note(what: str, offsets: Sequence[float], s2_offset: str | float) -> list[str]:
  values = sorted(set(float(o) for o in offsets))
  if values == [0.0]:
    return []
  how = 'as declared by the file' if str(s2_offset) == 'auto' else '--s2_offset'
  return [f'{what}: DN offset {"/".join(f"{v:g}" for v in values)} removed before '
          f'normalising ({how})']


def _require_crs(info: RasterInfo, what: str, allow_no_crs: bool) -> None:
  if info.crs is None and not allow_no_crs:
    raise PredictionError(f'{what} input {info.path} has no georeferencing (no CRS): the map '
                          'could not be placed on the Earth. Georeference it, or pass '
                          '--allow_no_crs to map it in pixel coordinates.')


def _file_source(path: str, modality: str, subset: tuple[int, ...], grid: RasterInfo | None,
                 allow_no_crs: bool, s2_offset: str | float = 'auto'
                 ) -> tuple[Source, RasterInfo]:
  """A single raster (GeoTIFF, VRT, ...) as S2 or S1; on `grid` if given (else its own grid)."""
  what = modality.upper()
  info = raster_info(path, what)
  with _rasterio_errors(f'{what} file {path}'):
    src = _open(path)
  try:
    if modality == 's1':
      if info.count != len(constants.S1_BANDS):
        raise PredictionError(f'{path} has {info.count} bands; an S1 input needs 2 (VV, VH in '
                              'dB).')
      indexes = [1, 2]
    else:
      layout = _s2_file_layout(info, src.descriptions, subset)
      missing = [i for i in subset if i not in layout]
      if missing:
        raise _missing_bands_error(path, missing)
      indexes = [layout.index(i) + 1 for i in subset]
    offsets = ((_dn_offset(path, s2_offset),) * len(indexes) if modality == 's2' else ())
    notes = _offset_note(f'S2 file {path}', offsets or (0.0,), s2_offset)
    if grid is None:
      _require_crs(info, what, allow_no_crs)
      grid = info
      part = _Part(src, indexes, src.nodata, [src], offsets)
    elif _same_grid(grid, info) or (info.crs is None and grid.crs is None and allow_no_crs and (
        info.height, info.width) == (grid.height, grid.width)):
      part = _Part(src, indexes, src.nodata, [src], offsets)
    else:
      if info.crs is None or grid.crs is None:
        raise PredictionError(f'{path} is not on the grid of {grid.path} ({_describe_grid(info)} '
                              f'vs {_describe_grid(grid)}) and one of them has no CRS to '
                              'reproject by.')
      if not _overlaps(src, grid):
        raise PredictionError(f'{path} ({_describe_grid(info)}) does not overlap {grid.path} '
                              f'({_describe_grid(grid)}).')
      vrt = _warped(src, grid, S1_RESAMPLING if modality == 's1' else S2_RESAMPLING)
      part = _Part(vrt, indexes, vrt.nodata, [src, vrt], offsets)
      notes.append(f'{what} {path} is not on the grid of {grid.path} ({_describe_grid(info)} vs '
                   f'{_describe_grid(grid)}): reprojected onto it on the fly '
                   f'({S1_RESAMPLING if modality == "s1" else S2_RESAMPLING})')
    return Source(modality, f'{what} file {path}', [part], sorted(set(src.files) | {path}),
                  notes), grid
  except BaseException:
    src.close()
    raise


def open_sources(predictor: Predictor, s2_path: str | None, s1_path: str | None, *,
                 allow_no_crs: bool = False, s2_offset: str | float = 'auto'
                 ) -> tuple[dict[str, Source], RasterInfo]:
  """The model's inputs on the output grid (that of its primary input) and that grid."""
  if predictor.s2_bands is not None and not s2_path:
    raise PredictionError(f'{predictor.description} reads Sentinel-2: give --s2.')
  if predictor.uses_s1 and not s1_path:
    raise PredictionError(f'{predictor.description} reads Sentinel-1: give --s1.')
  if predictor.s2_bands is None and s2_path:
    logging.warning('%s reads S1 only; ignoring --s2 %s.', predictor.description, s2_path)
  if not predictor.uses_s1 and s1_path:
    logging.warning('%s does not read S1; ignoring --s1 %s.', predictor.description, s1_path)
  sources: dict[str, Source] = {}
  grid = None
  try:
    if predictor.s2_bands is not None:
      subset = tuple(predictor.s2_bands)
      if os.path.isdir(s2_path):
        sources['s2'], grid = _s2_folder_source(s2_path, subset, allow_no_crs, s2_offset)
      else:
        sources['s2'], grid = _file_source(s2_path, 's2', subset, None, allow_no_crs, s2_offset)
    if predictor.uses_s1:
      sources['s1'], grid = _file_source(s1_path, 's1', (), grid, allow_no_crs)
  except BaseException:
    for source in sources.values():
      source.close()
    raise
  return sources, grid


# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------
class _Normaliser:
  """Raw band values -> uint8 exactly as constants.normalise_to_uint8, and the nodata mask.

  The mask is needed for every pixel (it decides which windows are skipped), the normalised
  values only for the windows that are computed: the row cache keeps raw values and normalises
  window by window. Integer inputs of at most 16 bits go through a per-band lookup table built
  with normalise_to_uint8 itself (the same value always maps to the same byte), much faster
  than the float64 formula; other inputs use the formula.
  """

  def __init__(self, modality: str, subset: tuple[int, ...], offsets: np.ndarray | None = None,
               stats: tuple[Sequence[float], Sequence[float]] | None = None):
    self.modality = modality
    if stats is not None:
      self.mean, self.std = np.asarray(stats[0], np.float64), np.asarray(stats[1], np.float64)
    elif modality == 's1':
      self.mean, self.std = np.asarray(constants.S1_MEAN), np.asarray(constants.S1_STD)
    else:
      self.mean = np.asarray([constants.S2_MEAN[i] for i in subset])
      self.std = np.asarray([constants.S2_STD[i] for i in subset])
    self.offsets = (np.zeros(len(self.mean)) if offsets is None or not len(offsets)
                    else np.asarray(offsets, np.float64))
    self._luts: dict[np.dtype, tuple[np.ndarray, int]] = {}

  def _lut(self, dtype: np.dtype) -> tuple[np.ndarray, int]:
    if dtype not in self._luts:
      info = np.iinfo(dtype)
      values = np.arange(info.min, info.max + 1, dtype=np.float64)[:, None]
      lut, _ = constants.normalise_to_uint8(values - self.offsets, self.mean, self.std)
      self._luts[dtype] = (np.ascontiguousarray(lut.T), -int(info.min))   # [bands, values]
    return self._luts[dtype]

  def nodata(self, block: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """bool [rows, cols]: S2: all bands marked, or all 0, or any non-finite; S1: all bands
    marked or non-finite."""
    floating = np.issubdtype(block.dtype, np.floating)
    bad = np.empty(block.shape[:2], bool)
    for r0 in range(0, block.shape[0], NORMALISE_ROWS):
      rows = slice(r0, r0 + NORMALISE_ROWS)
      chunk, mark = block[rows], marked[rows]
      if self.modality == 's1':
        bad[rows] = np.all(mark | ~np.isfinite(chunk), -1) if floating else np.all(mark, -1)
      else:
        chunk_bad = np.all(mark, -1) | np.all(chunk == 0, -1)
        if floating:
          chunk_bad |= np.any(~np.isfinite(chunk), -1)
        bad[rows] = chunk_bad
    return bad

  def __call__(self, values: np.ndarray) -> np.ndarray:
    """uint8 [..., bands] of raw values [..., bands]."""
    if np.issubdtype(values.dtype, np.integer) and values.dtype.itemsize <= 2:
      lut, offset = self._lut(values.dtype)
      out = np.empty(values.shape, np.uint8)
      for band in range(values.shape[-1]):
        index = values[..., band]
        out[..., band] = lut[band][index.astype(np.int32) + offset if offset else index]
      return out
    out, _ = constants.normalise_to_uint8(values - self.offsets if self.offsets.any() else values,
                                          self.mean, self.std)
    return out


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

  def cols_touching(self, x0: int, x1: int) -> range:
    """Window columns whose output span meets scene columns [x0, x1)."""
    first = max(0, (x0 + self.margin - self.window) // self.stride + 1)
    last = min(self.cols - 1, -(-(x1 + self.margin) // self.stride) - 1)
    return range(first, last + 1)


def reflect_indices(start: int, length: int, size: int) -> np.ndarray:
  """Indices start..start+length-1 mirrored into [0, size) (numpy 'reflect': edge not repeated)."""
  idx = np.arange(start, start + length)
  if size == 1:
    return np.zeros(length, np.int64)
  period = 2 * (size - 1)
  idx = np.abs(idx) % period
  return np.where(idx >= size, period - idx, idx)


def column_blocks(width: int, block_width: int = BLOCK_WIDTH) -> list[tuple[int, int]]:
  """[x0, x1) output column ranges of at most `block_width` (a multiple of TILE) columns."""
  block_width = max(TILE, block_width // TILE * TILE)
  return [(x0, min(x0 + block_width, width)) for x0 in range(0, width, block_width)]


class _RowCache:
  """Raw input rows of one column range and the primary input's nodata mask, read as the rows
  of windows move down."""

  def __init__(self, sources: Mapping[str, Source], normalisers: Mapping[str, _Normaliser],
               primary: str, x0: int, x1: int):
    self.sources, self.normalisers, self.primary = sources, normalisers, primary
    self.x0, self.x1 = x0, x1
    self.lo = self.hi = 0
    self.raw: dict[str, np.ndarray] = {}
    self.mask = np.zeros((0, x1 - x0), bool)

  def _read(self, lo: int, hi: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from rasterio.windows import Window  # pylint: disable=g-import-not-at-top
    window = Window(self.x0, lo, self.x1 - self.x0, hi - lo)
    raw, mask = {}, None
    for modality, source in self.sources.items():
      raw[modality], marked = source.read(window)
      if modality == self.primary:
        mask = self.normalisers[modality].nodata(raw[modality], marked)
    return raw, mask

  def rows(self, lo: int, hi: int) -> None:
    """Holds exactly rows [lo, hi) afterwards, reading only those not held yet."""
    if self.raw and self.lo <= lo <= self.hi <= hi:
      keep = slice(lo - self.lo, None)
      new, mask = self._read(self.hi, hi) if hi > self.hi else ({}, None)
      self.raw = {k: np.concatenate([v[keep], new[k]]) if new else v[keep]
                  for k, v in self.raw.items()}
      self.mask = np.concatenate([self.mask[keep], mask]) if new else self.mask[keep]
    else:
      self.raw, self.mask = self._read(lo, hi)
    self.lo, self.hi = lo, hi

  def window(self, ys: np.ndarray, xs: np.ndarray) -> dict[str, np.ndarray] | None:
    """The normalised inputs at rows ys, columns xs (scene indices), or None when the primary
    input is nodata at all of them. Reflected indices step by +-1, so they cover exactly the
    range [min, max]: the nodata test is a slice."""
    y0, y1 = int(ys.min()) - self.lo, int(ys.max()) + 1 - self.lo
    x0, x1 = int(xs.min()) - self.x0, int(xs.max()) + 1 - self.x0
    if self.mask[y0:y1, x0:x1].all():
      return None
    index = (ys[:, None] - self.lo, xs[None, :] - self.x0)
    return {k: self.normalisers[k](v[index]) for k, v in self.raw.items()}


def blended_blocks(predictor: Predictor, sources: Mapping[str, Source], height: int, width: int,
                   grid: WindowGrid, batch: int, *, block_width: int = BLOCK_WIDTH,
                   progress: Callable[[int], None] | None = None,
                   stats: dict[str, int] | None = None
                   ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
  """Yields (first row, first column, probabilities [rows, cols, C], nodata [rows, cols]).

  Column block by column block, and within a block top to bottom, covering the scene once. Per
  pixel, the contributions of its windows are summed in row-major window order, as in one
  whole-scene pass; windows whose input is all nodata are skipped and counted in
  stats['skipped'] (stats['computed'] counts the others).
  """
  stats = stats if stats is not None else {}
  stats.setdefault('computed', 0)
  stats.setdefault('skipped', 0)
  normalisers = {m: _Normaliser(m, tuple(predictor.s2_bands or ()), source.offsets,
                                predictor.normalisation.get(m))
                 for m, source in sources.items()}
  w1 = taper(grid.window, grid.window - grid.stride)
  weights = np.outer(w1, w1)
  for x0, x1 in column_blocks(width, block_width):
    cols = grid.cols_touching(x0, x1)
    xs = {c: reflect_indices(c * grid.stride - grid.margin, grid.window, width) for c in cols}
    rx0 = min(int(v.min()) for v in xs.values())
    rx1 = max(int(v.max()) for v in xs.values()) + 1
    cache = _RowCache(sources, normalisers, predictor.primary, rx0, rx1)
    p0 = cols[0] * grid.stride                     # padded column of the accumulator's column 0
    local_width = (cols[-1] - cols[0]) * grid.stride + grid.window
    out_cols = slice(x0 + grid.margin - p0, x1 + grid.margin - p0)
    masks: dict[int, np.ndarray] = {}  # per row of windows: the nodata of the rows it emits

    def strip_rows(row: int) -> tuple[int, int]:
      done = grid.stride if row < grid.rows - 1 else grid.window
      y0 = row * grid.stride - grid.margin
      return max(y0, 0), min(y0 + done, height)

    def windows() -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
      for row in range(grid.rows):
        ys = reflect_indices(row * grid.stride - grid.margin, grid.window, height)
        cache.rows(int(ys.min()), int(ys.max()) + 1)
        first, last = strip_rows(row)
        masks[row] = cache.mask[first - cache.lo:last - cache.lo, x0 - rx0:x1 - rx0].copy()
        for c in cols:
          inputs = cache.window(ys, xs[c])
          if inputs is None:
            stats['skipped'] += 1
            if progress is not None:
              progress(1)
            continue
          yield row, c, inputs

    def predicted() -> Iterator[tuple[int, int, np.ndarray]]:
      """(row, col, probabilities) in window order; one batch in flight while the next forms."""
      pending: list[tuple[list[tuple[int, int]], Any]] = []

      def dispatch(chunk):
        stacked = {k: np.stack([w[k] for _, _, w in chunk]) for k in chunk[0][2]}
        if len(chunk) < batch:    # fixed batch shape: one compilation for the whole scene
          stacked = {k: np.concatenate([v, np.zeros((batch - len(chunk),) + v.shape[1:],
                                                    v.dtype)]) for k, v in stacked.items()}
        pending.append(([(r, c) for r, c, _ in chunk], predictor.probs_fn(stacked)))

      def drain(keep: int):
        while len(pending) > keep:
          keys, probs = pending.pop(0)
          probs = np.asarray(probs, np.float32)
          stats['computed'] += len(keys)
          if progress is not None:
            progress(len(keys))
          for i, (r, c) in enumerate(keys):
            yield r, c, probs[i]

      chunk = []
      for item in windows():
        chunk.append(item)
        if len(chunk) == batch:
          dispatch(chunk)
          chunk = []
          yield from drain(keep=1)
      if chunk:
        dispatch(chunk)
      yield from drain(keep=0)

    acc = None
    norm = np.zeros((grid.window, local_width), np.float32)
    row = 0

    def emit(row: int):
      nonlocal acc, norm
      first, last = strip_rows(row)
      y0 = row * grid.stride - grid.margin
      done = grid.stride if row < grid.rows - 1 else grid.window
      mask = masks.pop(row)
      if last > first:
        if mask.all():                             # nothing to compute: all nodata
          yield first, x0, None, mask
        else:
          strip = slice(first - y0, last - y0)
          num, den = acc[strip, out_cols], norm[strip, out_cols, None]
          yield first, x0, np.divide(num, den, out=np.zeros_like(num), where=den > 0), mask
      acc[:-done], norm[:-done] = acc[done:], norm[done:]    # shift up (copies: no aliasing)
      acc[-done:], norm[-done:] = 0, 0

    for r, c, probs in predicted():
      if acc is None:
        acc = np.zeros((grid.window, local_width, probs.shape[-1]), np.float32)
      while row < r:
        yield from emit(row)
        row += 1
      xl = c * grid.stride - p0
      acc[:, xl:xl + grid.window] += probs * weights[..., None]
      norm[:, xl:xl + grid.window] += weights
    if acc is None:                                # the whole block is nodata
      acc = np.zeros((grid.window, local_width, len(predictor.class_names)), np.float32)
    while row < grid.rows:
      yield from emit(row)
      row += 1


# ----------------------------------------------------------------------------------------------
# Output: COG, legend
# ----------------------------------------------------------------------------------------------
def palette(num_classes: int) -> list[tuple[int, int, int]]:
  return [tuple(constants.DW_PALETTE[i % len(constants.DW_PALETTE)]) for i in range(num_classes)]


def legend_paths(out_path: str) -> dict[str, str]:
  """The files written beside the map."""
  return {'qml': os.path.splitext(out_path)[0] + '.qml', 'aux_xml': out_path + '.aux.xml'}


def qgis_style(class_names: Sequence[str]) -> str:
  """A QGIS layer style (.qml): paletted renderer of band 1, class names as labels, 255 nodata."""
  entries = '\n'.join(
      f'        <paletteEntry value="{i}" color="#{r:02x}{g:02x}{b:02x}" alpha="255" '
      f'label={quoteattr(name)}/>'
      for i, (name, (r, g, b)) in enumerate(zip(class_names, palette(len(class_names)))))
  return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.28.0" styleCategories="AllStyleCategories" hasScaleBasedVisibilityFlag="0" minScale="1e+08" maxScale="0">
  <pipe>
    <provider>
      <resampling enabled="false" maxOversampling="2" zoomedInResamplingMethod="nearestNeighbour" zoomedOutResamplingMethod="nearestNeighbour"/>
    </provider>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency>
        <singleValuePixelList>
          <pixelListEntry min="{NODATA}" max="{NODATA}" percentTransparent="100"/>
        </singleValuePixelList>
      </rasterTransparency>
      <minMaxOrigin>
        <limits>None</limits>
        <extent>WholeRaster</extent>
        <statAccuracy>Estimated</statAccuracy>
        <cumulativeCutLower>0.02</cumulativeCutLower>
        <cumulativeCutUpper>0.98</cumulativeCutUpper>
        <stdDevFactor>2</stdDevFactor>
      </minMaxOrigin>
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" colorizeOn="0" colorizeRed="255" colorizeGreen="128" colorizeBlue="128" colorizeStrength="100" invertColors="0"/>
    <rasterresampler maxOversampling="2"/>
    <resamplingStage>resamplingFilter</resamplingStage>
  </pipe>
  <noData>
    <noDataList bandNo="1" useSrcNoData="1">
      <noDataRange min="{NODATA}" max="{NODATA}"/>
    </noDataList>
  </noData>
  <blendMode>0</blendMode>
</qgis>
"""


def gdal_pam(class_names: Sequence[str], counts: Sequence[int], qml_name: str) -> str:
  """GDAL's sidecar (.aux.xml) of band 1: category names, a thematic raster attribute table,
  and (metadata domain LEGEND) the name of the QGIS style beside the map."""
  categories = '\n'.join(f'      <Category>{escape(n)}</Category>' for n in class_names)
  fields = [('Value', 0, 5), ('Class', 2, 2), ('Red', 0, 6), ('Green', 0, 7), ('Blue', 0, 8),
            ('Count', 0, 1)]   # (name, GDALRATFieldType, GDALRATFieldUsage)
  defs = '\n'.join(f'      <FieldDefn index="{i}">\n        <Name>{n}</Name>\n'
                   f'        <Type>{t}</Type>\n        <Usage>{u}</Usage>\n      </FieldDefn>'
                   for i, (n, t, u) in enumerate(fields))
  rows = '\n'.join(
      f'      <Row index="{i}">\n        <F>{i}</F>\n        <F>{escape(name)}</F>\n'
      f'        <F>{r}</F>\n        <F>{g}</F>\n        <F>{b}</F>\n        <F>{int(n)}</F>\n'
      '      </Row>'
      for i, (name, (r, g, b), n) in enumerate(zip(class_names, palette(len(class_names)),
                                                    counts)))
  return f"""<PAMDataset>
  <PAMRasterBand band="1">
    <Metadata domain="LEGEND">
      <MDI key="qml">{escape(qml_name)}</MDI>
    </Metadata>
    <CategoryNames>
{categories}
    </CategoryNames>
    <GDALRasterAttributeTable tableType="thematic">
{defs}
{rows}
    </GDALRasterAttributeTable>
  </PAMRasterBand>
</PAMDataset>
"""


def _input_files(sources: Mapping[str, Source], paths: Sequence[str | None]) -> list[str]:
  files = [p for p in paths if p]
  for source in sources.values():
    files.extend(source.files)
  return files


def check_output(out_path: str, inputs: Sequence[str]) -> None:
  """Refuses an output (or a legend file beside it) that is one of the inputs, or a folder."""
  if not out_path:
    raise PredictionError('--out is required.')
  if os.path.isdir(out_path):
    raise PredictionError(f'--out {out_path} is a folder; give the map\'s file name.')
  real_inputs = {os.path.realpath(p) for p in inputs if p}
  existing = [p for p in inputs if p and os.path.exists(p)]
  for target in (out_path, *legend_paths(out_path).values()):
    same = os.path.realpath(target) in real_inputs
    if not same and os.path.exists(target):
      same = any(os.path.samefile(target, p) for p in existing)
    if same:
      raise PredictionError(f'--out {out_path} would overwrite the input {target}; write the map '
                            'to another file.')
  folder = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(folder, exist_ok=True)
  if not os.access(folder, os.W_OK):
    raise PredictionError(f'--out {out_path}: cannot write in {folder}.')


class _MapWriter:
  """Class (and confidence) bands written block by block into a tiled GTiff, then a COG."""

  def __init__(self, path: str, grid: RasterInfo, class_names: Sequence[str], confidence: bool):
    import rasterio  # pylint: disable=g-import-not-at-top
    self.path, self.confidence = path, confidence
    self.num_classes = len(class_names)
    self.counts = np.zeros(self.num_classes, np.int64)
    profile = dict(driver='GTiff', height=grid.height, width=grid.width,
                   count=2 if confidence else 1, dtype='uint8', crs=grid.crs,
                   transform=grid.transform, nodata=NODATA, tiled=True, blockxsize=TILE,
                   blockysize=TILE, compress='deflate', zlevel=1, bigtiff='if_safer')
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
      self.dst = rasterio.open(path, 'w', **profile)

  def write(self, first: int, x0: int, probs: np.ndarray | None, invalid: np.ndarray) -> None:
    """probs [rows, cols, C] (None: all nodata), invalid [rows, cols]."""
    from rasterio.windows import Window  # pylint: disable=g-import-not-at-top
    window = Window(x0, first, invalid.shape[1], invalid.shape[0])
    if probs is None:
      blank = np.full(invalid.shape, NODATA, np.uint8)
      for band in range(1, self.dst.count + 1):
        self.dst.write(blank, band, window=window)
      return
    classes = np.argmax(probs, axis=-1).astype(np.uint8)
    classes[invalid] = NODATA
    self.counts += np.bincount(classes[~invalid].ravel(),
                               minlength=self.num_classes)[:self.num_classes]
    self.dst.write(classes, 1, window=window)
    if self.confidence:
      conf = np.minimum(np.rint(np.max(probs, axis=-1) * 255.0), NODATA - 1).astype(np.uint8)
      conf[invalid] = NODATA
      self.dst.write(conf, 2, window=window)

  def finish(self, class_names: Sequence[str], description: str) -> None:
    colours = {i: c + (255,) for i, c in enumerate(palette(self.num_classes))}
    colours[NODATA] = (0, 0, 0, 0)
    self.dst.write_colormap(1, colours)
    self.dst.set_band_description(1, 'class')
    if self.confidence:
      self.dst.set_band_description(2, 'confidence: round(max probability x 255), max 254')
    self.dst.update_tags(classes=json.dumps(list(class_names)), model=description)
    self.dst.update_tags(1, **{str(i): name for i, name in enumerate(class_names)})
    self.dst.close()

  def close(self) -> None:
    if not self.dst.closed:
      self.dst.close()


def write_cog(src_path: str, dst_path: str) -> None:
  """GDAL's COG driver: 512 px tiles, DEFLATE, nearest-neighbour overviews down to one tile."""
  import rasterio.shutil  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():      # --allow_no_crs maps: not georeferenced, as asked
    warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
    rasterio.shutil.copy(src_path, dst_path, driver='COG', COMPRESS='DEFLATE', BLOCKSIZE=TILE,
                         OVERVIEWS='AUTO', RESAMPLING='NEAREST', OVERVIEW_RESAMPLING='NEAREST',
                         BIGTIFF='IF_SAFER', NUM_THREADS='ALL_CPUS')


def _temporary(path: str, tag: str) -> str:
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{tag}.tmp')


def predict_scene(predictor: Predictor, out_path: str, *, s2_path: str | None = None,
                  s1_path: str | None = None, window: int = 256, overlap: int = 64,
                  batch: int = 16, confidence: bool = False, progress: bool = True,
                  allow_no_crs: bool = False, s2_offset: str | float = 'auto',
                  block_width: int = BLOCK_WIDTH) -> dict[str, object]:
  """Classifies a whole scene, streaming, and writes the COG and its legend; returns a summary."""
  check_arguments(window, overlap, batch, s2_offset)
  check_output(out_path, [s2_path, s1_path])
  import rasterio  # pylint: disable=g-import-not-at-top
  with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
    sources, grid = open_sources(predictor, s2_path, s1_path, allow_no_crs=allow_no_crs,
                                 s2_offset=s2_offset)
    try:
      check_output(out_path, _input_files(sources, [s2_path, s1_path]))
      return _stream(predictor, sources, grid, out_path, window=window, overlap=overlap,
                     batch=batch, confidence=confidence, progress=progress,
                     block_width=block_width)
    finally:
      for source in sources.values():
        source.close()


def check_arguments(window: int, overlap: int, batch: int, s2_offset: str | float = 'auto'
                    ) -> None:
  if window < 32 or window % 32:
    raise PredictionError(f'--window={window} must be a positive multiple of 32 (the encoder '
                          'downsamples 5 times).')
  if not 0 <= overlap < window:
    raise PredictionError(f'--overlap={overlap} must be in [0, --window={window}).')
  if batch < 1:
    raise PredictionError(f'--batch={batch} must be >= 1.')
  if str(s2_offset) != 'auto':
    try:
      ok = math.isfinite(float(s2_offset))
    except ValueError:
      ok = False
    if not ok:
      raise PredictionError(f'--s2_offset={s2_offset} must be auto or a number of DN (0, 1000).')


def _stream(predictor: Predictor, sources: Mapping[str, Source], grid: RasterInfo,
            out_path: str, *, window: int, overlap: int, batch: int, confidence: bool,
            progress: bool, block_width: int) -> dict[str, object]:
  windows = WindowGrid.create(grid.height, grid.width, window, overlap)
  total = windows.rows * sum(len(windows.cols_touching(a, b))
                             for a, b in column_blocks(grid.width, block_width))
  for source in sources.values():
    for note in source.notes:
      logging.info('%s.', note)
  logging.info('%s: %dx%d px, %d windows of %d px (overlap %d) in %d column block(s) with %s.',
               grid.path, grid.height, grid.width, total, window, overlap,
               len(column_blocks(grid.width, block_width)), predictor.description)
  out_path = os.path.abspath(out_path)
  tiled, cog = _temporary(out_path, 'tiled'), _temporary(out_path, 'cog')
  stats: dict[str, int] = {}
  nodata_pixels = 0
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  try:
    writer = _MapWriter(tiled, grid, predictor.class_names, confidence)
    try:
      with tqdm(total=total, unit='window', disable=not progress, file=sys.stderr) as bar:
        for first, x0, probs, invalid in blended_blocks(
            predictor, sources, grid.height, grid.width, windows, batch,
            block_width=block_width, progress=bar.update, stats=stats):
          writer.write(first, x0, probs, invalid)
          nodata_pixels += int(invalid.sum())
      writer.finish(predictor.class_names, predictor.description)
    finally:
      writer.close()
    write_cog(tiled, cog)
    counts = [int(c) for c in writer.counts]
    sidecars = legend_paths(out_path)
    utils.write_text(sidecars['qml'], qgis_style(predictor.class_names))
    utils.write_text(sidecars['aux_xml'], gdal_pam(predictor.class_names, counts,
                                                  os.path.basename(sidecars['qml'])))
    os.replace(cog, out_path)
  finally:
    for tmp in (tiled, cog):
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
  logging.info('%s: %d windows computed, %d skipped (input all nodata); legend %s.', out_path,
               stats['computed'], stats['skipped'], sidecars['qml'])
  return {'out': out_path, 'legend': sidecars['qml'], 'height': grid.height,
          'width': grid.width, 'windows': total, 'windows_computed': stats['computed'],
          'windows_skipped': stats['skipped'], 'nodata_pixels': nodata_pixels,
          'pixels_per_class': dict(zip(predictor.class_names, counts))}
