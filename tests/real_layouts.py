"""Tiny fixtures in the layouts of the real SSL4EO-S12 / NoLDO-S12 releases, and independent
expectations for what the converter must make of them.

Layout written (as released): `s1/<loc:07d>/S1A_IW_GRDH_1SDV_<start>_<stop>_<orbit>_<take>_<id>/
{VV,VH}.tif`, `s2c/` (L1C, 13 bands) or `s2a/` (L2A, 12 bands, no B10) `<loc:07d>/
<start>_<stop>_T<tile>/B*.tif`, every band at its native pixel size, the 20 m / 60 m grids
shifted so that their first pixel is centred on the first 10 m pixel, and NoLDO-S12 labels at
`<labels>/<loc:07d>/<S2 acquisition>/label.tif` listed in `dw_complete_ids.csv`.

The expectations (`bilinear_onto`, `nearest_onto`, `normalise`) are plain numpy from the
georeferencing, with no GDAL resampling and no converter code.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import os
from typing import Sequence

import numpy as np
from affine import Affine
import rasterio

L1C_BANDS = ('B1', 'B2', 'B3', 'B4', 'B5', 'B6', 'B7', 'B8', 'B8A', 'B9', 'B10', 'B11', 'B12')
L2A_BANDS = tuple(b for b in L1C_BANDS if b != 'B10')
RES = {'B1': 60, 'B2': 10, 'B3': 10, 'B4': 10, 'B5': 20, 'B6': 20, 'B7': 20, 'B8': 10,
       'B8A': 20, 'B9': 60, 'B10': 60, 'B11': 20, 'B12': 20}
# SSL4EO-S12's published statistics, written out here again (not imported from the project).
L1C_MEAN = dict(zip(L1C_BANDS, (1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545,
                                1549.44374991, 2091.74883118, 2371.7172463, 2299.90463006,
                                2560.29504086, 830.06605044, 22.10351321, 2177.07172323,
                                1524.06546312)))
L1C_STD = dict(zip(L1C_BANDS, (786.78685367, 850.34818441, 875.06484736, 1138.84957046,
                               1122.17775652, 1161.59187054, 1274.39184232, 1248.42891965,
                               1345.52684884, 577.31607053, 51.15431158, 1336.09932639,
                               1136.53823676)))
L2A_MEAN = dict(zip(L2A_BANDS, (752.40087073, 884.29673756, 1144.16202635, 1297.47289228,
                                1624.90992062, 2194.6423161, 2422.21248945, 2517.76053101,
                                2581.64687018, 2645.51888987, 2368.51236873, 1805.06846033)))
L2A_STD = dict(zip(L2A_BANDS, (1108.02887453, 1155.15170768, 1183.6292542, 1368.11351514,
                               1370.265037, 1355.55390699, 1416.51487101, 1474.78900051,
                               1439.3086061, 1582.28010962, 1455.52084939, 1343.48379601)))
S1_MEAN = {'VV': -12.54847273, 'VH': -20.19237134}
S1_STD = {'VV': 5.25697717, 'VH': 5.91150917}
CRS = 'EPSG:32632'

# Season dates of one location: S1 from S1B in spring/autumn and S1A in summer/winter, so that
# sorting the S1 folder names (S1A... < S1B...) would pair June S2 with March S1.
S2_DATES = (datetime.datetime(2021, 3, 14, 10, 30, 21), datetime.datetime(2021, 6, 12, 10, 30, 31),
            datetime.datetime(2021, 9, 10, 10, 30, 11), datetime.datetime(2021, 12, 9, 10, 40, 1))
S1_PLATFORMS = ('B', 'A', 'B', 'A')
S1_DAYS_BEFORE = (3, 1, 5, 2)


def s2_name(date: datetime.datetime, tile: str = '32UNU') -> str:
  stop = date + datetime.timedelta(seconds=7)
  return f'{date:%Y%m%dT%H%M%S}_{stop:%Y%m%dT%H%M%S}_T{tile}'


def s1_name(date: datetime.datetime, platform: str, orbit: int = 36851) -> str:
  stop = date + datetime.timedelta(seconds=25)
  return (f'S1{platform}_IW_GRDH_1SDV_{date:%Y%m%dT%H%M%S}_{stop:%Y%m%dT%H%M%S}_'
          f'{orbit:06d}_045541_1A2B')


def write_tif(path: str, data: np.ndarray, transform: Affine, crs: str = CRS, *,
              nodata: float | None = None, compress: str | None = None,
              tags: dict | None = None) -> None:
  data = np.asarray(data)
  if data.ndim == 2:
    data = data[None]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  options = {'compress': compress} if compress else {}
  with rasterio.open(path, 'w', driver='GTiff', width=data.shape[2], height=data.shape[1],
                     count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                     nodata=nodata, **options) as dst:
    dst.write(data)
    if tags:
      dst.update_tags(**tags)


def release_transform(left: float, top: float, res: float) -> Affine:
  """The release's grid of a band of pixel size `res`: first pixel centred on the first 10 m one."""
  shift = (res - 10) / 2
  return Affine(res, 0, left - shift, 0, -res, top + shift)


@dataclasses.dataclass
class Location:
  """What one written location holds (for the expectations)."""
  loc: int
  left: float
  top: float
  tile: int
  s2_names: list[str]       # season order (by date)
  s1_names: list[str]       # the partner of each season
  s2_dir: str               # s2c or s2a
  band_offset: list[float]  # the DN offset written into each season's raw S2


def make_location(root: str, loc: int, rng: np.random.Generator, *, tile: int = 264,
                  product: str = 'L1C', uint8: bool = False, release_grids: bool = True,
                  s1_shift_px: tuple[float, float] = (0, 0), label_res: float = 10,
                  baseline_tags: Sequence[dict | None] = (None,) * 4,
                  labels_dir: str = 'noldo/dw_labels', crs: str = CRS,
                  pixel: float = 10.0) -> Location:
  """Writes one location in the release layout; returns what it wrote.

  `pixel` is the 10 m pixel size in CRS units (e.g. 9e-5 for a geographic CRS); the other
  resolutions scale with it. `baseline_tags[t]`: GeoTIFF tags of season t's S2 bands, e.g.
  {'PROCESSING_BASELINE': '04.00'}; such seasons get +1000 DN in their raw values.
  """
  k = pixel / 10.0
  left, top = 400000.0 * k + 3000 * k * loc, 5000000.0 * k
  bands = L1C_BANDS if product == 'L1C' else L2A_BANDS
  mean, std = (L1C_MEAN, L1C_STD) if product == 'L1C' else (L2A_MEAN, L2A_STD)
  s2_dir = 's2c' if product == 'L1C' else 's2a'
  s2_names, s1_names, offsets = [], [], []
  for season, date in enumerate(S2_DATES):
    s2 = s2_name(date + datetime.timedelta(days=loc % 3))
    s1 = s1_name(date - datetime.timedelta(days=S1_DAYS_BEFORE[season], hours=5),
                 S1_PLATFORMS[season])
    s2_names.append(s2)
    s1_names.append(s1)
    tags = baseline_tags[season]
    offset = 1000.0 if tags else 0.0
    offsets.append(offset)
    for band in bands:
      res = RES[band]
      n = tile * 10 // res
      transform = (release_transform(left / k, top / k, res) if release_grids
                   else Affine(res, 0, left / k, 0, -res, top / k))
      transform = Affine(transform.a * k, 0, transform.c * k, 0, transform.e * k, transform.f * k)
      if uint8:
        x = rng.integers(0, 256, (n, n)).astype(np.uint8)
        write_tif(os.path.join(root, s2_dir, f'{loc:07d}', s2, band + '.tif'), x, transform,
                  crs, compress='JPEG' if band != 'B10' else 'DEFLATE')
      else:
        x = np.clip(rng.normal(mean[band], 1.2 * std[band], (n, n)) + offset, 0, 30000)
        write_tif(os.path.join(root, s2_dir, f'{loc:07d}', s2, band + '.tif'),
                  x.astype(np.uint16), transform, crs, tags=tags)
    s1_transform = Affine(pixel, 0, left + s1_shift_px[0] * pixel, 0, -pixel,
                          top - s1_shift_px[1] * pixel)
    for band in ('VV', 'VH'):
      if uint8:
        x = rng.integers(0, 256, (tile, tile)).astype(np.uint8)
      else:
        x = rng.normal(S1_MEAN[band], S1_STD[band], (tile, tile)).astype(np.float32)
        if season == 0 and band == 'VV':
          x[-1, :7] = np.nan  # swath border
      write_tif(os.path.join(root, 's1', f'{loc:07d}', s1, band + '.tif'), x, s1_transform, crs)
    n = int(round(tile * 10 / label_res))
    label_transform = Affine(label_res * k, 0, left, 0, -label_res * k, top)
    write_tif(os.path.join(root, labels_dir, f'{loc:07d}', s2, 'label.tif'),
              rng.integers(0, 9, (n, n)).astype(np.uint8), label_transform, crs)
  return Location(loc, left, top, tile, s2_names, s1_names, s2_dir, offsets)


def write_noldo_csv(path: str, locations: Sequence[Location], header: bool = True) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    if header:
      w.writerow(['ids', 'sub1', 'sub2', 'sub3', 'sub4'])
    for location in locations:
      w.writerow([location.loc, *location.s2_names])


# ---------------------------------------------------------------------------------------------
# Expectations, from the georeferencing alone.


def read(path: str) -> tuple[np.ndarray, Affine]:
  with rasterio.open(path) as src:
    return src.read(1), src.transform


def _centres(ref: Affine, size: int) -> tuple[np.ndarray, np.ndarray]:
  i = np.arange(size) + 0.5
  return ref.c + i * ref.a, ref.f + i * ref.e  # x of columns, y of rows


def bilinear_onto(data: np.ndarray, transform: Affine, ref: Affine, size: int) -> np.ndarray:
  """`data` sampled bilinearly at the reference pixel centres, edges clamped (float64)."""
  xs, ys = _centres(ref, size)
  col = np.clip((xs - transform.c) / transform.a - 0.5, 0, data.shape[1] - 1)
  row = np.clip((ys - transform.f) / transform.e - 0.5, 0, data.shape[0] - 1)
  c0 = np.minimum(np.floor(col).astype(int), data.shape[1] - 2)
  r0 = np.minimum(np.floor(row).astype(int), data.shape[0] - 2)
  fc, fr = col - c0, row - r0
  d = data.astype(np.float64)
  top = d[r0][:, c0] * (1 - fc) + d[r0][:, c0 + 1] * fc
  bottom = d[r0 + 1][:, c0] * (1 - fc) + d[r0 + 1][:, c0 + 1] * fc
  return top * (1 - fr)[:, None] + bottom * fr[:, None]


def nearest_onto(data: np.ndarray, transform: Affine, ref: Affine, size: int) -> np.ndarray:
  xs, ys = _centres(ref, size)
  col = np.clip(np.floor((xs - transform.c) / transform.a).astype(int), 0, data.shape[1] - 1)
  row = np.clip(np.floor((ys - transform.f) / transform.e).astype(int), 0, data.shape[0] - 1)
  return data[row][:, col]


def normalise_float(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  """clip((x - (m - 2s)) / 4s, 0, 1) * 255 before rounding (NaN stays NaN)."""
  return np.clip((np.asarray(x, np.float64) - (mean - 2 * std)) / (4 * std), 0, 1) * 255


def normalise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  """The SSL4EO-S12 normalisation: clip((x - (m - 2s)) / 4s, 0, 1) * 255, rounded; NaN -> 0."""
  x = np.asarray(x, np.float64)
  v = np.rint(np.clip((np.nan_to_num(x, nan=mean - 2 * std) - (mean - 2 * std)) / (4 * std),
                      0, 1) * 255)
  v[~np.isfinite(x)] = 0
  return v.astype(np.uint8)
