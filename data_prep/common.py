"""Shared machinery of the GeoTIFF -> TFDS converters (`ssl4eo`, `dfc2020`, `ssl4eo_dwosm`).

A converter only says how ONE item (a location, a patch) becomes its records; this module does
the rest: raster reads with the checks that keep bad files out, a deterministic shard plan,
parallel shard writing, resume after an interruption, and the TFDS metadata at the end.

An item gives one or more records (`Converter.records`: ssl4eo writes one per (location,
season)), written consecutively in item order. The shard format is the converter's
`file_format`: `tfrecord` (read with `as_dataset`; the downstream sets) or `array_record`
(random access with `as_data_source`, which `as_dataset` cannot read: the pretraining set, whose
loader reads single records at random). ArrayRecord shards are written with
`group_size:1,uncompressed`: one record per chunk is what makes a random read O(1), and
uncompressed records read 2-3x faster than zstd/snappy ones (measured).

Output directory DIR, loadable with `tfds.builder_from_directory(DIR)` once complete:

  DIR/<name>-<split>.<format>-<i:05d>-of-<n:05d>  shards, TFDS file naming (<format>: tfrecord
                                                  or array_record)
  DIR/dataset_info.json, DIR/features.json        TFDS metadata, written LAST (their presence
                                                  means every shard is there); shard lengths
                                                  count records
  DIR/conversion_summary.json                     counts per split: converted (items),
                                                  records, skipped, ...
  DIR/rejects.csv                                 `location,file,reason` per skipped item
  DIR/.conversion_state/plan.json                 arguments, file format + shard plan,
                                                  checked on resume
  DIR/.conversion_state/outputs.json              every file name above, recorded BEFORE it
                                                  is written: the only files ever deleted
  DIR/.conversion_state/<split>-<i:05d>.json      done-marker of one finished shard
  DIR/.conversion_state/<split>-<i:05d>.inputs.json.gz  size + mtime of every file (or folder)
                                                  the shard's items read, absent ones included

A shard is written under a temporary name and `os.replace`d; its marker is written (atomically)
only afterwards, so a shard counts as done only when both are there and agree in size. Re-running
the same command skips done shards, except those whose recorded inputs changed (size or mtime,
or a missing file that appeared): these are rebuilt, so fixing a rejected input and re-running
converts it. Different arguments, or another shard format than the earlier conversion's (e.g.
TFRecord shards of ssl4eo from before it wrote array_record), are refused unless `--overwrite`,
which deletes only the files the earlier conversion recorded; names this conversion would write
that exist unrecorded (e.g. another dataset's dataset_info.json) are refused even with
`--overwrite`.

Workers are processes (spawn) with one pipe each. A worker that dies (kill -9, the OOM killer) is
noticed at once: its shard is rebuilt on a fresh worker up to `--max-retries` times, then given
up; the run finishes the other shards and exits with `error: ...` naming the shard (a rerun
retries only what is missing). Workers dying before they are ready stop the run after 3 in a row.

Rejected items never stop a run (unless `--strict`): the reason is a `kind: detail` string,
e.g. `size_mismatch: 100x100 px, expected 264x264`. Paths are reported as UTF-8: bytes of a
file name that are not UTF-8 appear as `\\xNN` (e.g. `caf\\xe9`) in rejects.csv and messages.

Errors a user can fix (bad arguments, an --out that cannot be created, a non-UTF-8 manifest,
`--strict` on a bad input, every item rejected) are `ConversionError`, a
`cromss_jax.cli.UserError`: `python -m data_prep.<converter>` prints one line `error: ...` and
exits with status 1 (`main(argv)` raises `SystemExit('error: ...')` instead).
"""
from __future__ import annotations

import abc
import argparse
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np

from cromss_jax import cli
from cromss_jax import utils

STATE_DIR = '.conversion_state'
SUMMARY_FILE = 'conversion_summary.json'
REJECTS_FILE = 'rejects.csv'
METADATA_FILES = ('dataset_info.json', 'features.json')
FILENAME_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
PLAN_FORMAT_VERSION = 1
FILE_FORMATS = ('tfrecord', 'array_record')
# The plan of a conversion made before plans recorded a file format wrote TFRecord shards.
LEGACY_FILE_FORMAT = 'tfrecord'
# One record per chunk (O(1) random reads), no compression (2-3x faster reads than zstd/snappy).
ARRAY_RECORD_OPTIONS = 'group_size:1,uncompressed'


class BadInput(Exception):
  """A raw input that cannot become a record; names the file and the problem."""

  def __init__(self, path: str, reason: str):
    super().__init__(path, reason)  # Keeps the exception picklable across processes.
    self.path = str(path)
    self.reason = reason

  def __str__(self) -> str:
    return f'{self.path}: {self.reason}'


class ConversionError(cli.UserError, RuntimeError):
  """The run cannot start or finish as asked (bad arguments, foreign output directory)."""


class ExistingOutputError(ConversionError):
  """--out holds files this conversion cannot resume from. `problem` says what they are and
  `advice` what the user of the converter can do, so that a tool running the converter for the
  user (the demo) can give its own advice instead."""

  def __init__(self, problem: str, advice: str):
    super().__init__(f'{problem}: {advice}')
    self.problem, self.advice = problem, advice


# ---------------------------------------------------------------------------------------------
# Raster reads and checks.


@dataclasses.dataclass(frozen=True)
class RasterInfo:
  """Georeferencing of one file, kept to compare grids after reading."""
  path: str
  crs: Any  # rasterio.crs.CRS or None
  bounds: tuple[float, float, float, float]
  transform: tuple[float, float, float, float, float, float]
  shape: tuple[int, int]
  count: int
  nodata: float | None
  dtype: str = ''
  # Dataset- and band-1-level GDAL metadata (e.g. PROCESSING_BASELINE), and band 1's GDAL
  # scale/offset: what says whether an S2 product carries the +1000 DN offset.
  tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
  scale: float = 1.0
  offset: float = 0.0

  @property
  def pixel_size(self) -> tuple[float, float]:
    """(x, y) size of one pixel in CRS units (positive)."""
    return abs(self.transform[0]), abs(self.transform[4])


def _info_of(src: Any, path: str) -> RasterInfo:
  tags = dict(src.tags())
  if src.count:
    tags.update(src.tags(1))
  scales, offsets = tuple(src.scales or (1.0,)), tuple(src.offsets or (0.0,))
  return RasterInfo(path=str(path), crs=src.crs, bounds=tuple(src.bounds),
                    transform=tuple(src.transform)[:6], shape=(src.height, src.width),
                    count=src.count, nodata=src.nodata,
                    dtype=str(src.dtypes[0]) if src.count else '', tags=tags,
                    scale=float(scales[0] if scales[0] is not None else 1.0),
                    offset=float(offsets[0] if offsets[0] is not None else 0.0))


def _unreadable(path: str, err: Exception) -> BadInput:
  cause = f' ({err.__cause__})' if err.__cause__ else ''  # GDAL's own message, if chained.
  return BadInput(path, f'unreadable: {type(err).__name__}: {err}{cause}')


def read_info(path: str) -> RasterInfo:
  """The georeferencing and metadata of a file, without reading its pixels."""
  import rasterio  # pylint: disable=g-import-not-at-top

  note_input(path)  # For the rerun check of data_prep.common (changed inputs).
  if not os.path.isfile(path):
    raise BadInput(path, 'missing_file: file does not exist')
  try:
    with rasterio.open(path) as src:
      return _info_of(src, path)
  except Exception as err:  # pylint: disable=broad-except
    raise _unreadable(path, err) from None


def read_raster(path: str, *, count: int, native_shape: tuple[int, int] | None = None,
                out_shape: tuple[int, int] | None = None,
                resampling: str = 'nearest') -> tuple[np.ndarray, RasterInfo]:
  """Reads all bands as [count, H, W], resampled to `out_shape` by GDAL when given.

  Band count and native size (when given) are checked before the (possibly expensive) read.
  Any failure to open or decode the file (truncated, not a GeoTIFF) becomes BadInput naming
  the file.
  """
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.enums import Resampling  # pylint: disable=g-import-not-at-top

  note_input(path)  # For the rerun check of data_prep.common (changed inputs).
  if not os.path.isfile(path):
    raise BadInput(path, 'missing_file: file does not exist')
  try:
    with rasterio.open(path) as src:
      info = _info_of(src, path)
      if info.count != count:
        raise BadInput(path, f'band_count: {info.count} bands, expected {count}')
      if native_shape is not None and info.shape != tuple(native_shape):
        raise BadInput(path, f'size_mismatch: {info.shape[0]}x{info.shape[1]} px, expected '
                       f'{native_shape[0]}x{native_shape[1]}')
      if out_shape is None or tuple(out_shape) == info.shape:
        data = src.read()
      else:
        data = src.read(out_shape=(count, *out_shape), resampling=Resampling[resampling])
  except BadInput:
    raise
  except Exception as err:  # pylint: disable=broad-except
    raise _unreadable(path, err) from None
  return data, info


def _units(info: RasterInfo) -> str:
  """Name of the CRS unit, for messages ('m', 'degree', ...)."""
  crs = info.crs
  if crs is None:
    return 'CRS units'
  if crs.is_geographic:
    return 'degree'
  unit = (crs.linear_units or '').lower()
  return {'metre': 'm', 'meter': 'm', 'metres': 'm', 'meters': 'm'}.get(unit, unit or 'units')


def _num(x: float) -> str:
  """A CRS distance with enough significant digits for degrees as for metres."""
  return f'{x:.6g}'


def describe_grid(info: RasterInfo) -> str:
  """e.g. '132x132 px of 20 m' or '120x120 px of 8.98e-05 degree'."""
  xres, yres = info.pixel_size
  res = _num(xres) if math.isclose(xres, yres, rel_tol=1e-6) else f'{_num(xres)}x{_num(yres)}'
  return f'{info.shape[0]}x{info.shape[1]} px of {res} {_units(info)}'


def _check_crs(info: RasterInfo, ref: RasterInfo, what: str, ref_what: str) -> None:
  if info.crs is None:
    raise BadInput(info.path, f'no_crs: {what} has no CRS, alignment cannot be checked')
  if info.crs != ref.crs:
    raise BadInput(info.path, f'crs_mismatch: {what} is in {info.crs.to_string()} but '
                   f'{ref_what} ({ref.path}) in {ref.crs.to_string()}')


def grid_offset(info: RasterInfo, ref: RasterInfo) -> tuple[float, float]:
  """Largest bounds difference to `ref`: (in ref pixels, in CRS units)."""
  xres, yres = ref.pixel_size
  diffs = np.subtract(info.bounds, ref.bounds)
  in_px = max(abs(diffs[0]) / xres, abs(diffs[2]) / xres, abs(diffs[1]) / yres,
              abs(diffs[3]) / yres)
  return float(in_px), float(np.max(np.abs(diffs)))


def check_same_grid(info: RasterInfo, ref: RasterInfo, tolerance_px: float,
                    what: str | None = None, ref_what: str | None = None) -> None:
  """Same CRS and bounds within `tolerance_px` pixels of `ref` (the 10 m reference grid)."""
  what = what or os.path.basename(info.path)
  ref_what = ref_what or os.path.basename(ref.path)
  _check_crs(info, ref, what, ref_what)
  in_px, in_units = grid_offset(info, ref)
  if in_px > tolerance_px:
    raise BadInput(info.path, f'bounds_mismatch: {what} bounds differ from {ref_what} '
                   f'({ref.path}) by {in_px:.2f} px = {_num(in_units)} {_units(ref)} '
                   f'(tolerance {tolerance_px:g} px = '
                   f'{_num(tolerance_px * ref.pixel_size[0])} {_units(ref)})')


def grids_agree(a: RasterInfo, b: RasterInfo, tolerance_px: float) -> bool:
  """Non-raising form of check_same_grid, for counting rather than rejecting."""
  try:
    check_same_grid(a, b, tolerance_px)
  except BadInput:
    return False
  return True


SAME_EXTENT_PX = 1e-3  # Bounds closer than this (in reference pixels) count as identical.


@dataclasses.dataclass(frozen=True)
class Alignment:
  """How a file relates to the reference grid (see `check_alignment`)."""
  offset_px: float      # misregistration beyond what its pixel size explains, in ref pixels
  on_grid: bool         # same shape and bounds (within tolerance): read as stored
  same_extent: bool     # on the grid, or the same bounds: a plain resize is georeferenced
  shifted: bool         # offset beyond tolerance but allowed (max_offset_px): counted


def check_alignment(info: RasterInfo, ref: RasterInfo, *, what: str, ref_what: str,
                    tolerance_px: float, max_offset_px: float | None = None) -> Alignment:
  """Checks that `info` covers the reference grid and says how to bring it onto it.

  A coarser band may be offset by up to half of its own pixel minus half a reference pixel
  (e.g. SSL4EO-S12's 20/60 m grids, whose first pixel is centred on the first 10 m pixel, are
  shifted by 0.5/2.5 px of 10 m): that is the grid convention, not a misregistration. Beyond it,
  up to `tolerance_px` is accepted silently and up to `max_offset_px` (S1 vs S2) is accepted
  as `shifted`; more is `bounds_mismatch`. A covered extent of a different size is
  `size_mismatch`, with both sizes in pixels.
  """
  _check_crs(info, ref, what, ref_what)
  rx, ry = ref.pixel_size
  fx, fy = info.pixel_size
  width = (info.bounds[2] - info.bounds[0], info.bounds[3] - info.bounds[1])
  ref_width = (ref.bounds[2] - ref.bounds[0], ref.bounds[3] - ref.bounds[1])
  size_px = max(abs(width[0] - ref_width[0]) / rx, abs(width[1] - ref_width[1]) / ry)
  if size_px > 2 * tolerance_px:
    raise BadInput(info.path, f'size_mismatch: {what} is {describe_grid(info)} '
                   f'({_num(width[0])} x {_num(width[1])} {_units(info)}) but {ref_what} is '
                   f'{describe_grid(ref)} ({_num(ref_width[0])} x {_num(ref_width[1])} '
                   f'{_units(ref)})')
  in_px, in_units = grid_offset(info, ref)
  convention = max(0.0, (fx / rx - 1) / 2, (fy / ry - 1) / 2)
  offset = max(0.0, in_px - convention)
  allowed = tolerance_px if max_offset_px is None else max(tolerance_px, max_offset_px)
  if offset > allowed + 1e-9:
    raise BadInput(info.path, f'bounds_mismatch: {what} ({describe_grid(info)}) is offset from '
                   f'{ref_what} ({ref.path}) by {in_px:.2f} px = {_num(in_units)} '
                   f'{_units(ref)} (allowed {allowed + convention:g} px = '
                   f'{_num((allowed + convention) * rx)} {_units(ref)})')
  # A plain resize equals resampling by georeferencing only when the extents coincide.
  same_extent = in_px <= SAME_EXTENT_PX
  on_grid = info.shape == ref.shape and in_px <= tolerance_px + 1e-9
  return Alignment(offset_px=offset, on_grid=on_grid, same_extent=same_extent or on_grid,
                   shifted=offset > tolerance_px + 1e-9)


def warp_to_grid(data: np.ndarray, info: RasterInfo, ref: RasterInfo, resampling: str,
                 pad: int = 2) -> np.ndarray:
  """[count, h, w] in `info`'s grid -> [count, H, W] on `ref`'s grid by georeferencing.

  GDAL's warper (rasterio.warp.reproject) maps each reference pixel centre into the source
  grid. The source is first extended by `pad` edge pixels, so that reference pixels beyond the
  outermost source pixel centres (a shifted coarse grid) take the edge value instead of
  none. Float input stays float32 (no rounding before normalisation); others keep their dtype.
  """
  from affine import Affine  # pylint: disable=g-import-not-at-top
  from rasterio.enums import Resampling  # pylint: disable=g-import-not-at-top
  from rasterio.warp import reproject  # pylint: disable=g-import-not-at-top

  work = data.astype(np.float32) if resampling != 'nearest' else data
  padded = np.pad(work, ((0, 0), (pad, pad), (pad, pad)), mode='edge')
  src_transform = Affine(*info.transform) @ Affine.translation(-pad, -pad)
  out = np.zeros((data.shape[0], *ref.shape), padded.dtype)
  reproject(padded, out, src_transform=src_transform, src_crs=info.crs,
            dst_transform=Affine(*ref.transform), dst_crs=ref.crs,
            resampling=Resampling[resampling], src_nodata=None, dst_nodata=None)
  return out


def read_onto_grid(path: str, ref: RasterInfo, *, what: str, ref_what: str, resampling: str,
                   tolerance_px: float, max_offset_px: float | None = None,
                   info: RasterInfo | None = None) -> tuple[np.ndarray, RasterInfo, Alignment]:
  """One single-band file as [H, W] on the reference grid, resampled by its georeferencing.

  On the grid: read as stored. Same extent, other pixel size: GDAL's resampling read
  (`out_shape`, pixel centres aligned, in the file's dtype). Otherwise (a shifted grid): warped
  onto the reference pixel centres (`warp_to_grid`).
  """
  info = info or read_info(path)
  if info.count != 1:
    raise BadInput(path, f'band_count: {what} has {info.count} bands, expected 1')
  alignment = check_alignment(info, ref, what=what, ref_what=ref_what,
                              tolerance_px=tolerance_px, max_offset_px=max_offset_px)
  if alignment.on_grid:
    data, info = read_raster(path, count=1)
  elif alignment.same_extent:
    data, info = read_raster(path, count=1, out_shape=ref.shape, resampling=resampling)
  else:
    data, info = read_raster(path, count=1)
    data = warp_to_grid(data, info, ref, resampling)
  return data[0], info, alignment


_BASELINE_RE = re.compile(r'(\d{1,2})\.(\d{2})|N(\d{2})(\d{2})')


def s2_dn_offset(info: RasterInfo) -> float:
  """The DN offset an S2 band file declares (1000 for processing baseline >= 04.00), else 0.

  Looked up, in this order, in: a `*ADD_OFFSET` tag (e.g. BOA_ADD_OFFSET=-1000), GDAL's band
  scale/offset (reflectance = DN * scale + offset), a PROCESSING_BASELINE tag ('04.00', 'N0400').
  """
  from cromss_jax import constants  # pylint: disable=g-import-not-at-top

  tags = {k.upper(): v for k, v in info.tags.items()}
  for key, value in sorted(tags.items()):
    if key.endswith('ADD_OFFSET'):
      try:
        return -float(value)
      except ValueError:
        raise BadInput(info.path, f'bad_metadata: {key}={value!r} is not a number') from None
  if info.offset and info.scale:
    return -info.offset / info.scale
  baseline = tags.get('PROCESSING_BASELINE')
  if baseline:
    match = _BASELINE_RE.search(baseline)
    if not match:
      raise BadInput(info.path, f'bad_metadata: PROCESSING_BASELINE={baseline!r} is not like '
                     '04.00 or N0400')
    major = int(match.group(1) or match.group(3))
    return float(constants.S2_BASELINE_04_OFFSET_DN) if major >= 4 else 0.0
  return 0.0


def check_labels(labels: np.ndarray, info: RasterInfo, valid: tuple[int, int]) -> np.ndarray:
  """Label map as uint8 after rejecting NaN/inf, nodata pixels, fractions and values off range."""
  path = info.path
  if np.issubdtype(labels.dtype, np.floating):
    bad = np.count_nonzero(~np.isfinite(labels))
    if bad:
      raise BadInput(path, f'label_non_finite: {bad} NaN/inf pixels')
  if info.nodata is not None and not (isinstance(info.nodata, float) and math.isnan(info.nodata)):
    hits = np.count_nonzero(labels == info.nodata)
    if hits:
      raise BadInput(path, f'label_nodata: {hits} pixels equal the nodata value {info.nodata:g}')
  if np.issubdtype(labels.dtype, np.floating) and np.any(labels != np.round(labels)):
    raise BadInput(path, 'label_out_of_range: non-integer label values')
  lo, hi = int(labels.min()), int(labels.max())
  if lo < valid[0] or hi > valid[1]:
    raise BadInput(path, f'label_out_of_range: values {lo}..{hi}, expected {valid[0]}..{valid[1]}')
  return labels.astype(np.uint8)


def check_finite(data: np.ndarray, path: str, what: str) -> None:
  """Rejects any NaN/inf (for bands where they mean a broken file, e.g. S2 reflectance)."""
  if np.issubdtype(data.dtype, np.floating):
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:
      raise BadInput(path, f'non_finite: {what} has {bad} NaN/inf values')


def check_not_all_non_finite(data: np.ndarray, path: str, what: str) -> None:
  """S1 swath borders are NaN/-inf (kept, mapped to 0), but a band with no value is broken."""
  if np.issubdtype(data.dtype, np.floating) and not np.any(np.isfinite(data)):
    raise BadInput(path, f'all_non_finite: {what} has no finite value')


# ---------------------------------------------------------------------------------------------
# Converter interface and the shard plan.


class Converter(abc.ABC):
  """One dataset's per-item conversion. Instances are pickled once to each worker process."""

  name: str  # TFDS dataset name, also the shard file prefix.
  unit: str = 'item'  # Progress-bar unit.
  counter_names: tuple[str, ...] = ()  # Always reported in the summary, even when 0.
  file_format: str = 'tfrecord'  # Shard format: one of FILE_FORMATS.

  @abc.abstractmethod
  def features(self) -> Any:
    """The tfds.features.FeaturesDict of one record."""

  @abc.abstractmethod
  def convert(self, item: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """Returns (example, counters such as non-finite values); raises BadInput when unusable.

    The example is what `records` turns into the item's records (by default, the one record).

    Every file it reads must go through `read_raster`/`read_info` or be passed to `note_input`,
    so that a rerun notices when that file changed.
    """

  def records(self, example: dict[str, Any]) -> list[dict[str, Any]]:
    """The records (each one example of `features()`) that one converted item is written as.

    Default: the example itself. Override to split an item into several records (ssl4eo: one
    per season); they are written consecutively, in the order returned.
    """
    return [example]

  @abc.abstractmethod
  def item_name(self, item: Any) -> str:
    """The id written in rejects.csv."""

  @abc.abstractmethod
  def fingerprint(self) -> dict[str, Any]:
    """Every argument that changes the output; a resume must match it exactly."""


@dataclasses.dataclass(frozen=True)
class ShardTask:
  split: str
  index: int
  num_shards: int
  items: tuple[Any, ...]

  @property
  def key(self) -> str:
    return f'{self.split}-{self.index:05d}'


def shard_filename(name: str, split: str, index: int, num_shards: int,
                   file_format: str = 'tfrecord') -> str:
  """TFDS's shard file name, whose suffix names the format (TFDS finds the shards by it)."""
  return f'{name}-{split}.{file_format}-{index:05d}-of-{num_shards:05d}'


def plan_shards(splits: Mapping[str, Sequence[Any]], examples_per_shard: int) -> list[ShardTask]:
  """Consecutive runs of `examples_per_shard` items per split, in the given (sorted) order."""
  tasks = []
  for split, items in splits.items():
    num_shards = math.ceil(len(items) / examples_per_shard)
    for index in range(num_shards):
      chunk = items[index * examples_per_shard:(index + 1) * examples_per_shard]
      tasks.append(ShardTask(split, index, num_shards, tuple(chunk)))
  return tasks


def _jsonable(item: Any) -> Any:
  return list(item) if isinstance(item, tuple) else item


def printable(text: Any) -> str:
  """`text` as valid UTF-8 for reports and messages: undecodable bytes become `\\xNN`.

  A path from the file system may hold bytes that are not UTF-8 (Python keeps them as lone
  surrogates); written as they are, they would make rejects.csv or a message unencodable.
  """
  text = str(text)
  try:
    raw = text.encode('utf-8', 'surrogateescape')
  except UnicodeEncodeError:  # Surrogates that do not come from undecodable bytes.
    return text.encode('utf-8', 'backslashreplace').decode('utf-8')
  return raw.decode('utf-8', 'backslashreplace')


def _printable_tree(obj: Any) -> Any:
  if isinstance(obj, str):
    return printable(obj)
  if isinstance(obj, Mapping):
    return {printable(k): _printable_tree(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_printable_tree(v) for v in obj]
  return obj


def _shard_description(converter: Converter, task: ShardTask) -> str:
  first, last = converter.item_name(task.items[0]), converter.item_name(task.items[-1])
  items = first if len(task.items) == 1 else f'{first} .. {last}'
  return f'shard {task.key} ({len(task.items)} {converter.unit}: {printable(items)})'


def _atomic_write_text(path: str, text: str) -> None:
  utils.write_text(path, text)


def _atomic_write_json(path: str, obj: Any) -> None:
  utils.write_json(path, obj)


# ---------------------------------------------------------------------------------------------
# Inputs read per item: recorded so that a rerun rebuilds the shards whose files changed.

_RECORDING: dict[str, list[int]] | None = None  # path -> [size, mtime_ns] of the current item.
_ABSENT = [-1, 0]
INPUTS_SUFFIX = '.inputs.json.gz'


def _stat(path: str) -> list[int]:
  """[size, mtime_ns] of a file or folder; [-1, 0] when absent (so adding it counts as change)."""
  try:
    st = os.stat(path)
  except (OSError, ValueError):
    return list(_ABSENT)
  return [int(st.st_size), int(st.st_mtime_ns)]


def note_input(path: str | os.PathLike) -> None:
  """Records that the item being converted depends on `path` (file or folder, present or not).

  Called by `read_raster`/`read_info`; a converter calls it for any other file or folder it
  reads (e.g. a listing). Outside a shard build (tests, the TFDS builder) it does nothing.
  """
  if _RECORDING is not None and path:
    _RECORDING.setdefault(os.fspath(path), _stat(os.fspath(path)))


def _inputs_path(out_dir: str, key: str) -> str:
  return os.path.join(out_dir, STATE_DIR, key + INPUTS_SUFFIX)


def _write_inputs(out_dir: str, key: str, inputs: Mapping[str, list[int]]) -> str:
  """The shard's input stats (gzipped JSON: ssl4eo shards read thousands of files)."""
  blob = gzip.compress(json.dumps(sorted([p, *s] for p, s in inputs.items())).encode(), mtime=0)
  path = _inputs_path(out_dir, key)
  with utils.atomic_output(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(blob)
  return hashlib.sha256(blob).hexdigest()


def _read_inputs(out_dir: str, marker: Mapping[str, Any]) -> list[list[Any]] | None:
  """The recorded [path, size, mtime_ns] rows of a done shard, None when not recorded/intact."""
  digest = marker.get('inputs_sha256')
  if not digest:
    return None
  try:
    with open(_inputs_path(out_dir, f'{marker["split"]}-{marker["index"]:05d}'), 'rb') as f:
      blob = f.read()
  except OSError:
    return None
  if hashlib.sha256(blob).hexdigest() != digest:
    return None
  return json.loads(gzip.decompress(blob))


def _describe_stat(stat: Sequence[int]) -> str:
  if list(stat) == _ABSENT:
    return 'absent'
  modified = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stat[1] / 1e9))
  return f'{stat[0]} bytes, modified {modified}'


def _changed_shards(out_dir: str, markers: Mapping[str, dict[str, Any]]) -> dict[str, str]:
  """key -> what changed, for done shards whose recorded inputs differ now (size or mtime)."""
  recorded = {key: _read_inputs(out_dir, m) for key, m in markers.items()}
  missing = sorted(k for k, rows in recorded.items() if rows is None)
  if missing:
    logging.warning('%d done shard(s) have no record of the files they read (e.g. %s, written '
                    'by an older converter or damaged): they are kept without a check; pass '
                    '--overwrite to rebuild everything.', len(missing), missing[0])
  rows = [(key, row) for key, rs in recorded.items() if rs for row in rs]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # stat() is I/O-bound (network FS).
    now = list(pool.map(lambda kr: _stat(kr[1][0]), rows))
  changed: dict[str, str] = {}
  for (key, (path, *old)), new in zip(rows, now):
    if key not in changed and list(old) != new:
      changed[key] = (f'{printable(path)}: {_describe_stat(old)} when converted, '
                      f'{_describe_stat(new)} now')
  return changed


# ---------------------------------------------------------------------------------------------
# Worker side: one call writes one whole shard.

_WORKER: dict[str, Any] = {}


def _init_worker(converter: Converter, out_dir: str, strict: bool,
                 tick: Callable[[], None]) -> None:
  """Worker set-up: the converter (with e.g. a label manifest) crosses once per process."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  _WORKER.clear()
  _WORKER.update(converter=converter, out_dir=out_dir, strict=strict, tick=tick,
                 features=converter.features())


def _convert_recorded(converter: Converter, item: Any) -> tuple[Any, dict[str, list[int]]]:
  """converter.convert(item) -> (its result or the exception it raised, the inputs it read)."""
  global _RECORDING
  _RECORDING = {}
  try:
    try:
      return converter.convert(item), _RECORDING
    except BadInput as err:
      note_input(err.path)  # A missing folder or file: adding it later is a change.
      return err, _RECORDING
    except Exception as err:  # pylint: disable=broad-except
      return err, _RECORDING
  finally:
    _RECORDING = None


@contextlib.contextmanager
def _shard_writer(path: str, file_format: str) -> Iterator[Callable[[bytes], None]]:
  """A `write(bytes)` callable appending records to a new shard file of `file_format`."""
  if file_format == 'tfrecord':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.TFRecordWriter(os.fsencode(path)) as writer:
      yield writer.write
    return
  if file_format != 'array_record':
    raise ValueError(f'file_format must be one of {FILE_FORMATS}, got {file_format!r}')
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  writer = array_record_module.ArrayRecordWriter(path, ARRAY_RECORD_OPTIONS)
  if not writer.ok():  # It does not raise when the file cannot be created.
    raise OSError(f'{path}: cannot create the array_record file')

  def write(blob: bytes) -> None:
    try:
      writer.write(blob)
    except RuntimeError as err:  # e.g. no space left: an OSError like TFRecord's, for messages.
      raise OSError(f'{path}: {err}') from None

  try:
    yield write
  except BaseException:
    with contextlib.suppress(RuntimeError):
      writer.close()
    raise
  try:
    writer.close()
  except RuntimeError as err:
    raise OSError(f'{path}: {err}') from None


def _serialize(features: Any, record: dict[str, Any]) -> bytes:
  """TFDS serialisation of one record, re-serialised with sorted map keys: bytes independent of
  the process's hash seed, so a resumed shard is identical to the one an uninterrupted run
  writes. TFDS's own copy of the tf.train.Example proto: the array_record conversions never
  import TensorFlow (~9 s of CPU per worker)."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

  return (tf_example_pb2.Example.FromString(features.serialize_example(record))
          .SerializeToString(deterministic=True))


def _build_shard(task: ShardTask) -> dict[str, Any]:
  """Converts the shard's items, writes the shard atomically, then its done-marker."""
  import rasterio  # pylint: disable=g-import-not-at-top

  converter: Converter = _WORKER['converter']
  features = _WORKER['features']
  out_dir = _WORKER['out_dir']
  state_dir = os.path.join(out_dir, STATE_DIR)
  filename = shard_filename(converter.name, task.split, task.index, task.num_shards,
                            converter.file_format)
  tmp_path = os.path.join(state_dir, f'{filename}.tmp-{os.getpid()}')
  rejects, counters, converted, num_records, inputs = [], collections.Counter(), 0, 0, {}
  # Skipping the sibling-directory listing makes each open cheaper on big/network folders.
  with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN='EMPTY_DIR'), \
      _shard_writer(tmp_path, converter.file_format) as write:
    for item in task.items:
      name = printable(converter.item_name(item))
      try:
        result, item_inputs = _convert_recorded(converter, item)
        inputs.update(item_inputs)
        if isinstance(result, Exception):
          raise result
        example, item_counters = result
        # All of an item's records are serialised before the first is written: an item that
        # fails leaves none of them in the shard.
        blobs = [_serialize(features, r) for r in converter.records(example)]
      except BadInput as err:
        if _WORKER['strict']:
          raise
        rejects.append([name, printable(err.path), printable(err.reason)])
      except Exception as err:  # pylint: disable=broad-except
        if _WORKER['strict']:
          raise
        logging.exception('Unexpected error on %s', name)
        rejects.append([name, '', printable(f'unexpected_error: {type(err).__name__}: {err}')])
      else:
        for blob in blobs:  # A failed write (no space left) fails the shard, not the item.
          write(blob)
        counters.update(item_counters)
        converted += 1
        num_records += len(blobs)
      _WORKER['tick']()
  with open(tmp_path, 'rb') as f:
    os.fsync(f.fileno())
  os.replace(tmp_path, os.path.join(out_dir, filename))
  # num_examples: records (what TFDS's shard_lengths count); converted: items.
  marker = {'split': task.split, 'index': task.index, 'num_shards': task.num_shards,
            'file': filename, 'planned': len(task.items), 'converted': converted,
            'num_examples': num_records,
            'num_bytes': os.path.getsize(os.path.join(out_dir, filename)),
            'rejects': rejects, 'counters': dict(counters),
            'inputs_sha256': _write_inputs(out_dir, task.key, inputs)}
  _atomic_write_json(os.path.join(state_dir, task.key + '.json'), marker)
  return marker


def _worker_main(conn: Any, converter: Converter, out_dir: str, strict: bool) -> None:
  """A pool process: builds the shards it is sent over `conn`, reporting each result.

  One pipe per worker (no shared queue or lock), so a worker killed at any moment cannot leave
  anything locked: the driver sees its pipe close and its process end. Ctrl-C is the driver's
  to handle (it stops the workers), so a terminal's SIGINT to the whole group is ignored here.
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    _init_worker(converter, out_dir, strict, lambda: conn.send(('tick',)))
  except BaseException as err:  # pylint: disable=broad-except
    conn.send(('start_failed', printable(f'{type(err).__name__}: {err}'),
               traceback.format_exc()))
    return
  conn.send(('ready',))
  while True:
    try:
      task = conn.recv()
    except (EOFError, OSError):  # The driver is gone.
      return
    if task is None:
      return
    try:
      conn.send(('done', _build_shard(task)))
    except BadInput as err:
      conn.send(('bad_input', err.path, err.reason))
    except OSError as err:
      conn.send(('os_error', printable(_os_error_text(err)), traceback.format_exc()))
    except Exception as err:  # pylint: disable=broad-except
      conn.send(('failed', printable(f'{type(err).__name__}: {err}'), traceback.format_exc()))


def _os_error_text(err: OSError) -> str:
  text = err.strerror or str(err)
  return f'{err.filename}: {text}' if err.filename else text


# ---------------------------------------------------------------------------------------------
# Driver side.

MAX_START_FAILURES = 3  # Worker processes dying before they are ready, in a row: then stop.


def _load_done_marker(out_dir: str, task: ShardTask, name: str,
                      file_format: str) -> dict[str, Any] | None:
  """The marker of a finished shard, or None when the shard must be (re)built."""
  marker_path = os.path.join(out_dir, STATE_DIR, task.key + '.json')
  try:
    with open(marker_path) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  filename = shard_filename(name, task.split, task.index, task.num_shards, file_format)
  shard = os.path.join(out_dir, filename)
  if (marker.get('num_shards') != task.num_shards or marker.get('planned') != len(task.items)
      or marker.get('file') != filename or 'num_examples' not in marker
      or not os.path.isfile(shard) or os.path.getsize(shard) != marker.get('num_bytes')):
    return None
  marker.setdefault('converted', marker['num_examples'])  # Older markers: one record per item.
  return marker


OUTPUTS_FILE = 'outputs.json'  # In STATE_DIR: every top-level file a conversion here may write.
_STATE_FILE_RE = re.compile(r'(plan|outputs)\.json$|[\w]+-\d{5}(\.json|'
                            + re.escape(INPUTS_SUFFIX) + r')$|.*\.tmp(-\d+)?$')


def _plan_file_format(plan: Mapping[str, Any]) -> str:
  return plan.get('file_format', LEGACY_FILE_FORMAT)


def _planned_outputs(plan: Mapping[str, Any]) -> list[str]:
  shards = [shard_filename(plan['dataset'], s['split'], s['index'], s['num_shards'],
                           _plan_file_format(plan))
            for s in plan.get('shards', ())]
  return shards + list(METADATA_FILES) + [SUMMARY_FILE, REJECTS_FILE]


def _recorded_outputs(state_dir: str, old_plan: Mapping[str, Any] | None) -> set[str]:
  """The files an earlier conversion in this folder recorded (before writing them)."""
  try:
    with open(os.path.join(state_dir, OUTPUTS_FILE)) as f:
      return set(json.load(f)['files'])
  except (OSError, ValueError, KeyError, TypeError):
    pass
  # A state of an older converter, without the record: it wrote the files its plan names.
  return set(_planned_outputs(old_plan)) if old_plan else set()


def _remove_recorded(out_dir: str, recorded: set[str]) -> None:
  """Deletes only what a conversion recorded writing (and its state), nothing else."""
  for name in sorted(recorded):
    path = os.path.join(out_dir, name)
    if os.path.isfile(path) or os.path.islink(path):
      os.remove(path)
  names = '|'.join(map(re.escape, sorted(recorded))) or '-'
  tmp_re = re.compile(rf'\.({names})\.\d+\.[0-9a-f]{{8}}\.tmp$')
  for name in os.listdir(out_dir):
    if tmp_re.match(name):  # Leftovers of atomic writes killed midway.
      os.remove(os.path.join(out_dir, name))
  state_dir = os.path.join(out_dir, STATE_DIR)
  if os.path.isdir(state_dir):
    for name in os.listdir(state_dir):
      if _STATE_FILE_RE.match(name):
        os.remove(os.path.join(state_dir, name))
    with contextlib.suppress(OSError):  # Not empty: something of the user's is in there.
      os.rmdir(state_dir)


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  if old.get('dataset') != new['dataset']:
    return f'dataset: {old.get("dataset")!r} -> {new["dataset"]!r}'
  old_fp, new_fp = old.get('fingerprint', {}), new['fingerprint']
  diffs = [f'{k}: {old_fp.get(k)!r} -> {new_fp.get(k)!r}'
           for k in sorted(set(old_fp) | set(new_fp)) if old_fp.get(k) != new_fp.get(k)]
  if diffs:
    return printable('; '.join(diffs))
  return (f'the input item list changed ({old.get("num_items")} items in '
          f'{len(old.get("shards", []))} shards before, {new["num_items"]} in '
          f'{len(new["shards"])} now)')


def _make_out_dir(out_dir: str) -> None:
  try:
    out_dir.encode('utf-8')
  except UnicodeEncodeError:
    raise ConversionError(f'--out {printable(out_dir)}: the output path must be valid UTF-8 '
                          '(TensorFlow Datasets cannot read other paths)') from None
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as err:
    reason = ('a file of that name exists' if isinstance(err, FileExistsError)
              else err.strerror or str(err))
    raise ConversionError(f'cannot create --out {printable(out_dir)}: {reason}') from None
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise ConversionError(f'cannot write into --out {printable(out_dir)}: permission denied')


def _prepare_state(out_dir: str, plan: dict[str, Any], name: str, overwrite: bool) -> None:
  """Creates the state, or checks that the recorded one belongs to the same command.

  Only files that a conversion recorded (in STATE_DIR/outputs.json, before writing them) are
  ever deleted or replaced: a folder holding anything else under the names this conversion
  would write (e.g. another TFDS dataset's dataset_info.json) is refused, even with --overwrite.
  """
  del name  # The plan names the dataset.
  state_dir = os.path.join(out_dir, STATE_DIR)
  plan_path = os.path.join(state_dir, 'plan.json')
  _make_out_dir(out_dir)
  old = None
  if os.path.exists(plan_path):
    try:
      with open(plan_path) as f:
        old = json.load(f)
    except (OSError, ValueError) as err:
      if not overwrite:
        raise ExistingOutputError(f'{printable(plan_path)} is unreadable ({err})',
                                  'pass --overwrite to discard the earlier conversion and start '
                                  'over') from None
      old = {}
  recorded = _recorded_outputs(state_dir, old)
  if old:  # A plan written before plans named the file format: TFRecord shards.
    old = dict(old, file_format=_plan_file_format(old))
  if not overwrite and old and old['file_format'] != plan['file_format']:
    raise ExistingOutputError(
        f'{printable(out_dir)} holds {old["file_format"]} shards of an earlier conversion, but '
        f'{plan["dataset"]} is now written as {plan["file_format"]} (the records cannot be '
        'reused)', 'pass --overwrite to discard that conversion and start over, or choose '
        'another --out.')
  if not overwrite and old is not None and old != plan:
    raise ExistingOutputError(
        f'{printable(out_dir)} holds a conversion made with other arguments or inputs '
        f'({_describe_difference(old, plan)})', 're-run with the original arguments to resume, '
        'or pass --overwrite to discard it and start over.')
  planned = _planned_outputs(plan)
  foreign = [f for f in planned if f not in recorded and os.path.lexists(os.path.join(out_dir, f))]
  if foreign:  # Checked before anything is deleted.
    shown = ', '.join(foreign[:4]) + (f' and {len(foreign) - 4} more' if len(foreign) > 4 else '')
    raise ExistingOutputError(
        f'{printable(out_dir)} already holds {shown}, not written by a conversion recorded there '
        '(another dataset?)', 'they are never replaced, also not with --overwrite: choose another '
        '--out, or move them away yourself.')
  if overwrite and (old is not None or recorded):
    logging.warning('--overwrite: discarding the earlier conversion in %s', printable(out_dir))
    _remove_recorded(out_dir, recorded)
    recorded = set()
  os.makedirs(state_dir, exist_ok=True)
  for f in os.listdir(state_dir):  # Leftovers of a killed run.
    if '.tmp' in f and _STATE_FILE_RE.match(f):
      os.remove(os.path.join(state_dir, f))
  outputs = sorted(recorded | set(planned))
  if outputs != sorted(recorded) or not os.path.exists(os.path.join(state_dir, OUTPUTS_FILE)):
    _atomic_write_json(os.path.join(state_dir, OUTPUTS_FILE), {'files': outputs})  # Before any.
  if not os.path.exists(plan_path):
    _atomic_write_json(plan_path, plan)


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: Any
  ready: bool = False
  task: ShardTask | None = None
  ticks: int = 0
  error: str = ''  # What it reported when it could not start.
  stopping: bool = False


def _exit_description(process: Any) -> str:
  code = process.exitcode
  if code is not None and code < 0:
    try:
      name = signal.Signals(-code).name
    except ValueError:
      name = f'signal {-code}'
    hint = ' (the kernel\'s out-of-memory killer sends SIGKILL)' if -code == signal.SIGKILL else ''
    return f'was killed by {name}{hint}'
  return f'exited with status {code}'


class _Pool:
  """Worker processes, one pipe each, that notice a dead worker (kill -9, OOM) at once.

  multiprocessing.Pool silently replaces a dead worker and waits forever for its task; here
  the task is retried on a fresh worker up to `max_retries` times, then given up (the run
  finishes the other shards and stops with a message), and workers that die before they are
  ready stop the run after MAX_START_FAILURES in a row.
  """

  def __init__(self, converter: Converter, out_dir: str, strict: bool, size: int):
    self._ctx = multiprocessing.get_context('spawn')
    self._args = (converter, out_dir, strict)
    self._out_dir = out_dir
    self.size = size
    self.workers: list[_Worker] = []
    self.start_failures = 0

  def spawn(self) -> None:
    parent, child = self._ctx.Pipe()
    process = self._ctx.Process(target=_worker_main, args=(child, *self._args), daemon=True,
                                name=f'convert-worker-{len(self.workers)}')
    process.start()
    child.close()
    self.workers.append(_Worker(process, parent))

  def close(self, force: bool) -> None:
    for w in self.workers:
      if not force and w.process.is_alive():
        with contextlib.suppress(OSError, ValueError):
          w.conn.send(None)
      elif w.process.is_alive():
        w.process.terminate()
    for w in self.workers:
      w.process.join(timeout=10)
      if w.process.is_alive():
        w.process.kill()
        w.process.join(timeout=10)
      w.conn.close()
    self.workers = []

  def remove_temporaries(self, pid: int) -> None:
    state_dir = os.path.join(self._out_dir, STATE_DIR)
    with contextlib.suppress(OSError):
      for f in os.listdir(state_dir):
        if f.endswith(f'.tmp-{pid}'):
          os.remove(os.path.join(state_dir, f))


def _run_pool(converter: Converter, out_dir: str, todo: list[ShardTask], workers: int,
              strict: bool, max_retries: int, bar: Any) -> tuple[list[dict[str, Any]],
                                                               dict[str, str]]:
  """Builds `todo` on `workers` processes; returns (markers, given-up shard -> why)."""
  from multiprocessing import connection  # pylint: disable=g-import-not-at-top

  queue = collections.deque(todo)
  attempts: collections.Counter = collections.Counter()
  markers, given_up = [], {}
  pool = _Pool(converter, out_dir, strict, min(workers, len(todo)))
  force = True
  try:
    for _ in range(pool.size):
      pool.spawn()
    while pool.workers:
      for w in pool.workers:  # Hand out work; send idle workers home when none is left.
        if w.ready and w.task is None and not w.stopping:
          if queue:
            w.task, w.ticks = queue.popleft(), 0
            w.conn.send(w.task)
          else:
            w.stopping = True
            with contextlib.suppress(OSError):
              w.conn.send(None)
      connection.wait([w.conn for w in pool.workers] + [w.process.sentinel for w in pool.workers],
                      timeout=1.0)
      for w in list(pool.workers):
        alive = w.process.is_alive()  # Before draining: a dead worker's messages are all there.
        try:
          while w.conn.poll():
            message = w.conn.recv()
            kind = message[0]
            if kind == 'tick':
              w.ticks += 1
              bar.update(1)
            elif kind == 'ready':
              w.ready, pool.start_failures = True, 0
            elif kind == 'done':
              markers.append(message[1])
              w.task = None
            elif kind == 'start_failed':
              w.error = message[1]
              logging.error('A worker process failed to start:\n%s', message[2])
            elif kind == 'bad_input':
              raise BadInput(message[1], message[2])
            elif kind == 'os_error':
              raise ConversionError(f'{_shard_description(converter, w.task)}: {message[1]}')
            else:
              raise RuntimeError(f'{_shard_description(converter, w.task)} failed in worker '
                                 f'pid {w.process.pid}: {message[1]}\n{message[2]}')
        except (EOFError, OSError):
          alive = False
        if alive:
          continue
        w.process.join(timeout=10)
        pool.workers.remove(w)
        w.conn.close()
        pool.remove_temporaries(w.process.pid)
        if w.stopping and w.task is None and w.process.exitcode == 0:
          continue  # Sent home.
        how = f'worker pid {w.process.pid} {_exit_description(w.process)}'
        if not w.ready:
          pool.start_failures += 1
          detail = f': {w.error}' if w.error else ''
          logging.warning('A worker process could not start (%s%s).', how, detail)
          if pool.start_failures >= MAX_START_FAILURES:
            raise ConversionError(
                f'worker processes fail to start ({pool.start_failures} in a row; the last '
                f'{how}{detail}); try --workers 1 to see the problem in the main process')
        elif w.task is not None:
          task = w.task
          bar.update(-w.ticks)  # Its items will be counted again when rebuilt.
          attempts[task.key] += 1
          what = _shard_description(converter, task)
          if attempts[task.key] > max_retries:
            given_up[task.key] = f'{what}: {how} on each of {attempts[task.key]} attempts'
            logging.error('Giving up %s: %s on each of %d attempts.', what, how,
                          attempts[task.key])
          else:
            logging.warning('%s: %s; retrying it (attempt %d of %d).', what, how,
                            attempts[task.key] + 1, max_retries + 1)
            queue.appendleft(task)
        busy = sum(1 for x in pool.workers if not x.stopping)
        if queue and busy < min(pool.size, len(queue) + sum(1 for x in pool.workers if x.task)):
          pool.spawn()
    force = False
  finally:
    pool.close(force)
  return markers, given_up


def _run_tasks(converter: Converter, out_dir: str, todo: list[ShardTask], workers: int,
               strict: bool, max_retries: int = 2
               ) -> tuple[list[dict[str, Any]], dict[str, str]]:
  """Builds the shards of `todo`, inline for one worker, else on worker processes."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  total = sum(len(t.items) for t in todo)
  if not todo:
    return [], {}
  with tqdm(total=total, unit=converter.unit, desc=converter.name, dynamic_ncols=True,
            smoothing=0.05) as bar:
    if workers <= 1 or len(todo) <= 1:
      _init_worker(converter, out_dir, strict, lambda: bar.update(1))
      try:
        return [_build_shard(task) for task in todo], {}
      finally:
        _WORKER.clear()
    return _run_pool(converter, out_dir, todo, workers, strict, max_retries, bar)


def _write_reports(out_dir: str, converter: Converter, tasks: list[ShardTask],
                   markers: Mapping[str, dict[str, Any]], fingerprint: Mapping[str, Any],
                   run_info: dict[str, Any]) -> dict[str, Any]:
  """rejects.csv and conversion_summary.json, from the markers of all shards (old and new)."""
  splits: dict[str, dict[str, Any]] = {}
  kinds: collections.Counter = collections.Counter()
  rows = []
  for task in tasks:
    marker = markers[task.key]
    entry = splits.setdefault(task.split,
                              collections.Counter(dict.fromkeys(converter.counter_names, 0)))
    entry.update({'planned': marker['planned'], 'converted': marker['converted'],
                  'records': marker['num_examples'], 'skipped': len(marker['rejects']),
                  'shards': 1, 'num_bytes': marker['num_bytes']})
    entry.update(marker['counters'])
    for row in marker['rejects']:
      rows.append([printable(v) for v in row])  # Markers of older runs may hold raw paths.
      kinds[rows[-1][2].split(':', 1)[0]] += 1
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(['location', 'file', 'reason'])
  writer.writerows(rows)
  _atomic_write_text(os.path.join(out_dir, REJECTS_FILE), text.getvalue())
  total: collections.Counter = collections.Counter()
  for entry in splits.values():
    total.update(entry)
  summary = {'dataset': converter.name, 'splits': {k: dict(v) for k, v in splits.items()},
             'total': dict(total), 'reject_kinds': dict(sorted(kinds.items())),
             'arguments': _printable_tree(dict(fingerprint)), 'this_run': run_info}
  _atomic_write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
  return summary


def _write_metadata(out_dir: str, converter: Converter, tasks: list[ShardTask],
                    markers: Mapping[str, dict[str, Any]], description: str) -> None:
  """dataset_info.json + features.json, as tfds.folder_dataset.write_metadata writes them.

  Written by hand because that helper insists on listing every split that has shard files,
  and TFDS cannot read a split without examples: a split whose items were all rejected is
  left out of the metadata (its empty shards stay on disk for resume), with a warning.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  file_format = tfds.core.FileFormat(converter.file_format)
  template = tfds.core.ShardedFileTemplate(
      data_dir=tfds.core.Path(out_dir), template=FILENAME_TEMPLATE,
      dataset_name=converter.name, filetype_suffix=file_format.file_suffix)
  split_infos = []
  for split in dict.fromkeys(t.split for t in tasks):
    shard_markers = [markers[t.key] for t in tasks if t.split == split]
    lengths = [m['num_examples'] for m in shard_markers]  # Records, not items.
    if not sum(lengths):
      logging.warning('Split %r has no example (all rejected): left out of the metadata.', split)
      continue
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=sum(m['num_bytes'] for m in shard_markers),
        filename_template=template.replace(split=split)))
  if not split_infos:
    return
  identity = tfds.core.DatasetIdentity(name=converter.name, version=tfds.core.Version('1.0.0'),
                                       data_dir=out_dir, module_name='')
  info = tfds.core.DatasetInfo(builder=identity, features=converter.features(),
                               description=description)
  info.set_file_format(file_format)
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(out_dir)


def run_conversion(converter: Converter, splits: Mapping[str, Sequence[Any]], out_dir: str, *,
                   examples_per_shard: int, workers: int, strict: bool = False,
                   overwrite: bool = False, plan_args: Mapping[str, Any] | None = None,
                   description: str = '', max_retries: int | None = None) -> dict[str, Any]:
  """Converts `splits` (split -> sorted items) into a TFDS directory; returns the summary.

  Resumable: shards already done (by the same plan, from unchanged input files) are kept; only
  the rest is built. `plan_args` are the arguments that shaped `splits` (seed, limit, ...): part
  of the fingerprint. `max_retries`: how often a shard whose worker process died is rebuilt
  (default: the command line's --max-retries, else 2).
  """
  if max_retries is None:
    max_retries = _CLI_OPTIONS.get('max_retries', 2)
  if examples_per_shard < 1:
    raise ConversionError('--examples-per-shard must be >= 1')
  if converter.file_format not in FILE_FORMATS:
    raise ValueError(f'{type(converter).__name__}.file_format must be one of {FILE_FORMATS}, '
                     f'got {converter.file_format!r}')
  splits = {k: [_jsonable(i) for i in v] for k, v in splits.items() if len(v)}
  tasks = plan_shards(splits, examples_per_shard)
  if not tasks:
    raise ConversionError('nothing to convert: no input items were found')
  items_blob = json.dumps(splits, sort_keys=True).encode()
  fingerprint = dict(converter.fingerprint(), **(plan_args or {}),
                     examples_per_shard=examples_per_shard)
  plan = {'format_version': PLAN_FORMAT_VERSION, 'dataset': converter.name,
          'file_format': converter.file_format, 'fingerprint': fingerprint,
          'num_items': sum(len(v) for v in splits.values()),
          'items_sha256': hashlib.sha256(items_blob).hexdigest(),
          'shards': [{'split': t.split, 'index': t.index, 'num_shards': t.num_shards,
                      'items': list(t.items)} for t in tasks]}
  out_dir = os.path.abspath(out_dir)
  _prepare_state(out_dir, plan, converter.name, overwrite)

  markers = {}
  for task in tasks:
    marker = _load_done_marker(out_dir, task, converter.name, converter.file_format)
    if marker is not None:
      markers[task.key] = marker
  changed = _changed_shards(out_dir, markers)
  if changed:
    first = sorted(changed)[0]
    logging.warning('%d done shard(s) read files that changed since (e.g. %s: %s): rebuilding '
                    'them.', len(changed), first, changed[first])
    for key in changed:
      del markers[key]
  todo = [t for t in tasks if t.key not in markers]
  if todo:
    for f in METADATA_FILES:  # An incomplete directory must not look loadable.
      if os.path.exists(os.path.join(out_dir, f)):
        os.remove(os.path.join(out_dir, f))
  if markers:
    logging.info('Resuming: %d of %d shards already done, %d to build.', len(markers),
                 len(tasks), len(todo))
  if todo:
    logging.info('Building %d shards with %d worker(s).', len(todo),
                 max(1, min(workers, len(todo))))
  start = time.time()
  todo_items = sum(len(t.items) for t in todo)
  built, given_up = _run_tasks(converter, out_dir, todo, workers, strict, max_retries)
  for marker in built:
    markers[f'{marker["split"]}-{marker["index"]:05d}'] = marker
  if given_up:
    reasons = '; '.join(given_up[k] for k in sorted(given_up))
    raise ConversionError(
        f'{len(given_up)} of {len(tasks)} shards could not be built: {reasons}. The other '
        f'shards are done and kept: rerun the same command to retry only these (with fewer '
        '--workers if memory ran out).')
  seconds = time.time() - start
  run_info = {'shards_built': len(todo), 'shards_reused': len(tasks) - len(todo),
              'shards_rebuilt_for_changed_inputs': len(changed),
              'items_processed': todo_items, 'seconds': round(seconds, 3),
              'items_per_second': round(todo_items / seconds, 3) if seconds > 0 else None,
              'workers': workers}
  summary = _write_reports(out_dir, converter, tasks, markers, fingerprint, run_info)
  _write_metadata(out_dir, converter, tasks, markers, description)
  return summary


# ---------------------------------------------------------------------------------------------
# Command line.

_CLI_OPTIONS: dict[str, Any] = {}  # Shared options a converter's run() need not pass on.
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C.


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}')
  return value


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
  return value


def _non_negative_float(text: str) -> float:
  value = float(text)
  if not (math.isfinite(value) and value >= 0):
    raise argparse.ArgumentTypeError(f'expected a finite number >= 0, got {text!r}')
  return value


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
  """Options every converter takes."""
  parser.add_argument('--out', required=True, help='Output TFDS directory.')
  parser.add_argument('--examples-per-shard', type=_positive_int, default=64,
                      help='Items (locations, patches) per shard, each written as its '
                           'records (ssl4eo: 4 per location); also the unit of work and of '
                           'resume.')
  parser.add_argument('--workers', type=_positive_int, default=len(os.sched_getaffinity(0)),
                      help='Worker processes (default: all cores); 1 runs inline.')
  parser.add_argument('--strict', action='store_true',
                      help='Fail on the first bad input (naming file and problem) '
                           'instead of skipping it.')
  parser.add_argument('--limit', type=_non_negative_int, default=None,
                      help='Only the first N items (sorted), for trials.')
  parser.add_argument('--grid-tolerance-px', type=_non_negative_float, default=0.5,
                      help='Largest allowed bounds offset between co-registered files, '
                           'in 10 m pixels.')
  parser.add_argument('--overwrite', action='store_true',
                      help='Discard what an earlier conversion left in --out and start over '
                           '(without it, a re-run resumes, and refuses other arguments). Only '
                           'files a conversion recorded writing are ever deleted.')
  parser.add_argument('--max-retries', type=_non_negative_int, default=2,
                      help='How often a shard whose worker process died (e.g. killed when '
                           'memory ran out) is rebuilt before the run gives it up.')


def _undecodable_argument(args: argparse.Namespace) -> str | None:
  """The file named on the command line that is not UTF-8 text, if any (for the message)."""
  for value in vars(args).values():
    if isinstance(value, str) and os.path.isfile(value):
      try:
        with open(value, 'rb') as f:
          f.read().decode('utf-8-sig')
      except UnicodeDecodeError:
        return value
      except OSError:
        continue
  return None


def cli_main(run: Callable[[argparse.Namespace], dict[str, Any]],
             args: argparse.Namespace) -> dict[str, Any]:
  """Runs a converter; any failure a user can fix becomes ConversionError (a cli.UserError)."""
  _CLI_OPTIONS.clear()
  _CLI_OPTIONS['max_retries'] = getattr(args, 'max_retries', 2)
  try:
    summary = run(args)
  except BadInput as err:
    raise ConversionError(f'{printable(err.path)}: {printable(err.reason)} (--strict stops at '
                          'the first bad input)') from None
  except UnicodeDecodeError as err:
    culprit = _undecodable_argument(args)
    raise ConversionError(
        f'{printable(culprit) if culprit else "an input text file"} is not UTF-8 text '
        f'({err.reason} at byte {err.start}); save it as UTF-8') from None
  except OSError as err:  # e.g. no space left, permission denied on a file inside --out.
    raise ConversionError(printable(_os_error_text(err))) from None
  finally:
    _CLI_OPTIONS.clear()
  total = summary['total']
  logging.info('Converted %d (%d records), skipped %d (see %s); %s', total.get('converted', 0),
               total.get('records', 0), total.get('skipped', 0),
               printable(os.path.join(args.out, REJECTS_FILE)),
               json.dumps(summary['splits'], sort_keys=True))
  if not total.get('converted'):
    raise ConversionError('every item was rejected; see '
                          f'{printable(os.path.join(args.out, REJECTS_FILE))}')
  return summary


def cli_entry(run: Callable[[argparse.Namespace], dict[str, Any]],
              build_parser: Callable[[], argparse.ArgumentParser]):
  """The two entry points of a converter module: `main(argv)` for scripts and tests (returns the
  summary; a user error raises SystemExit('error: ...')), and `entry()` for `python -m`
  (parses sys.argv, logs to stderr; a user error prints one line `error: ...`, exit status 1;
  Ctrl-C exits with status 130 after stopping the workers).
  """

  def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses `argv` (without the program name) and converts; returns the summary."""
    args = build_parser().parse_args(argv)
    try:
      return cli_main(run, args)
    except cli.UserError as err:
      raise SystemExit(f'error: {" ".join(str(err).split())}') from None

  def entry() -> None:
    args = build_parser().parse_args()  # --help and usage errors: argparse's own exit status 2
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    try:
      cli.guarded(cli_main)(run, args)
    except KeyboardInterrupt:
      print('interrupted: the shards done so far are kept; rerun the same command to resume',
            file=sys.stderr, flush=True)
      raise SystemExit(EXIT_INTERRUPTED) from None

  return main, entry
