"""Small GeoTIFF and file helpers shared by the data_prep tools.

Every write is atomic (a temporary file in the destination folder, then `os.replace`), so an
interrupted run never leaves a truncated raster or manifest that a later converter would read as
valid data.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from cromss_jax.utils import atomic_output, write_text  # noqa: F401  (write_text: for callers)


def utm_crs(zone: int, north: bool = True) -> CRS:
  """WGS 84 / UTM CRS for `zone` (EPSG:326zz north, 327zz south)."""
  if not 1 <= zone <= 60:
    raise ValueError(f'UTM zone must be in 1..60, got {zone}')
  return CRS.from_epsg((32600 if north else 32700) + zone)


def north_up_transform(left: float, top: float, pixel_size: float) -> Affine:
  """Affine of a north-up grid whose upper-left corner is (left, top)."""
  return Affine(pixel_size, 0.0, left, 0.0, -pixel_size, top)


def write_geotiff(path: str | os.PathLike, data: np.ndarray, *, crs: CRS | str,
                  transform: Affine, band_names: Sequence[str] | None = None,
                  nodata: float | None = None) -> None:
  """Atomically writes a [H, W] or [bands, H, W] array as an uncompressed GeoTIFF.

  Uncompressed because the demo rasters are noise-dominated (compression barely helps) and
  writing them is then about 1 ms per file.
  """
  data = np.asarray(data)
  if data.ndim == 2:
    data = data[None]
  if data.ndim != 3:
    raise ValueError(f'expected a [H, W] or [bands, H, W] array, got shape {data.shape}')
  if band_names is not None and len(band_names) != data.shape[0]:
    raise ValueError(f'{len(band_names)} band names for {data.shape[0]} bands')
  with atomic_output(path) as tmp:
    with rasterio.open(tmp, 'w', driver='GTiff', height=data.shape[1], width=data.shape[2],
                       count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                       nodata=nodata) as ds:
      ds.write(data)
      for i, name in enumerate(band_names or ()):
        ds.set_band_description(i + 1, name)
