"""SSL4EO-S12 (S1 + S2) with Dynamic World labels -> TFDS dataset `ssl4eo_s12_nol`.

One record per (location, season) (docs/DESIGN.md), in TFDS array_record shards: that season's
S1 (VV, VH) and S2 (13 L1C or 12 L2A bands), the noisy label maps of ALL 4 seasons
(`season_labels`, for the smoothing prior) and this season's `clean_labels` when given, all on
the location's 10 m grid. A training sample is one season, so the loader reads one record
(1.39 MB at 264 px) instead of a whole location (4.7 MB), at random: array_record gives random
access (`tfds.builder_from_directory(OUT).as_data_source(split)`; `as_dataset()` cannot read
it). A location's 4 records are consecutive in season order, locations in sorted id order per
split, so record index = location position * 4 + season; a location is kept or rejected whole.
docs/DATA.md describes every accepted layout and option; in short:

    python -m data_prep.ssl4eo --s1 RAW/s1 --s2 RAW/s2c \
        --labels-csv NOLDO/dw_complete_ids.csv --labels-root NOLDO/dw_noisy_labels \
        --out DATA/ssl4eo_s12_nol [--workers 16] [--val-fraction 0.01] [--seed 42]

Labels: the NoLDO-S12 CSV (`ids,sub1..sub4`: the S2 acquisition of each season, labels at
`<root>/<loc:07d>/<acquisition>/label.tif`; it also lists the locations to convert), a manifest
CSV (`location,season,path`) or a pattern such as
`--labels-pattern '/dw/{location:07d}/{season}.tif'` (placeholders: location, season,
acquisition = the S2 acquisition folder name).

Seasons: the S2 acquisitions of a location in date order (or in the NoLDO CSV's order); each is
paired one to one with the S1 acquisition of the nearest date (dates from the folder names
`S1A_IW_GRDH_1SDV_<start>_...` / `<start>_<stop>_T<tile>`, else from GeoTIFF tags). Pairs more
than `--max-pair-days` apart are kept, logged and counted. `acquisition_id` holds the season's
S2 name, `s1_acquisition_id` the paired S1 name, `s2_band_names` the S2 bands in record order;
`crs`/`transform` are season 0's S2 10 m grid (a season whose grid differs from season 0 is
kept and counted as `season_grid_mismatch`).

Grids: the S2 B2 band of each season is the reference grid; its size is the tile size (taken
from the data, or `--tile-size`). Every other file is brought onto it by its own
georeferencing: read as stored when on the grid, resized by GDAL when it covers the same extent
at another pixel size, warped onto the reference pixel centres when its grid is shifted (the
release's 20/60 m grids are offset by half a coarse minus half a fine pixel). `--resampling`
(default bilinear) for bands, nearest for labels. S1 offsets up to `--max-s1-offset-px` are
accepted and counted; beyond them, or beyond `--grid-tolerance-px` for S2 and labels,
`bounds_mismatch`. Values: uint8 input (the 8-bit release) is already normalised and stored as
is; 16/32-bit input is clipped to mean +- 2 std of the L1C or L2A statistics, after removing
the +1000 DN offset of processing baseline >= 04.00 (`--s2-offset`).

Rejected (listed in rejects.csv, the run goes on unless --strict): unreadable or truncated
files, missing bands/seasons/labels, undated acquisitions, size/CRS/bounds mismatches, NaN/inf
in S2 or labels, label pixels equal to the file's nodata value, label values outside 0..8, an S1
band with no finite value. NaN/-inf elsewhere in S1 (swath borders) become 0 and are counted.

Apache Beam (beyond one machine): the builder class `data_prep.ssl4eo.Ssl4eoS12Nol` runs the same
per-location functions (`Ssl4eoConverter.convert`, then `.records`) under TFDS and writes the
same records in the same order (array_record, uncompressed; keys `record_key`, shuffling
disabled). It reads the released layout from
`--manual_dir`: `s1/`, `s2c/`, `labels/noisy_manifest.csv` (config `noisy`) and also
`labels/clean_manifest.csv` (config `noisy_clean`); other paths via `--config` JSON, e.g.
`--config '{"name": "mine", "s2_dir": "s2a", "s2_product": "L2A", "tile_size": 264,
"labels_csv": "noldo/dw_complete_ids.csv", "labels_root": "noldo/dw_noisy_labels"}'`.

    pip install apache-beam   # not in requirements.txt: it downgrades pinned protobuf/pillow
    tfds build ssl4eo_s12_nol --imports data_prep.ssl4eo --manual_dir RAW --data_dir DATA \
        --config noisy --beam_pipeline_options="runner=DirectRunner,direct_num_workers=0,\
    direct_running_mode=multi_processing"

For a cluster, name its runner instead (e.g. `runner=DataflowRunner,project=P,region=R,
temp_location=gs://B/tmp,setup_file=./setup.py`; the workers need this repository installed).

(The `tfds` command of tensorflow-datasets 4.9.10 itself needs apache-beam importable.) The same
from Python: `Ssl4eoS12Nol(data_dir=DATA, config='noisy').download_and_prepare(download_config=
tfds.download.DownloadConfig(manual_dir=RAW, beam_options=PipelineOptions([...])))`. Without
apache-beam the builder falls back to a plain Python generator (one process). The output lives
in `DATA/ssl4eo_s12_nol/noisy/1.0.0/` with TFDS's own shard sizes and without rejects.csv
(rejects are logged and counted in the Beam metric `ssl4eo/rejected`); read it with
`tfds.builder_from_directory(that folder).as_data_source(split)`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import itertools
import os
import re
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
from absl.flags import argparse_flags
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as tfds_writer

from cromss_jax import constants
from data_prep import common

DATASET_NAME = 'ssl4eo_s12_nol'
LABEL_RANGE = (0, len(constants.DW_CLASSES) - 1)
REFERENCE_BAND = 'B2'  # A 10 m band: its grid is the grid of the record.
RESAMPLING_CHOICES = ('nearest', 'bilinear', 'cubic', 'cubic_spline', 'lanczos', 'average',
                      'mode')
S2_PRODUCT_CHOICES = ('auto', 'L1C', 'L2A')
S2_OFFSET_CHOICES = ('auto', '0', '1000')
# SSL4EO-S12 folder names of the two S2 products.
PRODUCT_OF_FOLDER = {'s2c': 'L1C', 's2a': 'L2A'}
DEFAULT_MAX_PAIR_DAYS = 30.0
DEFAULT_MAX_S1_OFFSET_PX = 4.0
NOLDO_SEASON_COLUMNS = ('sub1', 'sub2', 'sub3', 'sub4')
PROBE_LOCATIONS = 20  # How many locations the tile-size / product probe may look at.


def ssl4eo_features(with_clean_labels: bool, tile_size: int = constants.TILE_SIZE,
                    s2_bands: Sequence[str] = constants.S2_BANDS) -> tfds.features.FeaturesDict:
  """Layout of one (location, season) record (docs/DESIGN.md); uint8/float64 tensors stored as
  raw bytes (TFDS's default would write uint8 as int64 varints and float64 as float32).

  A training sample is one season of one location, so it is read alone (1.39 MB at 264 px
  instead of the whole location's 4.7 MB). `season_labels` holds all T noisy label maps of the
  location, which the smoothing prior needs; this season's is season_labels[season].
  """
  t, s = constants.NUM_SEASONS, tile_size
  raw = tfds.features.Encoding.BYTES
  features = {
      's1': tfds.features.Tensor(shape=(s, s, len(constants.S1_BANDS)), dtype=np.uint8,
                                 encoding=raw),
      's2': tfds.features.Tensor(shape=(s, s, len(s2_bands)), dtype=np.uint8, encoding=raw),
      'season_labels': tfds.features.Tensor(shape=(t, s, s), dtype=np.uint8, encoding=raw),
      'location_id': tfds.features.Tensor(shape=(), dtype=np.int64),
      'season': tfds.features.Tensor(shape=(), dtype=np.int64),
      'acquisition_id': tfds.features.Tensor(shape=(), dtype=np.str_),
      's1_acquisition_id': tfds.features.Tensor(shape=(), dtype=np.str_),
      's2_band_names': tfds.features.Tensor(shape=(len(s2_bands),), dtype=np.str_),
      'crs': tfds.features.Tensor(shape=(), dtype=np.str_),
      'transform': tfds.features.Tensor(shape=(6,), dtype=np.float64, encoding=raw),
  }
  if with_clean_labels:
    features['clean_labels'] = tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding=raw)
  return tfds.features.FeaturesDict(features)


def season_records(location: Mapping[str, Any]) -> list[dict[str, Any]]:
  """A converted location ([T, ...] arrays, see `Ssl4eoConverter.convert`) -> its T records, in
  season order: within a split, record index = location position * T + season."""
  records = []
  for season in range(len(location['acquisition_ids'])):
    record = {'s1': location['s1'][season], 's2': location['s2'][season],
              'season_labels': location['season_labels'],
              'location_id': location['location_id'], 'season': np.int64(season),
              'acquisition_id': location['acquisition_ids'][season],
              's1_acquisition_id': location['s1_acquisition_ids'][season],
              's2_band_names': location['s2_band_names'], 'crs': location['crs'],
              'transform': location['transform']}
    if 'clean_labels' in location:
      record['clean_labels'] = location['clean_labels'][season]
    records.append(record)
  return records


def _read_csv(path: str) -> tuple[list[list[str]], str]:
  try:
    with open(path, 'rb') as f:
      blob = f.read()
  except OSError as err:
    raise common.ConversionError(f'cannot read label CSV {path}: {err}') from None
  return list(csv.reader(blob.decode('utf-8-sig').splitlines())), hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass(frozen=True)
class LabelSource:
  """Where the label map of (location, season) lives: a manifest, a NoLDO CSV or a pattern."""
  origin: str  # 'manifest:<path>', 'noldo:<path>' or 'pattern:<pattern>', for messages.
  pattern: str | None = None
  manifest: Mapping[tuple[int, int], str] | None = None
  # NoLDO-S12: location -> the S2 acquisition of each season; labels under `root`.
  seasons: Mapping[int, tuple[str, ...]] | None = None
  root: str = ''
  digest: str = ''

  @classmethod
  def from_manifest(cls, path: str) -> LabelSource:
    """Reads `location,season,path` rows; bad rows stop the run (they are not data errors)."""
    path = os.path.abspath(path)
    lines, digest = _read_csv(path)
    header = lines[0] if lines else []
    if not {'location', 'season', 'path'} <= set(header):
      raise common.ConversionError(
          f'{path}: header must contain location,season,path (found {header or None})')
    table: dict[tuple[int, int], str] = {}
    base = os.path.dirname(path)
    for line, values in enumerate(lines[1:], start=2):
      if not any(v.strip() for v in values):
        continue  # blank line
      if len(values) != len(header):
        raise common.ConversionError(
            f'{path}:{line}: {len(values)} columns but the header has {len(header)} '
            f'({",".join(header)}); got {",".join(values)!r}')
      row = dict(zip(header, values))
      if not row['path'].strip():
        raise common.ConversionError(f'{path}:{line}: empty path')
      try:
        key = (int(row['location']), int(row['season']))
      except (KeyError, TypeError, ValueError):
        raise common.ConversionError(f'{path}:{line}: location and season must be integers, '
                                     f'got {row}') from None
      if not 0 <= key[1] < constants.NUM_SEASONS:
        raise common.ConversionError(
            f'{path}:{line}: season {key[1]} outside 0..{constants.NUM_SEASONS - 1}')
      if key in table:
        raise common.ConversionError(f'{path}:{line}: duplicate entry for location {key[0]} '
                                     f'season {key[1]}')
      table[key] = os.path.join(base, row['path'])
    return cls(origin=f'manifest:{path}', manifest=table, digest=digest)

  @classmethod
  def from_noldo_csv(cls, path: str, root: str | None) -> LabelSource:
    """NoLDO-S12's `dw_complete_ids.csv`: `ids,sub1,sub2,sub3,sub4` per location.

    With that header (other columns, e.g. a pandas index, are ignored) or without a header
    (the last five fields of each row are ids, sub1..sub4).
    """
    path = os.path.abspath(path)
    root = os.path.abspath(root) if root else os.path.dirname(path)
    lines, digest = _read_csv(path)
    lines = [r for r in lines if any(v.strip() for v in r)]
    if not lines:
      raise common.ConversionError(f'{path}: empty label CSV')
    header = [v.strip().lower() for v in lines[0]]
    if 'ids' in header:
      missing = [c for c in NOLDO_SEASON_COLUMNS if c not in header]
      if missing:
        raise common.ConversionError(f'{path}: header has ids but lacks {missing} '
                                     f'(found {lines[0]})')
      columns = [header.index('ids')] + [header.index(c) for c in NOLDO_SEASON_COLUMNS]
      body, first_line = lines[1:], 2
    else:
      columns, body, first_line = None, lines, 1
    seasons: dict[int, tuple[str, ...]] = {}
    for line, row in enumerate(body, start=first_line):
      if columns is None:
        values = row[-5:] if len(row) >= 5 else None
      else:
        values = [row[i] if i < len(row) else '' for i in columns]
      if not values or not all(v.strip() for v in values):
        raise common.ConversionError(f'{path}:{line}: expected ids,sub1,sub2,sub3,sub4, got '
                                     f'{row}')
      try:
        location = int(values[0])
      except ValueError:
        raise common.ConversionError(f'{path}:{line}: location id {values[0]!r} is not an '
                                     'integer') from None
      if location in seasons:
        raise common.ConversionError(f'{path}:{line}: duplicate location {location}')
      seasons[location] = tuple(v.strip() for v in values[1:])
    return cls(origin=f'noldo:{path}', seasons=seasons, root=root, digest=digest)

  @classmethod
  def from_pattern(cls, pattern: str) -> LabelSource:
    pattern = os.path.abspath(pattern)
    try:
      pattern.format(location=0, season=0, acquisition='x')
    except (KeyError, IndexError, ValueError) as err:
      raise common.ConversionError(
          f'label pattern {pattern!r} is invalid ({type(err).__name__}: {err}); allowed '
          'placeholders: {location}, {season}, {acquisition}') from None
    return cls(origin=f'pattern:{pattern}', pattern=pattern)

  @classmethod
  def from_args(cls, manifest: str | None, pattern: str | None, noldo_csv: str | None = None,
                root: str | None = None) -> LabelSource | None:
    if noldo_csv:
      return cls.from_noldo_csv(noldo_csv, root)
    if manifest:
      return cls.from_manifest(manifest)
    return cls.from_pattern(pattern) if pattern else None

  @property
  def file(self) -> str:
    return self.origin.split(':', 1)[1]

  def acquisitions(self, location: int) -> tuple[str, ...] | None:
    """The S2 acquisition of each season when the source names them (NoLDO CSV)."""
    return None if self.seasons is None else self.seasons.get(location)

  def path(self, location: int, season: int, acquisition: str) -> str | None:
    if self.seasons is not None:
      return os.path.join(self.root, f'{location:07d}', acquisition, 'label.tif')
    if self.manifest is not None:
      return self.manifest.get((location, season))
    return self.pattern.format(location=location, season=season, acquisition=acquisition)

  def fingerprint(self) -> str:
    root = f' root={self.root}' if self.root else ''
    return self.origin + root + (f' sha256={self.digest}' if self.digest else '')


# ---------------------------------------------------------------------------------------------
# Acquisition dates and season pairing.

_DATE_RE = re.compile(r'(?<!\d)(\d{8})(?:T(\d{6}))?(?!\d)')
_TAG_DATE_RE = re.compile(r'(\d{4})-?(\d{2})-?(\d{2})(?:[T ](\d{2}):?(\d{2}):?(\d{2}))?')
# GeoTIFF tags that carry an acquisition (not a file-creation) time.
DATE_TAGS = ('ACQUISITION_DATE', 'DATATAKE_SENSING_START', 'SENSING_TIME', 'PRODUCT_START_TIME',
             'DATE_ACQUIRED', 'SYSTEM:TIME_START')


def date_from_name(name: str) -> datetime.datetime | None:
  """The first YYYYMMDD[THHMMSS] of a release folder name (S1: sensing start; S2: datatake)."""
  for match in _DATE_RE.finditer(name):
    text = match.group(1) + (match.group(2) or '000000')
    try:
      return datetime.datetime.strptime(text, '%Y%m%d%H%M%S')
    except ValueError:
      continue
  return None


def date_from_tags(tags: Mapping[str, str]) -> datetime.datetime | None:
  """An acquisition time from GeoTIFF metadata (ISO date or epoch milliseconds)."""
  upper = {k.upper(): v for k, v in tags.items()}
  for key in DATE_TAGS:
    value = str(upper.get(key, '')).strip()
    if not value:
      continue
    if value.isdigit() and len(value) >= 12:  # Earth Engine's system:time_start (ms).
      return datetime.datetime.fromtimestamp(int(value) / 1000, datetime.timezone.utc
                                             ).replace(tzinfo=None)
    match = _TAG_DATE_RE.search(value)
    if match:
      parts = [int(p) for p in match.groups() if p is not None]
      try:
        return datetime.datetime(*parts)
      except ValueError:
        continue
  return None


def pair_seasons(s2_dates: Sequence[datetime.datetime], s1_dates: Sequence[datetime.datetime]
                 ) -> tuple[int, ...]:
  """For each S2 acquisition, the index of its S1 partner: one to one, nearest dates.

  Minimises the summed absolute date difference (then the largest one) over all one-to-one
  assignments; with 4 seasons that is 24 candidates.
  """
  best, best_key = None, None
  for perm in itertools.permutations(range(len(s1_dates)), len(s2_dates)):
    gaps = [abs((s2_dates[i] - s1_dates[j]).total_seconds()) for i, j in enumerate(perm)]
    key = (sum(gaps), max(gaps))
    if best_key is None or key < best_key:
      best, best_key = perm, key
  return tuple(best)


def _acquisition_dirs(location_dir: str) -> list[str]:
  """The 4 acquisition folders of a location, sorted by name."""
  names = sorted(e.name for e in os.scandir(location_dir) if e.is_dir())
  if len(names) < constants.NUM_SEASONS:
    raise common.BadInput(location_dir, f'missing_season: {len(names)} acquisition folders, '
                          f'expected {constants.NUM_SEASONS}')
  if len(names) > constants.NUM_SEASONS:
    raise common.BadInput(location_dir, f'extra_season: {len(names)} acquisition folders, '
                          f'expected {constants.NUM_SEASONS}')
  return names


def _acquisition_date(folder: str, first_band: str) -> datetime.datetime:
  """Date of an acquisition folder: from its name, else from its first band's tags."""
  date = date_from_name(os.path.basename(folder))
  if date is None:
    path = os.path.join(folder, first_band)
    if os.path.isfile(path):
      date = date_from_tags(common.read_info(path).tags)
  if date is None:
    raise common.BadInput(folder, 'no_date: no acquisition date in the folder name (expected '
                          'S1x_..._<YYYYMMDDTHHMMSS>_... or <YYYYMMDDTHHMMSS>_..._T<tile>) nor '
                          f'in the tags {list(DATE_TAGS)} of {first_band}; seasons are paired '
                          'by date, never by name')
  return date


# ---------------------------------------------------------------------------------------------
# The converter.


@dataclasses.dataclass(frozen=True)
class Ssl4eoConverter(common.Converter):
  """Location id -> its T `ssl4eo_s12_nol` records, one per season (`convert` then `records`:
  the functions shared with the Beam builder)."""
  s1_root: str
  s2_root: str
  labels: LabelSource
  clean_labels: LabelSource | None = None
  resampling: str = 'bilinear'
  grid_tolerance_px: float = 0.5
  tile_size: int = constants.TILE_SIZE
  tile_size_origin: str = 'the default'  # For the size_mismatch message only.
  s2_product: str = 'L1C'
  s2_offset: str = 'auto'  # 'auto' (from the files' metadata), '0' or '1000'.
  max_pair_days: float = DEFAULT_MAX_PAIR_DAYS
  max_s1_offset_px: float = DEFAULT_MAX_S1_OFFSET_PX

  name = DATASET_NAME
  unit = 'loc'
  file_format = 'array_record'  # Random access: the loader reads single seasons at random.
  counter_names = ('non_finite_values', 'season_grid_mismatch', 'pairs_over_max_days',
                   's1_offset_resampled', 's2_shifted_grid_bands', 'labels_resampled',
                   's2_offset_removed', 's2_uint8_seasons', 's1_uint8_seasons')

  def __post_init__(self):
    if self.s2_product not in constants.S2_PRODUCTS:
      raise common.ConversionError(f's2_product must be one of {sorted(constants.S2_PRODUCTS)}, '
                                   f'got {self.s2_product!r}')
    if self.s2_offset not in S2_OFFSET_CHOICES:
      raise common.ConversionError(f'--s2-offset must be one of {S2_OFFSET_CHOICES}, got '
                                   f'{self.s2_offset!r}')
    if self.tile_size < 1:
      raise common.ConversionError(f'--tile-size must be >= 1, got {self.tile_size}')

  @property
  def s2_bands(self) -> tuple[str, ...]:
    return constants.S2_PRODUCTS[self.s2_product][0]

  def features(self) -> tfds.features.FeaturesDict:
    return ssl4eo_features(self.clean_labels is not None, self.tile_size, self.s2_bands)

  def item_name(self, item: Any) -> str:
    return str(item)

  def records(self, example: dict[str, Any]) -> list[dict[str, Any]]:
    return season_records(example)

  def fingerprint(self) -> dict[str, Any]:
    return {'s1': os.path.abspath(self.s1_root), 's2': os.path.abspath(self.s2_root),
            'labels': self.labels.fingerprint(),
            'clean_labels': self.clean_labels.fingerprint() if self.clean_labels else None,
            'resampling': self.resampling, 'grid_tolerance_px': self.grid_tolerance_px,
            'tile_size': self.tile_size, 's2_product': self.s2_product,
            's2_offset': self.s2_offset, 'max_pair_days': self.max_pair_days,
            'max_s1_offset_px': self.max_s1_offset_px}

  def _read_label(self, source: LabelSource, location: int, season: int, acquisition: str,
                  ref: common.RasterInfo, counters: dict[str, int]) -> np.ndarray:
    path = source.path(location, season, acquisition)
    if path is None:
      raise common.BadInput(source.file,
                            f'missing_label: no entry for location {location} season {season}')
    data, info, alignment = common.read_onto_grid(
        path, ref, what='label', ref_what='S2 B2', resampling='nearest',
        tolerance_px=self.grid_tolerance_px)
    if not alignment.on_grid:
      counters['labels_resampled'] += 1
    return common.check_labels(data, info, LABEL_RANGE)

  def _seasons(self, location: int, folder: str) -> tuple[list[str], list[str], list[float]]:
    """(S2 acquisitions in season order, their S1 partners, date gaps in days)."""
    s2_loc, s1_loc = os.path.join(self.s2_root, folder), os.path.join(self.s1_root, folder)
    listed = self.labels.acquisitions(location)
    if listed is not None:
      for acq in listed:
        if not os.path.isdir(os.path.join(s2_loc, acq)):
          raise common.BadInput(os.path.join(s2_loc, acq), 'missing_season: acquisition listed '
                                f'in {self.labels.file} does not exist')
      s2_acqs = list(listed)
      s2_dates = [_acquisition_date(os.path.join(s2_loc, a), REFERENCE_BAND + '.tif')
                  for a in s2_acqs]
    else:
      names = _acquisition_dirs(s2_loc)
      s2_dates = [_acquisition_date(os.path.join(s2_loc, a), REFERENCE_BAND + '.tif')
                  for a in names]
      order = sorted(range(len(names)), key=lambda i: (s2_dates[i], names[i]))
      s2_acqs, s2_dates = [names[i] for i in order], [s2_dates[i] for i in order]
    s1_names = _acquisition_dirs(s1_loc)
    s1_dates = [_acquisition_date(os.path.join(s1_loc, a), constants.S1_BANDS[0] + '.tif')
                for a in s1_names]
    partner = pair_seasons(s2_dates, s1_dates)
    s1_acqs = [s1_names[j] for j in partner]
    gaps = [abs((s2_dates[i] - s1_dates[j]).total_seconds()) / 86400
            for i, j in enumerate(partner)]
    return s2_acqs, s1_acqs, gaps

  def _reference(self, path: str) -> tuple[np.ndarray, common.RasterInfo]:
    info = common.read_info(path)
    if info.shape != (self.tile_size, self.tile_size):
      raise common.BadInput(path, f'size_mismatch: S2 {REFERENCE_BAND} is {info.shape[0]}x'
                            f'{info.shape[1]} px but the tiles of this dataset are '
                            f'{self.tile_size}x{self.tile_size} px ({self.tile_size_origin}); '
                            'convert tiles of another size into their own dataset')
    return common.read_raster(path, count=1)

  def _s2_season(self, s2_dir: str, counters: dict[str, int]
                 ) -> tuple[np.ndarray, common.RasterInfo]:
    """The season's S2 bands as uint8 [H, W, bands] and the reference grid."""
    bands, mean, std = constants.S2_PRODUCTS[self.s2_product]
    ref_path = os.path.join(s2_dir, REFERENCE_BAND + '.tif')
    ref_data, ref = self._reference(ref_path)
    common.check_finite(ref_data, ref_path, f'S2 {REFERENCE_BAND}')
    out = np.empty((*ref.shape, len(bands)), np.uint8)
    uint8_bands, offset_removed = 0, False
    for i, band in enumerate(bands):
      path = os.path.join(s2_dir, band + '.tif')
      if band == REFERENCE_BAND:
        data, info = ref_data[0], ref
      else:
        data, info, alignment = common.read_onto_grid(
            path, ref, what=f'S2 {band}', ref_what=f'S2 {REFERENCE_BAND}',
            resampling=self.resampling, tolerance_px=self.grid_tolerance_px)
        common.check_finite(data, path, f'S2 {band}')
        if not alignment.same_extent:
          counters['s2_shifted_grid_bands'] += 1
      if info.dtype == 'uint8':  # The 8-bit release: normalised already.
        out[..., i] = np.clip(np.rint(data), 0, 255).astype(np.uint8)
        uint8_bands += 1
        continue
      shift = (common.s2_dn_offset(info) if self.s2_offset == 'auto'
               else float(self.s2_offset))
      offset_removed |= shift != 0
      x = data.astype(np.float64)[..., None] - shift
      out[..., i] = constants.normalise_to_uint8(x, mean[i:i + 1], std[i:i + 1])[0][..., 0]
    counters['s2_offset_removed'] += int(offset_removed)
    counters['s2_uint8_seasons'] += int(uint8_bands == len(bands))
    return out, ref

  def _s1_season(self, s1_dir: str, ref: common.RasterInfo, counters: dict[str, int]
                 ) -> np.ndarray:
    out, uint8_bands, shifted = [], 0, False
    for band in constants.S1_BANDS:
      path = os.path.join(s1_dir, band + '.tif')
      data, info, alignment = common.read_onto_grid(
          path, ref, what=f'S1 {band}', ref_what=f'S2 {REFERENCE_BAND}',
          resampling=self.resampling, tolerance_px=self.grid_tolerance_px,
          max_offset_px=self.max_s1_offset_px)
      shifted |= alignment.shifted
      common.check_not_all_non_finite(data, path, f'S1 {band}')
      out.append((data, info.dtype))
    counters['s1_offset_resampled'] += int(shifted)
    result = np.empty((*ref.shape, len(out)), np.uint8)
    for i, (data, dtype) in enumerate(out):
      if dtype == 'uint8':
        result[..., i] = np.clip(np.rint(data), 0, 255).astype(np.uint8)
        uint8_bands += 1
      else:
        band, bad = constants.normalise_to_uint8(data[..., None], constants.S1_MEAN[i:i + 1],
                                                 constants.S1_STD[i:i + 1])
        result[..., i] = band[..., 0]
        counters['non_finite_values'] += bad
    counters['s1_uint8_seasons'] += int(uint8_bands == len(out))
    return result

  def convert(self, item: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """The whole location, [T, ...] arrays (s1, s2, season_labels, clean_labels) and per-season
    lists (acquisition_ids, s1_acquisition_ids); `records` splits it into seasons. A location is
    kept or rejected whole, so every location written has all T seasons."""
    location = int(item)
    tile, seasons = self.tile_size, constants.NUM_SEASONS
    folder = f'{location:07d}'
    for root in (self.s2_root, self.s1_root):  # A one-sided location: say which side lacks it.
      if not os.path.isdir(os.path.join(root, folder)):
        raise common.BadInput(os.path.join(root, folder),
                              'missing_location: directory does not exist')
    s2_acqs, s1_acqs, gaps = self._seasons(location, folder)
    counters = dict.fromkeys(self.counter_names, 0)
    for s2_acq, s1_acq, gap in zip(s2_acqs, s1_acqs, gaps):
      if gap > self.max_pair_days:
        counters['pairs_over_max_days'] += 1
        logging.warning('Location %s: S2 %s and S1 %s are %.1f days apart (> --max-pair-days '
                        '%g).', folder, s2_acq, s1_acq, gap, self.max_pair_days)
    s1 = np.empty((seasons, tile, tile, len(constants.S1_BANDS)), np.uint8)
    s2 = np.empty((seasons, tile, tile, len(self.s2_bands)), np.uint8)
    labels = np.empty((seasons, tile, tile), np.uint8)
    clean = np.empty_like(labels) if self.clean_labels else None
    grid0 = None
    for season, (s1_acq, s2_acq) in enumerate(zip(s1_acqs, s2_acqs)):
      s2[season], ref = self._s2_season(os.path.join(self.s2_root, folder, s2_acq), counters)
      s1[season] = self._s1_season(os.path.join(self.s1_root, folder, s1_acq), ref, counters)
      labels[season] = self._read_label(self.labels, location, season, s2_acq, ref, counters)
      if clean is not None:
        clean[season] = self._read_label(self.clean_labels, location, season, s2_acq, ref,
                                         counters)
      if grid0 is None:
        grid0 = ref
      elif not common.grids_agree(ref, grid0, self.grid_tolerance_px):
        counters['season_grid_mismatch'] += 1
    example = {'s1': s1, 's2': s2, 'season_labels': labels, 'location_id': np.int64(location),
               'acquisition_ids': list(s2_acqs), 's1_acquisition_ids': list(s1_acqs),
               's2_band_names': list(self.s2_bands), 'crs': grid0.crs.to_string(),
               'transform': np.asarray(grid0.transform, np.float64)}
    if clean is not None:
      example['clean_labels'] = clean
    return example, counters


# ---------------------------------------------------------------------------------------------
# Locations, splits and what the data says about itself.


def discover_locations(s1_root: str, s2_root: str) -> list[int]:
  """Sorted ids of all numeric location folders under S1 or S2 (one-sided ones get rejected)."""
  ids = set()
  for root in (s1_root, s2_root):
    if not os.path.isdir(root):
      raise common.ConversionError(f'{root} is not a directory')
    ids.update(int(e.name) for e in os.scandir(root) if e.name.isdigit() and e.is_dir())
  return sorted(ids)


def _probe_acquisitions(s2_root: str, ids: Sequence[int]) -> Iterator[str]:
  """Acquisition folders of the first locations, for the tile-size and product probes."""
  for location in ids[:PROBE_LOCATIONS]:
    folder = os.path.join(s2_root, f'{location:07d}')
    if os.path.isdir(folder):
      for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if e.is_dir():
          yield e.path


def detect_tile_size(s2_root: str, ids: Sequence[int]) -> tuple[int, str]:
  """(tile size, where it came from): the S2 B2 size of the first location that has one."""
  for acq in _probe_acquisitions(s2_root, ids):
    path = os.path.join(acq, REFERENCE_BAND + '.tif')
    if os.path.isfile(path):
      try:
        info = common.read_info(path)
      except common.BadInput:
        continue
      return info.shape[0], f'the size of {path}'
  raise common.ConversionError(
      f'cannot tell the tile size: no readable {REFERENCE_BAND}.tif in the first '
      f'{PROBE_LOCATIONS} locations under {s2_root}; give --tile-size')


def detect_s2_product(s2_root: str, ids: Sequence[int]) -> tuple[str, str]:
  """(L1C or L2A, why): the release's folder name (s2c / s2a), else whether B10.tif exists."""
  base = os.path.basename(os.path.normpath(s2_root)).lower()
  if base in PRODUCT_OF_FOLDER:
    return PRODUCT_OF_FOLDER[base], f'folder name {base!r}'
  for acq in _probe_acquisitions(s2_root, ids):
    if os.path.isfile(os.path.join(acq, 'B10.tif')):
      return 'L1C', f'{acq} has B10.tif'
    if os.path.isfile(os.path.join(acq, REFERENCE_BAND + '.tif')):
      return 'L2A', f'{acq} has no B10.tif'
  raise common.ConversionError(f'cannot tell whether {s2_root} holds L1C or L2A: no band files '
                               f'in the first {PROBE_LOCATIONS} locations; give --s2-product')


def split_locations(ids: Sequence[int], val_fraction: float, seed: int) -> dict[str, list[int]]:
  """Validation = round-half-up(val_fraction * n) locations, >= 1 (and train >= 1) when n >= 2.

  Chosen by a seeded permutation of the sorted ids, so it depends on nothing but ids and args.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise common.ConversionError(f'--val-fraction must be in [0, 1), got {val_fraction}')
  ids = sorted(ids)
  n = len(ids)
  n_val = 0 if n < 2 else min(max(int(np.floor(val_fraction * n + 0.5)), 1), n - 1)
  perm = np.random.default_rng(seed).permutation(n)
  val = {ids[i] for i in perm[:n_val]}
  return {'train': [i for i in ids if i not in val], 'validation': [i for i in ids if i in val]}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse_flags.ArgumentParser(description=__doc__.split('\n', 1)[0],
                                         inherited_absl_flags=None)
  parser.add_argument('--s1', required=True, help='S1 root: <loc:07d>/<acq>/{VV,VH}.tif')
  parser.add_argument('--s2', required=True,
                      help='S2 root (s2c = L1C, s2a = L2A): <loc:07d>/<acq>/B1.tif..B12.tif')
  labels = parser.add_mutually_exclusive_group(required=True)
  labels.add_argument('--labels-csv', help='NoLDO-S12 label CSV (ids,sub1..sub4); labels at '
                      '<--labels-root>/<loc:07d>/<acquisition>/label.tif. Also selects the '
                      'locations and the S2 acquisition of each season.')
  labels.add_argument('--labels', help='Noisy label manifest CSV (location,season,path).')
  labels.add_argument('--labels-pattern', help='Noisy label path pattern, e.g. '
                      "'/dw/{location:07d}/{season}.tif' (also {acquisition}).")
  parser.add_argument('--labels-root', help='Folder of the NoLDO-S12 labels (default: the '
                      "folder of --labels-csv).")
  clean = parser.add_mutually_exclusive_group()
  clean.add_argument('--clean-labels', help='Optional clean label manifest CSV.')
  clean.add_argument('--clean-labels-pattern', help='Optional clean label path pattern.')
  parser.add_argument('--val-fraction', type=float, default=0.01,
                      help='Share of locations held out as the validation split (>= 1 of them).')
  parser.add_argument('--seed', type=int, default=42,
                      help='Seed of the permutation that picks the validation locations.')
  parser.add_argument('--resampling', default='bilinear', choices=RESAMPLING_CHOICES,
                      help='rasterio Resampling used to bring 20/60 m bands (and shifted S1) '
                           'onto the 10 m grid; labels always use nearest.')
  parser.add_argument('--tile-size', type=int, default=None,
                      help='Tile size in 10 m pixels (default: the S2 B2 size of the first '
                           'location); locations of another size are rejected.')
  parser.add_argument('--s2-product', default='auto', choices=S2_PRODUCT_CHOICES,
                      help='L1C (13 bands) or L2A (12 bands, no B10); auto: s2c/s2a folder '
                           'name, else whether B10.tif exists.')
  parser.add_argument('--s2-offset', default='auto', choices=S2_OFFSET_CHOICES,
                      help='DN offset removed from raw S2 bands before normalising (processing '
                           'baseline >= 04.00 adds 1000); auto: from each file\'s metadata '
                           '(*ADD_OFFSET, GDAL offset/scale, PROCESSING_BASELINE), else 0.')
  parser.add_argument('--max-pair-days', type=float, default=DEFAULT_MAX_PAIR_DAYS,
                      help='S1/S2 pairs further apart (days) are logged and counted.')
  parser.add_argument('--max-s1-offset-px', type=float, default=DEFAULT_MAX_S1_OFFSET_PX,
                      help='Largest S1 offset from the S2 grid (10 m pixels) that is resampled '
                           'by georeferencing and counted instead of rejected.')
  common.add_shared_arguments(parser)
  return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Converts as the parsed command line says; returns the conversion summary."""
  if args.labels_root and not args.labels_csv:
    raise common.ConversionError('--labels-root only applies to --labels-csv')
  s1_root, s2_root = os.path.abspath(args.s1), os.path.abspath(args.s2)
  labels = LabelSource.from_args(args.labels, args.labels_pattern, args.labels_csv,
                                 args.labels_root)
  ids = discover_locations(s1_root, s2_root)
  if labels.seasons is not None:
    ids = sorted(labels.seasons)  # NoLDO-S12 labels exist for a subset of the locations.
  if args.limit is not None:
    ids = ids[:args.limit]
  if args.tile_size is not None:
    tile_size, tile_origin = args.tile_size, '--tile-size'
  else:
    tile_size, tile_origin = detect_tile_size(s2_root, ids)
  if args.s2_product != 'auto':
    product, why = args.s2_product, '--s2-product'
  else:
    product, why = detect_s2_product(s2_root, ids)
  logging.info('S2 %s (%d bands, from %s), %dx%d px tiles (from %s).', product,
               len(constants.S2_PRODUCTS[product][0]), why, tile_size, tile_size, tile_origin)
  converter = Ssl4eoConverter(
      s1_root=s1_root, s2_root=s2_root, labels=labels,
      clean_labels=LabelSource.from_args(args.clean_labels, args.clean_labels_pattern),
      resampling=args.resampling, grid_tolerance_px=args.grid_tolerance_px,
      tile_size=tile_size, tile_size_origin=tile_origin, s2_product=product,
      s2_offset=args.s2_offset, max_pair_days=args.max_pair_days,
      max_s1_offset_px=args.max_s1_offset_px)
  splits = split_locations(ids, args.val_fraction, args.seed)
  logging.info('%d locations: %d train, %d validation', len(ids), len(splits['train']),
               len(splits['validation']))
  return common.run_conversion(
      converter, splits, args.out, examples_per_shard=args.examples_per_shard,
      workers=args.workers, strict=args.strict, overwrite=args.overwrite,
      plan_args={'val_fraction': args.val_fraction, 'seed': args.seed, 'limit': args.limit},
      description=f'SSL4EO-S12 S1+S2 {product} with Dynamic World labels (CromSS '
                  'pretraining), converted by data_prep.ssl4eo.')


main, _entry = common.cli_entry(run, build_parser)


# ---------------------------------------------------------------------------------------------
# TFDS builder (Apache Beam when installed), sharing Ssl4eoConverter.convert.


@dataclasses.dataclass
class Ssl4eoBuilderConfig(tfds.core.BuilderConfig):
  """Raw layout under --manual_dir (relative paths) and the split/resampling settings.

  The record shape is fixed by the config (no probing): `tile_size` and `s2_product`.
  """
  s1_dir: str = 's1'
  s2_dir: str = 's2c'
  labels_manifest: str = 'labels/noisy_manifest.csv'
  labels_pattern: str = ''
  labels_csv: str = ''
  labels_root: str = ''
  clean_labels_manifest: str = ''
  clean_labels_pattern: str = ''
  val_fraction: float = 0.01
  seed: int = 42
  resampling: str = 'bilinear'
  grid_tolerance_px: float = 0.5
  tile_size: int = constants.TILE_SIZE
  s2_product: str = 'L1C'
  s2_offset: str = 'auto'
  max_pair_days: float = DEFAULT_MAX_PAIR_DAYS
  max_s1_offset_px: float = DEFAULT_MAX_S1_OFFSET_PX


def record_key(location: int, season: int) -> int:
  """The TFDS key of a record: with shuffling disabled TFDS writes records in key order, so
  location-major, season-minor as the converter writes them (index = position * T + season)."""
  return location * constants.NUM_SEASONS + season


def _examples_of(converter: Ssl4eoConverter, location: int) -> Iterator[tuple[int, dict]]:
  """T (key, record) pairs or none; a bad location is logged and counted, not fatal."""
  try:
    example, _ = converter.convert(location)
  except common.BadInput as err:
    logging.warning('Skipping location %d: %s', location, err)
    try:
      import apache_beam as beam  # pylint: disable=g-import-not-at-top
      beam.metrics.Metrics.counter('ssl4eo', 'rejected').inc()
    except ImportError:
      pass
    return
  for record in converter.records(example):
    yield record_key(location, int(record['season'])), record


def _iter_examples(converter: Ssl4eoConverter,
                   locations: Sequence[int]) -> Iterator[tuple[int, dict]]:
  for location in locations:
    yield from _examples_of(converter, location)


class _UncompressedArrayRecordWriter(tfds_writer.ExampleWriter):
  """TFDS's array_record writer uses zstd; the loader reads uncompressed records 2-3x faster."""

  def write(self, path: Any, examples: Any) -> None:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    writer = array_record_module.ArrayRecordWriter(os.fspath(path), common.ARRAY_RECORD_OPTIONS)
    try:
      for _, serialized in examples:
        writer.write(serialized)
    finally:
      writer.close()


class Ssl4eoS12Nol(tfds.core.GeneratorBasedBuilder,
                   skip_registration=__name__ in ('__main__', '__mp_main__')):
  """TFDS builder for `tfds build` (Beam-parallel when apache-beam is installed).

  Writes what the converter writes: array_record shards (unless `file_format` says otherwise),
  T records per location in key order (`record_key`, shuffling disabled).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      Ssl4eoBuilderConfig(name='noisy', description='Noisy Dynamic World labels only.'),
      Ssl4eoBuilderConfig(name='noisy_clean', description='Noisy and clean labels.',
                          clean_labels_manifest='labels/clean_manifest.csv'),
  ]
  # TFDS looks for the builder's folder (checksums.tsv) through `importlib_resources`, which
  # the pinned stack does not install; pointing it at this file avoids that lookup.
  code_path = tfds.core.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Place SSL4EO-S12 under manual_dir as s1/<loc:07d>/<acq>/{VV,VH}.tif and '
      's2c/<loc:07d>/<acq>/B*.tif, and the label manifest(s) under labels/.')

  def __init__(self, *, file_format: str | tfds.core.FileFormat | None = None, **kwargs: Any):
    # tensorflow-datasets 4.9.10 has no per-builder default format: TFRecord unless given.
    super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=ssl4eo_features(bool(cfg.clean_labels_manifest or cfg.clean_labels_pattern),
                                 cfg.tile_size, constants.S2_PRODUCTS[cfg.s2_product][0]),
        description='SSL4EO-S12 S1+S2 with Dynamic World labels (CromSS pretraining).',
        disable_shuffling=True)  # Record index = location position * T + season.

  def _example_writer(self) -> tfds_writer.ExampleWriter:
    if self.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
      return _UncompressedArrayRecordWriter(file_format=self.info.file_format)
    return super()._example_writer()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    cfg = self.builder_config
    root = os.fspath(dl_manager.manual_dir)

    def source(manifest: str, pattern: str, noldo: str = '') -> LabelSource | None:
      return LabelSource.from_args(manifest and os.path.join(root, manifest),
                                   pattern and os.path.join(root, pattern),
                                   noldo and os.path.join(root, noldo),
                                   cfg.labels_root and os.path.join(root, cfg.labels_root))

    if cfg.labels_csv:
      labels = source('', '', cfg.labels_csv)
    elif cfg.labels_pattern:
      labels = source('', cfg.labels_pattern)
    else:
      labels = source(cfg.labels_manifest, '')
    converter = Ssl4eoConverter(
        s1_root=os.path.join(root, cfg.s1_dir), s2_root=os.path.join(root, cfg.s2_dir),
        labels=labels, clean_labels=source(cfg.clean_labels_manifest, cfg.clean_labels_pattern),
        resampling=cfg.resampling, grid_tolerance_px=cfg.grid_tolerance_px,
        tile_size=cfg.tile_size, tile_size_origin='the builder config', s2_product=cfg.s2_product,
        s2_offset=cfg.s2_offset, max_pair_days=cfg.max_pair_days,
        max_s1_offset_px=cfg.max_s1_offset_px)
    ids = discover_locations(converter.s1_root, converter.s2_root)
    if labels.seasons is not None:
      ids = sorted(labels.seasons)
    splits = split_locations(ids, cfg.val_fraction, cfg.seed)
    return {name: self._generate_examples(converter, locations)
            for name, locations in splits.items() if locations}

  def _generate_examples(self, converter: Ssl4eoConverter, locations: Sequence[int]) -> Any:
    try:
      import apache_beam as beam  # pylint: disable=g-import-not-at-top
    except ImportError:
      return _iter_examples(converter, locations)
    return beam.Create(list(locations)) | beam.FlatMap(_examples_of, converter)


if __name__ == '__main__':
  # Run the importable module's entry so that pickled objects name `data_prep.ssl4eo`.
  from data_prep import ssl4eo as _ssl4eo  # pylint: disable=g-import-not-at-top
  _ssl4eo._entry()  # pylint: disable=protected-access
