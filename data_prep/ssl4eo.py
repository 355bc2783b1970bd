"""SSL4EO-S12 (S1 + S2) with Dynamic World labels -> TFDS dataset `ssl4eo_s12_nol`.

One example per location (docs/DESIGN.md): 4 seasons of S1 (VV, VH), S2 (13 bands) and the
noisy label map (plus `clean_labels` when given), all on the location's 10 m 264x264 grid.

    python -m data_prep.ssl4eo --s1 RAW/s1 --s2 RAW/s2c \
        --labels RAW/labels/noisy_manifest.csv [--clean-labels RAW/labels/clean_manifest.csv] \
        --out DATA/ssl4eo_s12_nol [--workers 16] [--val-fraction 0.01] [--seed 42]

Labels come from a manifest CSV (`location,season,path`; relative paths resolve against the
manifest's folder) or from a pattern such as `--labels-pattern '/dw/{location:07d}/{season}.tif'`
(placeholders: location, season, acquisition = the S2 acquisition folder name).

Seasons: a location has 4 acquisition folders under S1 and under S2; season t is the t-th folder
in sorted order (S1 and S2 folder names differ, so they are paired by that order).
`acquisition_ids` stores the S2 folder names; `crs`/`transform` are season 0's S2 10 m grid
(a season whose grid differs from season 0 is kept and counted as `season_grid_mismatch`).

Resampling: every band is read with rasterio at `out_shape=(264, 264)` using `--resampling`
(default bilinear, i.e. GDAL's RasterIO interpolation with pixel centres aligned; 20 m bands are
upsampled x2, 60 m bands x6). GDAL interpolates in the band's own dtype, so uint16 reflectance
is rounded to whole digital numbers before the SPEC §2.2 normalisation (far below one uint8
step). 10 m bands and labels are read as stored. The S2 B2 band of each season is the
reference grid: every other file must have the same CRS and bounds within `--grid-tolerance-px`
(default half a 10 m pixel) and its expected native size (264, 132 or 44 px).

Rejected (listed in rejects.csv, the run goes on unless --strict): unreadable or truncated
files, missing bands/seasons/labels, size/CRS/bounds mismatches, NaN/inf in S2 or labels, label
pixels equal to the file's nodata value, label values outside 0..8, an S1 band with no finite
value. NaN/-inf elsewhere in S1 (swath borders) become 0 and are counted (`non_finite_values`).

Apache Beam (beyond one machine): the builder class `data_prep.ssl4eo.Ssl4eoS12Nol` runs the same
per-location function (`Ssl4eoConverter.convert`) under TFDS. It reads the released layout from
`--manual_dir`: `s1/`, `s2c/`, `labels/noisy_manifest.csv` (config `noisy`) and also
`labels/clean_manifest.csv` (config `noisy_clean`); other paths via `--config` JSON, e.g.
`--config '{"name": "mine", "s2_dir": "s2", "labels_pattern": "/dw/{location:07d}/{season}.tif"}'`.

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
(rejects are logged and counted in the Beam metric `ssl4eo/rejected`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import os
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
from absl.flags import argparse_flags
import numpy as np
import tensorflow_datasets as tfds

from cromss_jax import constants
from data_prep import common

DATASET_NAME = 'ssl4eo_s12_nol'
LABEL_RANGE = (0, len(constants.DW_CLASSES) - 1)
REFERENCE_BAND = 'B2'  # A 10 m band: its grid is the grid of the record.
RESAMPLING_CHOICES = ('nearest', 'bilinear', 'cubic', 'cubic_spline', 'lanczos', 'average',
                      'mode')


def ssl4eo_features(with_clean_labels: bool) -> tfds.features.FeaturesDict:
  """Record layout of docs/DESIGN.md; uint8/float64 tensors stored as raw bytes.

  (TFDS's default would write uint8 as int64 varints and float64 as float32.)
  """
  t, s = constants.NUM_SEASONS, constants.TILE_SIZE
  raw = tfds.features.Encoding.BYTES
  features = {
      's1': tfds.features.Tensor(shape=(t, s, s, len(constants.S1_BANDS)), dtype=np.uint8,
                                 encoding=raw),
      's2': tfds.features.Tensor(shape=(t, s, s, len(constants.S2_BANDS)), dtype=np.uint8,
                                 encoding=raw),
      'labels': tfds.features.Tensor(shape=(t, s, s), dtype=np.uint8, encoding=raw),
      'location_id': tfds.features.Tensor(shape=(), dtype=np.int64),
      'acquisition_ids': tfds.features.Tensor(shape=(t,), dtype=np.str_),
      'crs': tfds.features.Tensor(shape=(), dtype=np.str_),
      'transform': tfds.features.Tensor(shape=(6,), dtype=np.float64, encoding=raw),
  }
  if with_clean_labels:
    features['clean_labels'] = tfds.features.Tensor(shape=(t, s, s), dtype=np.uint8,
                                                    encoding=raw)
  return tfds.features.FeaturesDict(features)


@dataclasses.dataclass(frozen=True)
class LabelSource:
  """Where the label map of (location, season) lives: a manifest table or a path pattern."""
  origin: str  # 'manifest:<path>' or 'pattern:<pattern>', for messages and the fingerprint.
  pattern: str | None = None
  manifest: Mapping[tuple[int, int], str] | None = None
  digest: str = ''

  @classmethod
  def from_manifest(cls, path: str) -> LabelSource:
    """Reads `location,season,path` rows; bad rows stop the run (they are not data errors)."""
    path = os.path.abspath(path)
    try:
      with open(path, 'rb') as f:
        blob = f.read()
    except OSError as err:
      raise common.ConversionError(f'cannot read label manifest {path}: {err}') from None
    rows = csv.DictReader(blob.decode('utf-8-sig').splitlines())
    if not {'location', 'season', 'path'} <= set(rows.fieldnames or ()):
      raise common.ConversionError(
          f'{path}: header must contain location,season,path (found {rows.fieldnames})')
    table: dict[tuple[int, int], str] = {}
    base = os.path.dirname(path)
    for line, row in enumerate(rows, start=2):
      try:
        key = (int(row['location']), int(row['season']))
      except (TypeError, ValueError):
        raise common.ConversionError(f'{path}:{line}: location and season must be integers, '
                                     f'got {row}') from None
      if not 0 <= key[1] < constants.NUM_SEASONS:
        raise common.ConversionError(
            f'{path}:{line}: season {key[1]} outside 0..{constants.NUM_SEASONS - 1}')
      if key in table:
        raise common.ConversionError(f'{path}:{line}: duplicate entry for location {key[0]} '
                                     f'season {key[1]}')
      table[key] = os.path.join(base, row['path'])
    return cls(origin=f'manifest:{path}', manifest=table,
               digest=hashlib.sha256(blob).hexdigest())

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
  def from_args(cls, manifest: str | None, pattern: str | None) -> LabelSource | None:
    if manifest:
      return cls.from_manifest(manifest)
    return cls.from_pattern(pattern) if pattern else None

  def path(self, location: int, season: int, acquisition: str) -> str | None:
    if self.manifest is not None:
      return self.manifest.get((location, season))
    return self.pattern.format(location=location, season=season, acquisition=acquisition)

  def fingerprint(self) -> str:
    return self.origin + (f' sha256={self.digest}' if self.digest else '')


def _acquisition_dirs(location_dir: str) -> list[str]:
  """The 4 acquisition folders of a location, sorted (position = season)."""
  names = sorted(e.name for e in os.scandir(location_dir) if e.is_dir())
  if len(names) < constants.NUM_SEASONS:
    raise common.BadInput(location_dir, f'missing_season: {len(names)} acquisition folders, '
                          f'expected {constants.NUM_SEASONS}')
  if len(names) > constants.NUM_SEASONS:
    raise common.BadInput(location_dir, f'extra_season: {len(names)} acquisition folders, '
                          f'expected {constants.NUM_SEASONS}')
  return names


@dataclasses.dataclass(frozen=True)
class Ssl4eoConverter(common.Converter):
  """Location id -> one `ssl4eo_s12_nol` example (the function shared with the Beam builder)."""
  s1_root: str
  s2_root: str
  labels: LabelSource
  clean_labels: LabelSource | None = None
  resampling: str = 'bilinear'
  grid_tolerance_px: float = 0.5

  name = DATASET_NAME
  unit = 'loc'
  counter_names = ('non_finite_values', 'season_grid_mismatch')

  def features(self) -> tfds.features.FeaturesDict:
    return ssl4eo_features(self.clean_labels is not None)

  def item_name(self, item: Any) -> str:
    return str(item)

  def fingerprint(self) -> dict[str, Any]:
    return {'s1': os.path.abspath(self.s1_root), 's2': os.path.abspath(self.s2_root),
            'labels': self.labels.fingerprint(),
            'clean_labels': self.clean_labels.fingerprint() if self.clean_labels else None,
            'resampling': self.resampling, 'grid_tolerance_px': self.grid_tolerance_px}

  def _read_label(self, source: LabelSource, location: int, season: int, acquisition: str,
                  ref: common.RasterInfo) -> np.ndarray:
    path = source.path(location, season, acquisition)
    if path is None:
      raise common.BadInput(source.origin.split(':', 1)[1],
                            f'missing_label: no entry for location {location} season {season}')
    data, info = common.read_raster(path, count=1, native_shape=ref.shape)
    common.check_same_grid(info, ref, self.grid_tolerance_px)
    return common.check_labels(data[0], info, LABEL_RANGE)

  def convert(self, item: Any) -> tuple[dict[str, Any], dict[str, int]]:
    location = int(item)
    tile, seasons = constants.TILE_SIZE, constants.NUM_SEASONS
    folder = f'{location:07d}'
    for root in (self.s2_root, self.s1_root):  # A one-sided location: say which side lacks it.
      if not os.path.isdir(os.path.join(root, folder)):
        raise common.BadInput(os.path.join(root, folder),
                              'missing_location: directory does not exist')
    s1_acqs = _acquisition_dirs(os.path.join(self.s1_root, folder))
    s2_acqs = _acquisition_dirs(os.path.join(self.s2_root, folder))
    s1 = np.empty((seasons, tile, tile, len(constants.S1_BANDS)), np.uint8)
    s2 = np.empty((seasons, tile, tile, len(constants.S2_BANDS)), np.uint8)
    labels = np.empty((seasons, tile, tile), np.uint8)
    clean = np.empty_like(labels) if self.clean_labels else None
    non_finite, season_mismatch, grid0 = 0, 0, None
    for season, (s1_acq, s2_acq) in enumerate(zip(s1_acqs, s2_acqs)):
      s2_dir = os.path.join(self.s2_root, folder, s2_acq)
      bands, infos = [], []
      for band, res in zip(constants.S2_BANDS, constants.S2_RESOLUTION_M):
        native = tile * 10 // res
        path = os.path.join(s2_dir, band + '.tif')
        data, info = common.read_raster(path, count=1, native_shape=(native, native),
                                        out_shape=(tile, tile), resampling=self.resampling)
        common.check_finite(data, path, f'S2 {band}')
        bands.append(data[0])
        infos.append(info)
      ref = infos[constants.S2_BANDS.index(REFERENCE_BAND)]
      for info in [ref] + infos:  # ref first: a missing CRS is reported on the reference.
        common.check_same_grid(info, ref, self.grid_tolerance_px)
      s1_bands = []
      for band in constants.S1_BANDS:
        path = os.path.join(self.s1_root, folder, s1_acq, band + '.tif')
        data, info = common.read_raster(path, count=1, native_shape=(tile, tile))
        common.check_same_grid(info, ref, self.grid_tolerance_px)
        common.check_not_all_non_finite(data, path, f'S1 {band}')
        s1_bands.append(data[0])
      labels[season] = self._read_label(self.labels, location, season, s2_acq, ref)
      if clean is not None:
        clean[season] = self._read_label(self.clean_labels, location, season, s2_acq, ref)
      s2[season], _ = constants.normalise_to_uint8(np.stack(bands, -1), constants.S2_MEAN,
                                                   constants.S2_STD)
      s1[season], bad = constants.normalise_to_uint8(np.stack(s1_bands, -1), constants.S1_MEAN,
                                                     constants.S1_STD)
      non_finite += bad
      if grid0 is None:
        grid0 = ref
      elif not common.grids_agree(ref, grid0, self.grid_tolerance_px):
        season_mismatch += 1
    example = {'s1': s1, 's2': s2, 'labels': labels, 'location_id': np.int64(location),
               'acquisition_ids': list(s2_acqs), 'crs': grid0.crs.to_string(),
               'transform': np.asarray(grid0.transform, np.float64)}
    if clean is not None:
      example['clean_labels'] = clean
    return example, {'non_finite_values': non_finite, 'season_grid_mismatch': season_mismatch}


def discover_locations(s1_root: str, s2_root: str) -> list[int]:
  """Sorted ids of all numeric location folders under S1 or S2 (one-sided ones get rejected)."""
  ids = set()
  for root in (s1_root, s2_root):
    if not os.path.isdir(root):
      raise common.ConversionError(f'{root} is not a directory')
    ids.update(int(e.name) for e in os.scandir(root) if e.name.isdigit() and e.is_dir())
  return sorted(ids)


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
  parser.add_argument('--s2', required=True, help='S2 root: <loc:07d>/<acq>/B1.tif..B12.tif')
  labels = parser.add_mutually_exclusive_group(required=True)
  labels.add_argument('--labels', help='Noisy label manifest CSV (location,season,path).')
  labels.add_argument('--labels-pattern', help='Noisy label path pattern, e.g. '
                      "'/dw/{location:07d}/{season}.tif' (also {acquisition}).")
  clean = parser.add_mutually_exclusive_group()
  clean.add_argument('--clean-labels', help='Optional clean label manifest CSV.')
  clean.add_argument('--clean-labels-pattern', help='Optional clean label path pattern.')
  parser.add_argument('--val-fraction', type=float, default=0.01,
                      help='Share of locations held out as the validation split (>= 1 of them).')
  parser.add_argument('--seed', type=int, default=42,
                      help='Seed of the permutation that picks the validation locations.')
  parser.add_argument('--resampling', default='bilinear', choices=RESAMPLING_CHOICES,
                      help='rasterio Resampling used to bring 20/60 m bands onto the 10 m grid.')
  common.add_shared_arguments(parser)
  return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Converts as the parsed command line says; returns the conversion summary."""
  converter = Ssl4eoConverter(
      s1_root=os.path.abspath(args.s1), s2_root=os.path.abspath(args.s2),
      labels=LabelSource.from_args(args.labels, args.labels_pattern),
      clean_labels=LabelSource.from_args(args.clean_labels, args.clean_labels_pattern),
      resampling=args.resampling, grid_tolerance_px=args.grid_tolerance_px)
  ids = discover_locations(converter.s1_root, converter.s2_root)
  if args.limit is not None:
    ids = ids[:args.limit]
  splits = split_locations(ids, args.val_fraction, args.seed)
  logging.info('%d locations: %d train, %d validation', len(ids), len(splits['train']),
               len(splits['validation']))
  return common.run_conversion(
      converter, splits, args.out, examples_per_shard=args.examples_per_shard,
      workers=args.workers, strict=args.strict, overwrite=args.overwrite,
      plan_args={'val_fraction': args.val_fraction, 'seed': args.seed, 'limit': args.limit},
      description='SSL4EO-S12 S1+S2 with Dynamic World labels (CromSS pretraining), '
                  'converted by data_prep.ssl4eo.')


main, _entry = common.cli_entry(run, build_parser)


# ---------------------------------------------------------------------------------------------
# TFDS builder (Apache Beam when installed), sharing Ssl4eoConverter.convert.


@dataclasses.dataclass
class Ssl4eoBuilderConfig(tfds.core.BuilderConfig):
  """Raw layout under --manual_dir (relative paths) and the split/resampling settings."""
  s1_dir: str = 's1'
  s2_dir: str = 's2c'
  labels_manifest: str = 'labels/noisy_manifest.csv'
  labels_pattern: str = ''
  clean_labels_manifest: str = ''
  clean_labels_pattern: str = ''
  val_fraction: float = 0.01
  seed: int = 42
  resampling: str = 'bilinear'
  grid_tolerance_px: float = 0.5


def _examples_of(converter: Ssl4eoConverter, location: int) -> Iterator[tuple[int, dict]]:
  """Zero or one (key, example); a bad location is logged and counted, not fatal."""
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
  yield location, example


def _iter_examples(converter: Ssl4eoConverter,
                   locations: Sequence[int]) -> Iterator[tuple[int, dict]]:
  for location in locations:
    yield from _examples_of(converter, location)


class Ssl4eoS12Nol(tfds.core.GeneratorBasedBuilder,
                   skip_registration=__name__ in ('__main__', '__mp_main__')):
  """TFDS builder for `tfds build` (Beam-parallel when apache-beam is installed)."""

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

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=ssl4eo_features(bool(cfg.clean_labels_manifest or cfg.clean_labels_pattern)),
        description='SSL4EO-S12 S1+S2 with Dynamic World labels (CromSS pretraining).')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    cfg = self.builder_config
    root = os.fspath(dl_manager.manual_dir)

    def source(manifest: str, pattern: str) -> LabelSource | None:
      return LabelSource.from_args(manifest and os.path.join(root, manifest),
                                   pattern and os.path.join(root, pattern))

    converter = Ssl4eoConverter(
        s1_root=os.path.join(root, cfg.s1_dir), s2_root=os.path.join(root, cfg.s2_dir),
        labels=(source('', cfg.labels_pattern) if cfg.labels_pattern
                else source(cfg.labels_manifest, '')),
        clean_labels=source(cfg.clean_labels_manifest, cfg.clean_labels_pattern),
        resampling=cfg.resampling, grid_tolerance_px=cfg.grid_tolerance_px)
    ids = discover_locations(converter.s1_root, converter.s2_root)
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
