"""Synthetic demo data in the on-disk layouts of SSL4EO-S12, DFC2020 and a scene to map.

The real datasets are hundreds of GB. This writes a small stand-in with the same folders, file
names, dtypes, native band resolutions and quirks (S1 NaN/-inf swath borders, clouds, speckle),
so the converters, pretraining, transfer and the mapping tool run end to end on a laptop.

The land cover is random but structured: smooth regions, crop parcels, rivers, roads, seasonal
snow, seasonal flooding and crop phenology. The sensors are complementary on purpose: built area
vs bare ground and flooded vegetation vs water differ mainly in radar backscatter; grass vs crops
vs shrub differ mainly in optical spectra; clouds and haze sometimes hide the optical signal and
speckle blurs the radar one. Noisy labels imitate Dynamic World's errors (confusable classes,
boundary shifts, blobs, season-dependent flips) at a chosen pixel rate; the clean truth is written
alongside so the achieved agreement can be measured.

Usage:
  python -m data_prep.make_demo --out demo_data [--locations 24] [--noise 0.3] [--seed 0]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
from scipy import ndimage, special
import tqdm

from cromss_jax import constants
from data_prep import geotiff

_CLASS = {name: i for i, name in enumerate(constants.DW_CLASSES)}
WATER = _CLASS['Water']
TREES = _CLASS['Trees']
GRASS = _CLASS['Grass']
FLOODED = _CLASS['Flooded vegetation']
CROPS = _CLASS['Crops']
SHRUB = _CLASS['Shrub & scrub']
BUILT = _CLASS['Built area']
BARE = _CLASS['Bare ground']
SNOW = _CLASS['Snow & ice']
NUM_CLASSES = len(constants.DW_CLASSES)

SEASONS = ('spring', 'summer', 'autumn', 'winter')
DFC_PATCH_SIZE = 256
DFC_SPLITS = ('validation', 'test')
DFC_SAVANNA = 3        # DFC2020 codes without a DW counterpart (docs/METHOD.md §2.4: "ignore")
DFC_SNOW = 8
DEFAULT_SCENE_SIZE = (700, 900)
# Marks a folder as this tool's output and records the files it wrote: a rerun deletes only those.
_MARKER = '.make_demo'
_OUTPUTS = ('ssl4eo', 'dfc2020', 'scene', 'summary.json')
_S2_SCALE = {res: res // 10 for res in set(constants.S2_RESOLUTION_M)}


def _by_class(rows: dict[int, Sequence[float]], default: dict[int, Sequence[float]] | None = None
              ) -> np.ndarray:
  """[classes, values] float32 table from {class: values}, missing classes taken from default."""
  merged = dict(default or {})
  merged.update(rows)
  return np.asarray([merged[c] for c in range(NUM_CLASSES)], np.float32)


# Top-of-atmosphere reflectance x1e4 in S2_BANDS order (B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B10 B11
# B12), for a fully green and a dry/bare state of each class. Built and bare ground are close
# here on purpose (radar separates them); water is dark in NIR/SWIR, snow bright in the visible
# and dark in SWIR, vegetation bright in the red edge and NIR.
_S2_GREEN_ROWS = {
    WATER: (1350, 1100, 900, 650, 520, 420, 390, 350, 320, 130, 12, 160, 110),
    TREES: (1250, 950, 820, 600, 1050, 2300, 2800, 2900, 3100, 950, 13, 1500, 700),
    GRASS: (1300, 1050, 1050, 800, 1350, 2700, 3200, 3300, 3450, 1050, 14, 2200, 1200),
    FLOODED: (1300, 1020, 950, 720, 1000, 1900, 2250, 2300, 2450, 750, 13, 1300, 650),
    CROPS: (1280, 980, 1080, 680, 1450, 3100, 3800, 3900, 4100, 1150, 14, 2300, 1250),
    SHRUB: (1400, 1200, 1200, 1150, 1600, 2200, 2500, 2600, 2750, 880, 15, 2700, 1850),
    BUILT: (1650, 1550, 1500, 1600, 1800, 1950, 2050, 2150, 2250, 760, 17, 2900, 2500),
    BARE: (1700, 1600, 1650, 1800, 2000, 2200, 2300, 2400, 2550, 830, 17, 3150, 2650),
    SNOW: (7800, 8200, 8000, 7800, 7600, 7300, 7100, 6900, 6600, 2400, 35, 1300, 1000),
}
_S2_GREEN = _by_class(_S2_GREEN_ROWS)
_S2_DRY = _by_class({
    TREES: (1350, 1100, 1000, 950, 1250, 1600, 1750, 1850, 1950, 650, 13, 2000, 1300),
    GRASS: (1450, 1250, 1250, 1300, 1650, 2000, 2150, 2250, 2400, 780, 15, 2700, 1900),
    FLOODED: (1320, 1080, 1020, 950, 1150, 1500, 1650, 1700, 1800, 560, 13, 1500, 900),
    CROPS: (1500, 1350, 1450, 1650, 1850, 2050, 2150, 2250, 2400, 800, 16, 3000, 2500),
    SHRUB: (1450, 1280, 1300, 1350, 1750, 2050, 2250, 2350, 2500, 800, 15, 2900, 2100),
}, default=_S2_GREEN_ROWS)
_CLOUD = np.asarray((5600, 5900, 5700, 5600, 5800, 5900, 6000, 6000, 6000, 2300, 600, 3800, 2600),
                    np.float32)
# Additive path radiance of haze / thin cirrus: strongest in the blue, visible in B10 (cirrus).
_HAZE = np.asarray((900, 800, 600, 450, 380, 300, 260, 240, 220, 80, 150, 70, 40), np.float32)

# Sentinel-1 backscatter (VV, VH) in dB, green and dry states. Flooded vegetation shows double
# bounce (bright, unlike open water); built area is bright, bare ground dark; grass, crops and
# shrub sit close together (optical separates them).
_S1_GREEN_ROWS = {
    WATER: (-21.0, -28.0), TREES: (-7.5, -13.5), GRASS: (-11.5, -18.5), FLOODED: (-5.5, -14.5),
    CROPS: (-10.5, -17.0), SHRUB: (-10.5, -17.5), BUILT: (-3.0, -11.5), BARE: (-15.5, -24.5),
    SNOW: (-13.0, -21.0),
}
_S1_GREEN = _by_class(_S1_GREEN_ROWS).T           # [2, classes]
_S1_DRY = _by_class({
    TREES: (-8.5, -15.5), GRASS: (-12.5, -20.0), FLOODED: (-7.0, -16.0), CROPS: (-13.5, -21.5),
    SHRUB: (-11.0, -18.5),
}, default=_S1_GREEN_ROWS).T

# Greenness (0 dry .. 1 green) per class and season; evergreen trees and winter crops differ.
_GREENNESS = _by_class({
    TREES: (0.55, 1.0, 0.6, 0.05), GRASS: (0.75, 0.95, 0.6, 0.35),
    FLOODED: (0.6, 0.95, 0.65, 0.3), CROPS: (0.15, 0.95, 0.35, 0.05),
    SHRUB: (0.6, 0.8, 0.55, 0.45),
}, default={c: (0.0,) * 4 for c in range(NUM_CLASSES)})
_EVERGREEN_G = np.asarray((0.9, 1.0, 0.95, 0.85), np.float32)
_WINTER_CROP_G = np.asarray((0.75, 0.2, 0.1, 0.45), np.float32)
_ILLUMINATION = (1.0, 1.05, 0.95, 0.8)        # sun elevation by season
# Within-class texture: relative S2 brightness variation and S1 variation in dB.
_S2_TEXTURE = _by_class({WATER: (0.03,), TREES: (0.08,), GRASS: (0.05,), FLOODED: (0.06,),
                         CROPS: (0.04,), SHRUB: (0.08,), BUILT: (0.16,), BARE: (0.07,),
                         SNOW: (0.04,)})[:, 0]
_S1_TEXTURE_DB = _by_class({WATER: (0.6,), TREES: (1.2,), GRASS: (0.8,), FLOODED: (1.0,),
                            CROPS: (0.8,), SHRUB: (1.0,), BUILT: (2.5,), BARE: (0.8,),
                            SNOW: (0.6,)})[:, 0]
_S1_ENL = 4.5           # equivalent number of looks of IW GRD high resolution
_CLOUD_PROB = (0.3, 0.25, 0.35, 0.45)
_FLOOD_THRESHOLD = (1.0, 1.6, 1.4, 1.1)   # lower = more flooded vegetation (spring, winter)
_ABUNDANCE_SCALE = 0.6                    # how strongly biome weights bias the class fields
_SNOW_LINE = (1.3, 3.2, 2.4, 0.4)         # on the standardised elevation field

# Dynamic World-like confusions: relative odds of each wrong label given the true class.
_CONFUSION = _by_class({
    WATER: (0, 0, .15, .55, 0, 0, .1, .2, 0),
    TREES: (0, 0, .3, .15, .15, .4, 0, 0, 0),
    GRASS: (0, .15, 0, 0, .4, .35, 0, .1, 0),
    FLOODED: (.45, .15, .3, 0, 0, .1, 0, 0, 0),
    CROPS: (0, 0, .55, 0, 0, .2, 0, .25, 0),
    SHRUB: (0, .25, .45, 0, .1, 0, 0, .2, 0),
    BUILT: (0, 0, .2, 0, .2, 0, 0, .6, 0),
    BARE: (.1, 0, 0, 0, .2, .25, .45, 0, 0),
    SNOW: (.3, 0, .25, 0, 0, 0, 0, .45, 0),
})
_CONFUSION_CDF = np.cumsum(_CONFUSION / _CONFUSION.sum(1, keepdims=True), axis=1)
_CONFUSION_CDF[:, -1] = 1.0
_MOST_CONFUSED = np.argmax(_CONFUSION, axis=1)
# Season-dependent flips (true class, label given, strength): crops read as grass in spring and
# as bare after harvest, flooded vegetation as water when wet, leafless trees as shrub, ...
_SEASON_FLIPS = (
    ((CROPS, GRASS, 0.9), (CROPS, BARE, 0.5), (FLOODED, WATER, 0.5), (SNOW, BARE, 0.7),
     (TREES, SHRUB, 0.3)),
    ((GRASS, CROPS, 0.6), (SHRUB, GRASS, 0.5), (BARE, SHRUB, 0.3), (FLOODED, GRASS, 0.5)),
    ((CROPS, BARE, 0.8), (GRASS, SHRUB, 0.4), (TREES, SHRUB, 0.3)),
    ((CROPS, BARE, 0.9), (GRASS, BARE, 0.4), (TREES, SHRUB, 0.5), (FLOODED, WATER, 0.7),
     (SNOW, WATER, 0.3)),
)
_NOISE_SOURCES = ('boundary', 'season', 'blob', 'pixel')
_NOISE_SHARES = (0.4, 0.2, 0.35, 0.05)   # of the wrong pixels, filled in this order
_SEASON_NOISE_FACTOR = (1.05, 0.85, 0.95, 1.15)   # DW is worse in winter/spring; mean 1


@dataclasses.dataclass(frozen=True)
class _Biome:
  """Land-cover mix of a location; the demo cycles through these to cover all classes."""
  name: str
  weights: dict[int, float]
  river_prob: float
  max_roads: int
  wetness: float
  snow_prob: float
  snow_offset: float
  evergreen: float


_BIOMES = (
    _Biome('farmland', {WATER: .03, TREES: .14, GRASS: .2, CROPS: .45, SHRUB: .05, BUILT: .08,
                        BARE: .05}, 0.6, 2, 0.0, 0.35, 0.0, 0.3),
    _Biome('forest', {WATER: .07, TREES: .6, GRASS: .1, CROPS: .05, SHRUB: .14, BUILT: .02,
                      BARE: .02}, 0.5, 1, 0.1, 0.5, 0.3, 0.6),
    _Biome('urban', {WATER: .05, TREES: .15, GRASS: .2, CROPS: .05, SHRUB: .03, BUILT: .45,
                     BARE: .07}, 0.5, 4, -0.2, 0.2, 0.0, 0.3),
    _Biome('arid', {WATER: .01, TREES: .03, GRASS: .1, CROPS: .08, SHRUB: .3, BUILT: .05,
                    BARE: .43}, 0.3, 2, -0.4, 0.0, 0.0, 0.5),
    _Biome('wetland', {WATER: .22, TREES: .2, GRASS: .3, CROPS: .1, SHRUB: .1, BUILT: .03,
                       BARE: .05}, 0.8, 1, 0.5, 0.2, 0.0, 0.3),
    _Biome('alpine', {WATER: .03, TREES: .35, GRASS: .25, CROPS: .02, SHRUB: .1, BUILT: .02,
                      BARE: .23}, 0.3, 1, -0.1, 1.0, 1.2, 0.7),
)
_ALPINE = _BIOMES[-1]
_SCENE_BIOME = _Biome('mixed', {WATER: .05, TREES: .25, GRASS: .2, CROPS: .3, SHRUB: .07,
                                BUILT: .08, BARE: .05}, 1.0, 3, 0.2, 0.0, 0.0, 0.4)


# ----------------------------------------------------------------------------- random fields

@functools.lru_cache(maxsize=64)
def _spectral_kernel(h: int, w: int, scales: tuple[tuple[float, float], ...]) -> np.ndarray:
  """rfft2-shaped filter gains: Gaussian filters, each scaled to unit variance times its weight.

  The mean (DC) term is removed; weights are therefore standard-deviation ratios of the scales.
  """
  fy = np.fft.fftfreq(h)[:, None]
  fx = np.fft.rfftfreq(w)[None, :]
  f2 = fy ** 2 + fx ** 2
  kernel = np.zeros(f2.shape)
  for sigma, weight in scales:
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * f2)
    gain[0, 0] = 0.0
    kernel += weight * gain / np.sqrt(np.sum(gain ** 2))
  return kernel.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int],
                  scales: float | tuple[tuple[float, float], ...], count: int | None = None
                  ) -> np.ndarray:
  """Zero-mean, unit-variance Gaussian random field(s); scales are (sigma, weight) in pixels.

  Synthesised directly in the frequency domain (one inverse FFT per field, periodic), which is
  several times cheaper than filtering white noise in image space for the large sigmas used.
  The sample variance is divided out, so large-scale fields do not vary in contrast by tile.
  """
  h, w = shape
  if isinstance(scales, (int, float)):
    scales = ((float(scales), 1.0),)
  kernel = _spectral_kernel(h, w, tuple(scales))
  n = 1 if count is None else count
  # Uniform (not Gaussian) real and imaginary parts: 5x cheaper to draw, and every pixel sums
  # many of them, so the field is Gaussian all the same.
  spectrum = rng.random((n, h, w // 2 + 1, 2), dtype=np.float32)
  spectrum -= np.float32(0.5)
  spectrum = spectrum.view(np.complex64)
  field = np.fft.irfft2(spectrum[..., 0] * kernel, s=(h, w))
  rms = np.sqrt(np.einsum('nij,nij->n', field, field) / (h * w))
  field /= (rms + np.float32(1e-12))[:, None, None]
  return field[0] if count is None else field


def _smooth_uniform(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
  """Smooth field with roughly uniform marginals in (0, 1)."""
  return special.ndtr(_smooth_noise(rng, shape, sigma)).astype(np.float32)


def _member(labels: np.ndarray, *classes: int) -> np.ndarray:
  """np.isin(labels, classes) for class maps, as a cheap table lookup."""
  table = np.zeros(256, bool)
  table[list(classes)] = True
  return table[labels]


def _argmax0(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(argmax, max) over a short leading axis, without numpy's slow strided reduction."""
  best = stack[0].copy()
  index = np.zeros(stack.shape[1:], np.intp)
  for i in range(1, stack.shape[0]):
    better = stack[i] > best
    index[better] = i
    np.maximum(best, stack[i], out=best)
  return index, best


def _confusion_lookup(levels: int = 1024) -> np.ndarray:
  """uint8 [classes, levels]: the wrong label drawn by a uniform number in level bin j."""
  u = (np.arange(levels) + 0.5) / levels
  alt = np.sum(u[None, :, None] > _CONFUSION_CDF[:, None, :], axis=-1).clip(0, NUM_CLASSES - 1)
  same = alt == np.arange(NUM_CLASSES)[:, None]
  return np.where(same, _MOST_CONFUSED[:, None], alt).astype(np.uint8)


_CONFUSION_LOOKUP = _confusion_lookup()


def _confusable(labels: np.ndarray, u: np.ndarray) -> np.ndarray:
  """A wrong label per pixel drawn from _CONFUSION using the uniform numbers `u` in [0, 1)."""
  levels = _CONFUSION_LOOKUP.shape[1]
  return _CONFUSION_LOOKUP[labels, np.clip((u * levels).astype(np.int32), 0, levels - 1)]


# ----------------------------------------------------------------------------- land cover

@dataclasses.dataclass
class _Land:
  """Ground truth of one footprint and the stable surface properties the renderers need."""
  truth: np.ndarray          # uint8 [4, H, W] DW classes per season
  evergreen: np.ndarray      # bool [H, W]
  parcel: np.ndarray         # bool [H, W] inside an agricultural parcel
  parcel_id: np.ndarray      # int64 [H, W] hashed parcel index
  winter_crop: np.ndarray    # bool [H, W]
  green_offset: np.ndarray   # float32 [H, W] per-parcel phenology shift
  parcel_bright: np.ndarray  # float32 [H, W]
  texture: np.ndarray        # float32 [H, W] stable surface texture (standardised)
  openness: np.ndarray       # float32 [H, W] open-water share of flooded-vegetation pixels
  savanna: np.ndarray | None = None  # bool [H, W] DFC savanna zone (rendered as a mix)


def _make_land(rng: np.random.Generator, shape: tuple[int, int], biome: _Biome, *,
               savanna: bool = False, snow: bool | None = None) -> _Land:
  """Random land cover: smooth regions, parcels, rivers, roads, seasonal floods and snow."""
  h, w = shape
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  candidates = np.asarray((WATER, TREES, GRASS, CROPS, SHRUB, BUILT, BARE))
  weights = np.asarray([biome.weights.get(int(c), 0.0) for c in candidates], np.float32)
  fields = _smooth_noise(rng, shape, ((45, 0.8), (14, 1.0), (4, 0.4)), len(candidates))
  fields += _ABUNDANCE_SCALE * np.log(weights + 1e-3)[:, None, None]
  base = candidates[_argmax0(fields)[0]].astype(np.uint8)

  # Agricultural parcels: a rotated, row-staggered grid; some parcels are meadows (grass).
  theta = rng.uniform(0, np.pi)
  u = xx * np.cos(theta) + yy * np.sin(theta)
  v = -xx * np.sin(theta) + yy * np.cos(theta)
  size_u, size_v = rng.uniform(14, 36), rng.uniform(10, 28)
  row = np.floor(v / size_v).astype(np.int64)
  stagger = rng.uniform(0, size_u, 4096).astype(np.float32)
  col = np.floor((u + stagger[row % 4096]) / size_u).astype(np.int64)
  parcel_id = (col * 7919 + row * 104729) % 65536
  table = rng.random((4, 65536), dtype=np.float32)
  parcel = base == CROPS
  base[parcel & (table[0][parcel_id] < 0.2)] = GRASS
  winter_crop = parcel & (table[1][parcel_id] < 0.3)
  green_offset = np.where(parcel, (table[2][parcel_id] - 0.5) * 0.3, 0).astype(np.float32)
  parcel_bright = np.where(parcel, 0.92 + 0.16 * table[3][parcel_id], 1).astype(np.float32)

  if rng.random() < biome.river_prob:      # a meandering river
    phi = rng.uniform(0, np.pi)
    cy, cx = h / 2, w / 2
    along = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
    across = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
    centre = (rng.uniform(-0.3, 0.3) * min(h, w)
              + rng.uniform(8, 35) * np.sin(2 * np.pi * along / rng.uniform(120, 300)
                                            + rng.uniform(0, 2 * np.pi))
              + rng.uniform(2, 10) * np.sin(2 * np.pi * along / rng.uniform(30, 80)))
    base[np.abs(across - centre) < rng.uniform(1.2, 3.5)] = WATER
  for _ in range(rng.integers(0, biome.max_roads + 1)):   # straight roads (built area)
    phi = rng.uniform(0, np.pi)
    y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
    dist = np.abs((xx - x0) * np.sin(phi) - (yy - y0) * np.cos(phi))
    base[dist < rng.uniform(0.6, 1.3)] = BUILT

  evergreen = _smooth_noise(rng, shape, 10) < special.ndtri(biome.evergreen)
  texture = _smooth_noise(rng, shape, ((1.5, 1.0), (5, 0.6)))
  openness = 0.3 + 0.6 * _smooth_uniform(rng, shape, 3)

  # Seasonal flooding near water and seasonal snow above a snow line.
  water = base == WATER
  dist_water = ndimage.distance_transform_edt(~water) if water.any() else np.full(shape, 1e3)
  wetness = (0.7 * _smooth_noise(rng, shape, 8) + 1.6 * np.exp(-dist_water / 6.0)
             + biome.wetness + rng.normal(0, 0.2)).astype(np.float32)
  floodable = _member(base, GRASS, SHRUB)
  if snow is None:
    snow = rng.random() < biome.snow_prob
  elevation = _smooth_noise(rng, shape, ((40, 1.0), (3, 0.25)))
  elevation += (biome.snow_offset + rng.normal(0, 0.3)) if snow else -100.0
  snow_margin = np.select([base == TREES, _member(base, WATER, BUILT)], [0.9, 0.6],
                          0.0).astype(np.float32)
  truth = np.empty((constants.NUM_SEASONS, h, w), np.uint8)
  for s in range(constants.NUM_SEASONS):
    t = base.copy()
    t[floodable & (wetness > _FLOOD_THRESHOLD[s])] = FLOODED
    t[elevation > _SNOW_LINE[s] + snow_margin] = SNOW
    truth[s] = t

  savanna_mask = None
  if savanna:       # DFC savanna: an open grass/shrub/tree mosaic, rendered from those classes
    zone = (_smooth_noise(rng, shape, 20) > rng.uniform(0.0, 1.0)) & ~_member(
        truth[0], WATER, BUILT, SNOW)
    mix = np.asarray((GRASS, SHRUB, TREES), np.uint8)[_argmax0(
        _smooth_noise(rng, shape, 1.5, 3)
        + np.asarray((0.5, 0.2, -0.6), np.float32)[:, None, None])[0]]
    truth[:, zone] = mix[zone]
    savanna_mask = zone
  return _Land(truth, evergreen, parcel, parcel_id, winter_crop, green_offset, parcel_bright,
               texture, openness, savanna_mask)


# ----------------------------------------------------------------------------- rendering

@dataclasses.dataclass(frozen=True)
class _Look:
  """Per-footprint calibration jitter, so classes are not identical across locations."""
  s2_gain: np.ndarray      # [classes, 13]
  s1_offset: np.ndarray    # [2, classes] dB
  incidence_slope: float   # dB across the footprint (incidence angle varies across the swath)


def _make_look(rng: np.random.Generator) -> _Look:
  gain = np.exp(rng.normal(0, 0.05, (NUM_CLASSES, 1)) + rng.normal(0, 0.02, (NUM_CLASSES, 13)))
  gain[WATER, :5] *= rng.uniform(0.9, 1.5)      # turbidity brightens water in the visible
  return _Look(gain.astype(np.float32),
               rng.normal(0, 0.6, (2, NUM_CLASSES)).astype(np.float32),
               float(rng.uniform(0.8, 2.0) * rng.choice((-1.0, 1.0))))


def _greenness(rng: np.random.Generator, land: _Land, labels: np.ndarray,
               season: int) -> np.ndarray:
  g = _GREENNESS[labels, season]
  g = np.where((labels == TREES) & land.evergreen, _EVERGREEN_G[season], g)
  g = np.where((labels == CROPS) & land.winter_crop, _WINTER_CROP_G[season], g)
  g = g + land.green_offset + 0.08 * _smooth_noise(rng, labels.shape, 3)
  return np.clip(g, 0, 1).astype(np.float32)


def _render_s2(rng: np.random.Generator, land: _Land, labels: np.ndarray, green: np.ndarray,
               season: int, look: _Look, *, cloud_cover: float, haze_prob: float) -> np.ndarray:
  """Float32 [13, H, W] TOA reflectance x1e4 on the 10 m grid."""
  h, w = labels.shape
  dry = (_S2_DRY * look.s2_gain).T
  refl = dry[:, labels]
  refl += green * ((_S2_GREEN * look.s2_gain).T - dry)[:, labels]
  flooded = labels == FLOODED     # open water between the stems: S2 sees partly water
  if flooded.any():
    om = land.openness[flooded]
    water = _S2_GREEN[WATER] * look.s2_gain[WATER]
    refl[:, flooded] = om * water[:, None] + (1 - om) * refl[:, flooded]
  scale = 1 + _S2_TEXTURE[labels] * (land.texture + 0.4 * _smooth_noise(rng, (h, w), 1.0))
  scale *= land.parcel_bright * np.float32(_ILLUMINATION[season])
  refl *= scale
  # Independent per-band sensor noise (1.5% of the band's mean + 5 DN); uniform draws with that
  # standard deviation are cheaper than Gaussian ones and look the same at this level.
  sd = np.sqrt(12.0) * (0.015 * refl.mean(axis=(1, 2)) + 5.0)
  noise = rng.random((13, h, w), dtype=np.float32)
  noise -= 0.5
  noise *= sd.astype(np.float32)[:, None, None]
  refl += noise
  if cloud_cover > 0:
    field = _smooth_noise(rng, (h, w), ((9, 1.0), (2, 0.35)))
    alpha = np.clip((field - np.quantile(field, 1 - cloud_cover)) / 0.5, 0, 1)
    shadow = np.roll(alpha, (int(rng.integers(8, 25)), int(rng.integers(-12, 13))), (0, 1))
    refl *= 1 - 0.55 * shadow * (1 - alpha)
    refl += alpha * (_CLOUD[:, None, None] * rng.uniform(0.8, 1.2) - refl)
  if rng.random() < haze_prob:
    thickness = rng.uniform(0.1, 0.4) * (0.6 + 0.4 * _smooth_uniform(rng, (h, w), 20))
    refl += _HAZE[:, None, None] * thickness
  return refl


def _to_uint16(refl: np.ndarray) -> np.ndarray:
  """Rounded and clipped to 1..65535 (0 is the L1C no-data value)."""
  return (np.clip(refl, 1, 65535) + 0.5).astype(np.uint16)


def _block_mean(band: np.ndarray, factor: int) -> np.ndarray:
  """Mean over factor x factor blocks (edge-padded to a multiple): a coarser native pixel."""
  h, w = band.shape
  ph, pw = -h % factor, -w % factor
  if ph or pw:
    band = np.pad(band, ((0, ph), (0, pw)), mode='edge')
  return band.reshape(band.shape[0] // factor, factor, band.shape[1] // factor, factor).mean((1, 3))


def _native_bands(refl: np.ndarray) -> list[np.ndarray]:
  """The 13 bands at their native resolution (20 m and 60 m bands block-averaged)."""
  return [_block_mean(b, _S2_SCALE[r]) if _S2_SCALE[r] > 1 else b
          for b, r in zip(refl, constants.S2_RESOLUTION_M)]


def _native_on_10m(refl: np.ndarray) -> np.ndarray:
  """Native-resolution bands brought back to the 10 m grid by nearest neighbour (as exported)."""
  h, w = refl.shape[1:]
  out = refl.copy()
  for i, r in enumerate(constants.S2_RESOLUTION_M):
    f = _S2_SCALE[r]
    if f > 1:
      out[i] = np.repeat(np.repeat(_block_mean(refl[i], f), f, 0), f, 1)[:h, :w]
  return out


def _render_s1(rng: np.random.Generator, land: _Land, labels: np.ndarray, green: np.ndarray,
               season: int, look: _Look, *, border: bool) -> np.ndarray:
  """Float32 [2, H, W] (VV, VH) in dB with speckle; optionally a NaN/-inf swath border."""
  h, w = labels.shape
  db = _S1_DRY[:, labels] + green * (_S1_GREEN[:, labels] - _S1_DRY[:, labels])
  db += look.s1_offset[:, labels]
  land_px = ~_member(labels, WATER, BUILT)
  if season in (0, 3):                           # wetter soil in spring and winter
    db += 0.7 * land_px
  if season == 0:                                # melting (wet) snow absorbs C-band
    db -= np.asarray((6.0, 4.0), np.float32)[:, None, None] * (labels == SNOW)
  db += _S1_TEXTURE_DB[labels] * (0.8 * land.texture + 0.6 * _smooth_noise(rng, (h, w), 2))
  db += look.incidence_slope * (np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5)
  water = labels == WATER
  if water.any():                                # wind roughens open water, sometimes a lot
    wind = rng.uniform() ** 2 * 9.0 * (0.6 + 0.4 * _smooth_uniform(rng, (h, w), 12))
    db += np.asarray((1.0, 0.5), np.float32)[:, None, None] * (wind * water)
  bright = (labels == BUILT) & (rng.random((h, w), dtype=np.float32) < 0.08)
  if bright.any():                               # strong point scatterers in built area
    db[:, bright] += rng.uniform(4, 10, int(bright.sum())).astype(np.float32)
  power = np.exp(db * np.float32(np.log(10.0) / 10.0))
  power *= rng.standard_gamma(_S1_ENL, (2, h, w), dtype=np.float32)   # speckle, mean ENL
  power *= np.float32(1.0 / _S1_ENL)
  missing = None
  if border:                                     # beyond the swath edge: NaN; at the edge: 0
    slope = np.tan(rng.uniform(-0.25, 0.25))     # swath edges cross tiles at a slant
    edge_x = rng.uniform(0.6, 0.95) * w + slope * (np.arange(h) - h / 2)
    if rng.random() < 0.5:
      dist = np.arange(w)[None, :] - edge_x[:, None]
    else:
      dist = (w - 1 - edge_x)[:, None] - np.arange(w)[None, :]
    missing = dist > 0
    power[:, (dist > -2) & ~missing] = 0.0
  with np.errstate(divide='ignore'):
    out = (10.0 * np.log10(power)).astype(np.float32)
  if missing is not None:
    out[:, missing] = np.nan
  return out


# ----------------------------------------------------------------------------- label noise

def _edge_neighbour(labels: np.ndarray) -> np.ndarray:
  """Per pixel, the label of a 4-neighbour that differs from it, else -1."""
  padded = np.pad(labels, 1, mode='edge')
  other = np.full(labels.shape, -1, np.int16)
  for nb in (padded[1:-1, 2:], padded[1:-1, :-2], padded[2:, 1:-1], padded[:-2, 1:-1]):
    take = (nb != labels) & (other < 0)
    other[take] = nb[take]
  return other


def _noisy_labels(rng: np.random.Generator, truth: np.ndarray, season: int, rate: float,
                  land: _Land) -> tuple[np.ndarray, np.ndarray]:
  """Dynamic World-like noisy labels with exactly round(rate * pixels) wrong pixels.

  Four error processes each score pixels and propose a wrong label: boundary shifts (one class
  grows into its neighbour by a smoothly varying width), season-dependent flips of whole
  parcels/regions, smooth blobs relabelled to a confusable class, and scattered pixels. Each
  process gets its share (_NOISE_SHARES) of the wrong pixels, taken in its score order; what a
  process cannot fill (few candidates) passes to the next. So the achieved rate is exact at any
  setting while the error structure stays realistic.

  Returns the noisy labels and the source per pixel (0 clean, 1 + index into _NOISE_SOURCES).
  """
  shape = truth.shape
  n = truth.size
  k = int(round(min(max(rate, 0.0), 1.0) * n))
  if k == 0:
    return truth.copy(), np.zeros(shape, np.uint8)
  scores = np.zeros((len(_NOISE_SOURCES),) + shape, np.float32)   # > 0: candidate
  alts = np.empty((len(_NOISE_SOURCES),) + shape, np.uint8)

  other = _edge_neighbour(truth)
  edges = other >= 0
  if edges.any():
    dist, (iy, ix) = ndimage.distance_transform_edt(~edges, return_indices=True)
    nearest = truth[iy, ix]
    alts[0] = np.where(nearest != truth, nearest, other[iy, ix])
    dominance = rng.permutation(NUM_CLASSES)     # which class of a pair grows into the other
    # Stretches of boundary shift by a smoothly varying amount: strong stretches by several
    # pixels, weak ones not at all (rather than a uniform one-pixel ring everywhere).
    strength = _smooth_uniform(rng, shape, 10)
    grows = (dominance[alts[0]] > dominance[truth]) & (dist <= 6)
    scores[0] = np.where(grows, strength ** 2 * np.exp(-dist / (0.5 + 3.0 * strength)), 0)
  else:
    alts[0] = _MOST_CONFUSED[truth]

  alts[1] = _MOST_CONFUSED[truth]
  # Whole parcels (or smooth regions elsewhere) flip together. Two independent region fields,
  # mixed at a different angle per rule, give rules on the same class different regions; at
  # most about half of a class's regions are candidates per rule.
  parcels = rng.standard_normal((2, 65536), dtype=np.float32)
  regions = np.where(land.parcel[None], parcels[:, land.parcel_id],
                     _smooth_noise(rng, shape, 10, 2))
  for r, (true_class, label, strength) in enumerate(_SEASON_FLIPS[season]):
    mixed = np.cos(r * np.pi / 2) * regions[0] + np.sin(r * np.pi / 2) * regions[1]
    region_u = special.ndtr(mixed).astype(np.float32)
    s = np.where((truth == true_class) & (region_u > 0.5), strength * region_u ** 2, 0)
    better = s > scores[1]
    scores[1][better] = s[better]
    alts[1][better] = label

  scores[2] = _smooth_uniform(rng, shape, 7) + 1e-3
  alts[2] = _confusable(truth, _smooth_uniform(rng, shape, 5))

  scores[3] = rng.random(shape, dtype=np.float32) + 1e-3
  alts[3] = _confusable(truth, rng.random(shape, dtype=np.float32))

  noisy = truth.ravel().copy()
  sources = np.zeros(n, np.uint8)
  targets = np.round(np.cumsum(_NOISE_SHARES) * k).astype(np.int64)
  targets[-1] = k
  done = 0
  for j in range(len(_NOISE_SOURCES)):
    score = scores[j].ravel().copy()
    score[sources > 0] = 0
    m = min(int(targets[j]) - done, int(np.count_nonzero(score > 0)))
    if m <= 0:
      continue
    pick = np.argpartition(-score, m - 1)[:m]
    noisy[pick] = alts[j].ravel()[pick]
    sources[pick] = j + 1
    done += m
  same = (noisy == truth.ravel()) & (sources > 0)
  noisy[same] = _MOST_CONFUSED[noisy[same]]
  return noisy.reshape(shape), sources.reshape(shape)


# ----------------------------------------------------------------------------- naming / geometry

_LAT_BANDS = 'CDEFGHJKLMNPQRSTUVWX'
_GRID_LETTERS = 'ABCDEFGHJKLMNPQRSTUVWXYZ'
# (month, first day, window length in days) per season; windows never overlap so that sorted
# acquisition names follow the season order even with the S1 date a few days earlier.
_SEASON_WINDOWS = ((3, 10, 71), (6, 10, 71), (9, 10, 71), (12, 8, 20))
_YEAR = 2020


def _random_grid(rng: np.random.Generator, size_px: int) -> tuple[int, float, float]:
  """A plausible northern UTM zone and upper-left corner, snapped to the 60 m grid."""
  zone = int(rng.integers(10, 56))
  left = 60.0 * int(rng.integers(200_000 // 60, (800_000 - size_px * 10) // 60))
  top = 60.0 * int(rng.integers(2_700_000 // 60, 6_600_000 // 60))
  return zone, left, top


def _utc_time(rng: np.random.Generator, zone: int, local_hours: float) -> datetime.timedelta:
  longitude = (zone - 1) * 6 - 180 + 3
  hours = (local_hours - longitude / 15.0 + rng.uniform(-0.3, 0.3)) % 24
  return datetime.timedelta(seconds=int(hours * 3600))


def _acquisition_names(rng: np.random.Generator, zone: int, top: float
                       ) -> tuple[list[str], list[str]]:
  """Release-style S1 and S2 acquisition folder names, one per season, in season order."""
  band = _LAT_BANDS[int((top / 110_946.0 + 80) // 8)]
  tile = f'T{zone:02d}{band}{rng.choice(list(_GRID_LETTERS))}{rng.choice(list(_GRID_LETTERS[:20]))}'
  satellite = str(rng.choice(['A', 'B']))       # one platform per location keeps sort == season
  ascending = rng.random() < 0.5
  s1_names, s2_names = [], []
  for month, day, length in _SEASON_WINDOWS:
    date = datetime.datetime(_YEAR, month, day)
    date += datetime.timedelta(days=int(rng.integers(0, length + 1)))
    s2_start = date + _utc_time(rng, zone, 10.5)
    s2_names.append(f'{s2_start:%Y%m%dT%H%M%S}_'
                    f'{s2_start + datetime.timedelta(seconds=3):%Y%m%dT%H%M%S}_{tile}')
    s1_date = date - datetime.timedelta(days=int(rng.integers(0, 7)))
    s1_start = s1_date + _utc_time(rng, zone, 18.0 if ascending else 6.0)
    days = (s1_date - datetime.datetime(_YEAR, 3, 18)).days
    orbit = (31730 if satellite == 'A' else 20700) + int(days * 175 / 12) + int(rng.integers(0, 15))
    datatake = ((0x03A8C1 if satellite == 'A' else 0x0273A0) + days * 0x90
                + int(rng.integers(0, 0x90)))
    s1_names.append(f'S1{satellite}_IW_GRDH_1SDV_{s1_start:%Y%m%dT%H%M%S}_'
                    f'{s1_start + datetime.timedelta(seconds=25):%Y%m%dT%H%M%S}_'
                    f'{orbit:06d}_{datatake:06X}_{int(rng.integers(0, 0x10000)):04X}')
  return s1_names, s2_names


# ----------------------------------------------------------------------------- writers

def _rng(seed: int, *stream: int) -> np.random.Generator:
  """Independent stream per (seed, item): an item does not depend on how many are generated."""
  return np.random.default_rng([seed, *stream])


def _season_rate(rng: np.random.Generator, noise: float) -> np.ndarray:
  location_factor = np.exp(rng.normal(0, 0.15) - 0.15 ** 2 / 2)
  return np.clip(noise * location_factor * np.asarray(_SEASON_NOISE_FACTOR), 0, 1)


@dataclasses.dataclass
class _SslStats:
  """What the summary reports about the SSL4EO part, accumulated location by location."""
  confusion: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(
      (constants.NUM_SEASONS, NUM_CLASSES, NUM_CLASSES), np.int64))   # [season, truth, noisy]
  sources: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(len(_NOISE_SOURCES) + 1, np.int64))
  s1_nonfinite: int = 0
  cloudy: int = 0
  border_locations: list[str] = dataclasses.field(default_factory=list)
  crs: dict[str, str] = dataclasses.field(default_factory=dict)
  biomes: dict[str, str] = dataclasses.field(default_factory=dict)

  def add(self, season: int, truth: np.ndarray, noisy: np.ndarray, sources: np.ndarray,
          s1: np.ndarray, cloudy: bool) -> None:
    pairs = truth.ravel().astype(np.int64) * NUM_CLASSES + noisy.ravel()
    self.confusion[season] += np.bincount(pairs, minlength=NUM_CLASSES ** 2).reshape(
        NUM_CLASSES, NUM_CLASSES)
    self.sources += np.bincount(sources.ravel(), minlength=len(_NOISE_SOURCES) + 1)
    self.s1_nonfinite += int(np.count_nonzero(~np.isfinite(s1)))
    self.cloudy += int(cloudy)


def _make_location(root: str, seed: int, loc: int, noise: float, biome: _Biome,
                   stats: _SslStats) -> None:
  """Writes one SSL4EO-S12 location: 4 seasons of S1, S2 (native resolutions) and labels."""
  rng = _rng(seed, 1, loc)
  size = constants.TILE_SIZE
  zone, left, top = _random_grid(rng, size)
  crs = geotiff.utm_crs(zone)
  transform10 = geotiff.north_up_transform(left, top, 10)
  s1_names, s2_names = _acquisition_names(rng, zone, top)
  land = _make_land(rng, (size, size), biome)
  look = _make_look(rng)
  rates = _season_rate(rng, noise)
  # Swath borders (NaN beyond, -inf at the edge) at every 4th location and a few others.
  border = loc % 4 == 0 or rng.random() < 0.15
  border_seasons = ({0} | {s for s in range(1, 4) if rng.random() < 0.5}) if border else set()
  loc_id = f'{loc:07d}'
  for s in range(constants.NUM_SEASONS):
    truth = land.truth[s]
    green = _greenness(rng, land, truth, s)
    cloud = rng.uniform(0.05, 0.5) if rng.random() < _CLOUD_PROB[s] else 0.0
    refl = _render_s2(rng, land, truth, green, s, look, cloud_cover=cloud, haze_prob=0.3)
    s2_dir = os.path.join(root, 's2c', loc_id, s2_names[s])
    for name, res, band in zip(constants.S2_BANDS, constants.S2_RESOLUTION_M,
                               _native_bands(refl)):
      geotiff.write_geotiff(os.path.join(s2_dir, f'{name}.tif'), _to_uint16(band), crs=crs,
                            transform=geotiff.north_up_transform(left, top, res),
                            band_names=(name,))
    s1 = _render_s1(rng, land, truth, green, s, look, border=s in border_seasons)
    s1_dir = os.path.join(root, 's1', loc_id, s1_names[s])
    for name, band in zip(constants.S1_BANDS, s1):
      geotiff.write_geotiff(os.path.join(s1_dir, f'{name}.tif'), band, crs=crs,
                            transform=transform10, band_names=(name,))
    noisy, sources = _noisy_labels(rng, truth, s, float(rates[s]), land)
    for kind, labels in (('clean', truth), ('noisy', noisy)):
      geotiff.write_geotiff(os.path.join(root, 'labels', kind, loc_id, f'{s}.tif'), labels,
                            crs=crs, transform=transform10)
    stats.add(s, truth, noisy, sources, s1, cloud > 0)
  if border:
    stats.border_locations.append(loc_id)
  stats.crs[loc_id] = f'EPSG:{crs.to_epsg()}'
  stats.biomes[loc_id] = biome.name


def _write_manifests(root: str, location_ids: Sequence[str]) -> None:
  for kind in ('noisy', 'clean'):
    lines = ['location,season,path']
    lines += [f'{loc},{s},{kind}/{loc}/{s}.tif' for loc in location_ids
              for s in range(constants.NUM_SEASONS)]
    geotiff.write_text(os.path.join(root, 'labels', f'{kind}_manifest.csv'),
                       '\n'.join(lines) + '\n')


def _dw_to_dfc_table() -> np.ndarray:
  """uint8 [classes]: DW class -> DFC2020 code (inverse of constants.DFC_TO_DW8, snow -> 8)."""
  table = np.zeros(NUM_CLASSES, np.uint8)
  for dfc, dw in constants.DFC_TO_DW8.items():
    table[dw] = dfc
  table[SNOW] = DFC_SNOW
  return table


_DW_TO_DFC = _dw_to_dfc_table()


def _make_dfc_patch(root: str, seed: int, split_index: int, split: str, i: int) -> np.ndarray:
  """Writes one DFC2020 patch (S1, S2 on the 10 m grid, clean DFC labels); returns the labels."""
  rng = _rng(seed, 2, split_index, i)
  # Snow and savanna (the classes DFC2020 evaluation ignores) stay rare but present from p3/p5.
  snowy = i % 13 == 5
  savanna = i % 11 == 3 or rng.random() < 0.02
  biome = _ALPINE if snowy else _BIOMES[int(rng.integers(len(_BIOMES)))]
  season = 0 if snowy else int(rng.integers(constants.NUM_SEASONS))   # spring: partial snow
  size = DFC_PATCH_SIZE
  zone, left, top = _random_grid(rng, size)
  crs, transform = geotiff.utm_crs(zone), geotiff.north_up_transform(left, top, 10)
  land = _make_land(rng, (size, size), biome, savanna=savanna, snow=snowy)
  look = _make_look(rng)
  truth = land.truth[season]
  green = _greenness(rng, land, truth, season)
  refl = _render_s2(rng, land, truth, green, season, look, cloud_cover=0.0, haze_prob=0.15)
  s1 = _render_s1(rng, land, truth, green, season, look, border=False)
  labels = _DW_TO_DFC[truth]
  if land.savanna is not None:
    labels[land.savanna] = DFC_SAVANNA
  stem = f'ROIs0000_{split}_{{}}_0_p{i}.tif'
  geotiff.write_geotiff(os.path.join(root, split, f's1_{split}', stem.format('s1')), s1, crs=crs,
                        transform=transform, band_names=constants.S1_BANDS)
  geotiff.write_geotiff(os.path.join(root, split, f's2_{split}', stem.format('s2')),
                        _to_uint16(_native_on_10m(refl)), crs=crs, transform=transform,
                        band_names=constants.S2_BANDS)
  geotiff.write_geotiff(os.path.join(root, split, f'dfc_{split}', stem.format('dfc')), labels,
                        crs=crs, transform=transform)
  return labels


def _make_scene(root: str, seed: int, size: tuple[int, int]) -> dict[str, Any]:
  """Writes a summer S2 + S1 scene on one 10 m UTM grid, plus its DW truth map."""
  rng = _rng(seed, 3)
  zone, left, top = _random_grid(rng, max(size))
  crs, transform = geotiff.utm_crs(zone), geotiff.north_up_transform(left, top, 10)
  season = 1
  land = _make_land(rng, size, _SCENE_BIOME, snow=False)
  look = _make_look(rng)
  truth = land.truth[season]
  green = _greenness(rng, land, truth, season)
  refl = _render_s2(rng, land, truth, green, season, look, cloud_cover=0.0, haze_prob=0.0)
  s1 = _render_s1(rng, land, truth, green, season, look, border=False)
  geotiff.write_geotiff(os.path.join(root, 's2.tif'), _to_uint16(_native_on_10m(refl)), crs=crs,
                        transform=transform, band_names=constants.S2_BANDS)
  geotiff.write_geotiff(os.path.join(root, 's1.tif'), s1, crs=crs, transform=transform,
                        band_names=constants.S1_BANDS)
  geotiff.write_geotiff(os.path.join(root, 'truth.tif'), truth, crs=crs, transform=transform)
  counts = np.bincount(truth.ravel(), minlength=NUM_CLASSES)
  return {'shape': list(size), 'crs': f'EPSG:{crs.to_epsg()}', 'season': SEASONS[season],
          'truth_class_fractions': _fractions(counts)}


def _fractions(counts: np.ndarray) -> dict[str, float]:
  """Per-DW-class share of `counts`, keyed by class name."""
  total = max(int(counts.sum()), 1)
  return {name: round(float(c) / total, 4) for name, c in zip(constants.DW_CLASSES, counts)}


def _ssl_summary(stats: _SslStats, locations: int) -> dict[str, Any]:
  confusion = stats.confusion
  per_season = np.trace(confusion, axis1=1, axis2=2) / confusion.sum(axis=(1, 2))
  overall = float(np.trace(confusion.sum(0)) / confusion.sum())
  wrong = max(int(stats.sources[1:].sum()), 1)
  seasons = constants.NUM_SEASONS
  return {
      'label_agreement': {
          'overall': round(overall, 4),
          'per_season': {name: round(float(a), 4) for name, a in zip(SEASONS, per_season)},
      },
      'noise_achieved': round(1 - overall, 4),
      'ssl4eo': {
          'root': 'ssl4eo',
          'locations': locations,
          'seasons': seasons,
          's1_files': locations * seasons * len(constants.S1_BANDS),
          's2_files': locations * seasons * len(constants.S2_BANDS),
          'label_files': 2 * locations * seasons,
          'manifests': {'noisy': 'labels/noisy_manifest.csv',
                        'clean': 'labels/clean_manifest.csv'},
          'biomes': stats.biomes,
          'crs': stats.crs,
          's1_nonfinite_values': stats.s1_nonfinite,
          's1_locations_with_swath_border': stats.border_locations,
          'cloudy_s2_acquisitions': stats.cloudy,
          'truth_class_fractions': _fractions(confusion.sum(axis=(0, 2))),
          'noisy_class_fractions': _fractions(confusion.sum(axis=(0, 1))),
          'noise_sources': {name: round(float(stats.sources[i + 1]) / wrong, 4)
                            for i, name in enumerate(_NOISE_SOURCES)},
          'confusion_truth_rows_noisy_cols': confusion.sum(0).tolist(),
      },
  }


def _own_files(out_dir: str) -> set[str]:
  """Relative paths of every file (or link) under the entries this tool writes."""
  found = set()
  for entry in _OUTPUTS:
    path = os.path.join(out_dir, entry)
    if os.path.isfile(path) or os.path.islink(path):
      found.add(entry)
    for folder, _, names in os.walk(path):
      found.update(os.path.relpath(os.path.join(folder, n), out_dir) for n in names)
  return found


def _read_marker(out_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(out_dir, _MARKER), encoding='utf-8') as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    marker = json.loads(text)
  except ValueError:
    marker = None
  if not isinstance(marker, dict) or marker.get('written_by') != 'data_prep.make_demo':
    return {'legacy': True}  # An older make_demo: it did not record which files it wrote.
  return marker


def _prepare_output(out_dir: str) -> list[str]:
  """Refuses to write over data this tool did not make; deletes only its own recorded files.

  The marker lists the files a completed run wrote; during a run it lists the files that were
  there before (the user's), so after a kill everything else counts as this tool's. Files the
  user put among the demo files (also later) are never deleted. Returns the user's files.
  """
  present = [p for p in _OUTPUTS if os.path.lexists(os.path.join(out_dir, p))]
  marker = _read_marker(out_dir)
  if present and marker is None:
    raise FileExistsError(
        f'{out_dir} already holds {", ".join(present)} not written by data_prep.make_demo; '
        'choose an empty --out folder.')
  if present and marker.get('legacy'):
    raise FileExistsError(
        f'{out_dir} was written by an older data_prep.make_demo that did not record its files; '
        f'delete {", ".join(present)} yourself or choose an empty --out folder.')
  if marker is not None and not marker.get('legacy'):
    if marker.get('complete'):
      ours = set(marker.get('files', ())) & _own_files(out_dir)
    else:  # A run killed midway: all but what was there before it started.
      ours = _own_files(out_dir) - set(marker.get('kept', ()))
    for rel in sorted(ours):
      os.remove(os.path.join(out_dir, rel))
    for entry in _OUTPUTS:  # Folders left empty (deepest first); the user's files keep theirs.
      for folder, _, _ in sorted(os.walk(os.path.join(out_dir, entry)), reverse=True):
        with contextlib.suppress(OSError):
          os.rmdir(folder)
  os.makedirs(out_dir, exist_ok=True)
  kept = sorted(_own_files(out_dir))
  geotiff.write_text(os.path.join(out_dir, _MARKER), json.dumps(
      {'written_by': 'data_prep.make_demo', 'complete': False, 'kept': kept}, indent=1) + '\n')
  return kept


def _record_output(out_dir: str, kept: Sequence[str]) -> None:
  """Marks the run complete, listing the files it wrote (all there but the user's)."""
  files = sorted(_own_files(out_dir) - set(kept))
  geotiff.write_text(os.path.join(out_dir, _MARKER), json.dumps(
      {'written_by': 'data_prep.make_demo', 'complete': True, 'files': files, 'kept': list(kept)},
      indent=1) + '\n')


def make_demo(out_dir: str | os.PathLike, *, locations: int = 24, noise: float = 0.3,
              seed: int = 0, dfc_validation: int = 24, dfc_test: int = 48,
              scene_size: tuple[int, int] | None = DEFAULT_SCENE_SIZE,
              progress: bool = False) -> dict[str, Any]:
  """Generates the demo SSL4EO-S12, DFC2020 and scene data under `out_dir`.

  Deterministic per `seed`; each location/patch has its own random stream, so the first n
  locations are the same whatever `locations` is. `noise` is the fraction of label pixels made
  wrong (per location and season it varies around that value, like DW's quality does).
  `scene_size` (rows, cols) or None to skip the scene. Returns the summary also written to
  `out_dir/summary.json`.
  """
  if locations < 1:
    raise ValueError(f'locations must be >= 1, got {locations}')
  if not 0.0 <= noise <= 1.0:
    raise ValueError(f'noise must be in [0, 1], got {noise}')
  if dfc_validation < 0 or dfc_test < 0:
    raise ValueError('DFC patch counts must be >= 0')
  if scene_size is not None and min(scene_size) < 16:
    raise ValueError(f'scene_size must be at least 16x16, got {scene_size}')
  out_dir = os.fspath(out_dir)
  kept = _prepare_output(out_dir)
  start = time.perf_counter()

  def say(message: str) -> None:
    if progress:
      print(f'{message} ({time.perf_counter() - start:.1f} s)', flush=True)

  root = os.path.join(out_dir, 'ssl4eo')
  biome_order = _rng(seed, 0).permutation(len(_BIOMES))   # every biome within 6 locations
  stats = _SslStats()
  location_ids = [f'{loc:07d}' for loc in range(locations)]
  for loc in tqdm.tqdm(range(locations), desc='ssl4eo locations', disable=not progress,
                       unit='loc', file=sys.stdout):
    _make_location(root, seed, loc, noise, _BIOMES[biome_order[loc % len(_BIOMES)]], stats)
  _write_manifests(root, location_ids)
  say(f'ssl4eo: {locations} locations written')

  dfc_summary = {}
  for split_index, (split, count) in enumerate(zip(DFC_SPLITS, (dfc_validation, dfc_test))):
    counts = np.zeros(11, np.int64)
    for i in tqdm.tqdm(range(1, count + 1), desc=f'dfc2020 {split}', disable=not progress,
                       unit='patch', file=sys.stdout):
      labels = _make_dfc_patch(os.path.join(out_dir, 'dfc2020'), seed, split_index, split, i)
      counts += np.bincount(labels.ravel(), minlength=11)
    ignored = counts[DFC_SAVANNA] + counts[DFC_SNOW]
    dfc_summary[split] = {
        'patches': count,
        'class_pixels': {str(c): int(counts[c]) for c in range(1, 11)},
        'ignored_pixel_fraction': round(float(ignored) / max(int(counts.sum()), 1), 4),
    }
  say(f'dfc2020: {dfc_validation} validation + {dfc_test} test patches written')

  scene_summary = None
  if scene_size is not None:
    scene_summary = _make_scene(os.path.join(out_dir, 'scene'), seed, tuple(scene_size))
    say(f'scene: {scene_size[0]}x{scene_size[1]} written')

  summary = {
      'generator': 'data_prep.make_demo',
      'seed': seed,
      'noise_requested': noise,
      **_ssl_summary(stats, locations),
      'dfc2020': {'root': 'dfc2020', **dfc_summary},
      'scene': scene_summary,
  }
  geotiff.write_text(os.path.join(out_dir, 'summary.json'), json.dumps(summary, indent=2) + '\n')
  _record_output(out_dir, kept)
  summary['elapsed_s'] = round(time.perf_counter() - start, 2)
  return summary


def _scene_size(text: str) -> tuple[int, int]:
  try:
    rows, cols = (int(p) for p in text.lower().split('x'))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected ROWSxCOLS such as 700x900, got {text!r}') from None
  if rows < 16 or cols < 16:
    raise argparse.ArgumentTypeError(f'scene must be at least 16x16, got {text!r}')
  return rows, cols


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'expected an integer >= 0, got {text!r}')
  return value


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}')
  return value


def _fraction(text: str) -> float:
  value = float(text)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f'expected a fraction in [0, 1], got {text!r}')
  return value


def build_parser() -> argparse.ArgumentParser:
  """The command line of `python -m data_prep.make_demo` (one place, also used by tests)."""
  parser = argparse.ArgumentParser(
      prog='python -m data_prep.make_demo',
      description='Write synthetic SSL4EO-S12 (+ noisy/clean DW labels), DFC2020 and a map '
                  'scene in the real on-disk layouts, for demos and tests.')
  parser.add_argument('--out', required=True,
                      help='output folder (created; output of an earlier run is replaced, other '
                           'existing data is never overwritten)')
  parser.add_argument('--locations', type=_positive_int, default=24,
                      help='SSL4EO-S12 locations, 4 seasonal acquisitions each (default 24)')
  parser.add_argument('--noise', type=_fraction, default=0.3,
                      help='fraction of noisy-label pixels that differ from the truth, in [0, 1] '
                           '(default 0.3; varies a little by location and season)')
  parser.add_argument('--seed', type=int, default=0,
                      help='random seed; the same seed gives byte-identical files (default 0)')
  parser.add_argument('--dfc-validation', type=_non_negative_int, default=24,
                      help='DFC2020 "validation" patches, 256x256 (default 24)')
  parser.add_argument('--dfc-test', type=_non_negative_int, default=48,
                      help='DFC2020 "test" patches, 256x256 (default 48)')
  parser.add_argument('--scene-size', type=_scene_size, default=DEFAULT_SCENE_SIZE,
                      metavar='ROWSxCOLS',
                      help='size of the prediction scene in 10 m pixels (default 700x900)')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Generates the demo data and prints what was written and the achieved label agreement."""
  args = build_parser().parse_args(argv)
  summary = make_demo(args.out, locations=args.locations, noise=args.noise, seed=args.seed,
                      dfc_validation=args.dfc_validation, dfc_test=args.dfc_test,
                      scene_size=args.scene_size, progress=True)
  agreement = summary['label_agreement']
  ssl = summary['ssl4eo']
  print(f'wrote {args.out}: {ssl["locations"]} locations x {ssl["seasons"]} seasons '
        f'({ssl["s1_files"]} S1 + {ssl["s2_files"]} S2 + {ssl["label_files"]} label files), '
        f'DFC2020 {args.dfc_validation} validation + {args.dfc_test} test patches, '
        f'scene {args.scene_size[0]}x{args.scene_size[1]} in {summary["elapsed_s"]} s')
  print(f'noisy/clean label agreement (requested {1 - args.noise:.3f}): '
        f'overall {agreement["overall"]:.3f}; '
        + ', '.join(f'{k} {v:.3f}' for k, v in agreement['per_season'].items()))
  print('noise sources: ' + ', '.join(f'{k} {v:.0%}' for k, v in ssl['noise_sources'].items()))
  dfc = summary['dfc2020']
  print('DFC2020 pixels in ignored classes (savanna, snow): '
        + ', '.join(f'{split} {dfc[split]["ignored_pixel_fraction"]:.1%}' for split in DFC_SPLITS))
  print(f'S1 non-finite values: {ssl["s1_nonfinite_values"]} '
        f'(locations with a swath border: {len(ssl["s1_locations_with_swath_border"])}); '
        f'cloudy S2 acquisitions: {ssl["cloudy_s2_acquisitions"]}')
  print(f'summary: {os.path.join(args.out, "summary.json")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
