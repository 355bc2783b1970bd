"""Mapping as GIS users need it: streamed == whole-scene, COG, legend, inputs as users have them.

The reference for "streamed == in-memory" is the whole-scene algorithm of the previous
`predict.py` (whole normalised scene in memory, one strip of accumulated probabilities over the
full width), kept below as `_whole_scene_probs`; the streamed map must equal it bit for bit.
"""
import hashlib
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine

from helpers import TinyClassifier, patchy_s2_scene
from cromss_jax import constants
from cromss_jax import mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UTM = CRS.from_epsg(32632)
UTM_T = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)
WGS84 = CRS.from_epsg(4326)
WGS84_T = Affine(1e-4, 0.0, 9.0, 0.0, -1e-4, 45.1)


def write_tif(path, data, *, crs=UTM, transform=UTM_T, nodata=None, descriptions=None, **kw):
  profile = dict(driver='GTiff', height=data.shape[1], width=data.shape[2], count=data.shape[0],
                 dtype=data.dtype, crs=crs, transform=transform, nodata=nodata)
  profile.update(kw)
  with rasterio.open(path, 'w', **profile) as dst:
    dst.write(data)
    for i, d in enumerate(descriptions or ()):
      dst.set_band_description(i + 1, d)
  return str(path)


def s2_scene(height, width, seed=0, nodata_rows=0):
  """uint16 13-band scene of 4 "land covers" in 25 px patches plus noise; the first
  `nodata_rows` rows and a block are nodata (all bands 0)."""
  scene = patchy_s2_scene(height, width, seed)
  scene[:, :nodata_rows] = 0
  scene[:, height // 2:height // 2 + 7, 5:40] = 0
  return scene


def toy_predictor(kernel=3, subset=constants.S2_BAND_SUBSETS[13], with_s1=False):
  """A small conv net (receptive field 2 * kernel - 1); with_s1: it also reads S1."""
  net = TinyClassifier(kernel)
  channels = len(subset) + (2 if with_s1 else 0)
  variables = net.init(jax.random.PRNGKey(kernel), jnp.zeros((1, 8, 8, channels)))

  @jax.jit
  def apply(v, inputs):
    x = inputs['s2'].astype(jnp.float32) / 255.0
    if with_s1:
      x = jnp.concatenate([x, inputs['s1'].astype(jnp.float32) / 255.0], -1)
    return jax.nn.softmax(net.apply(v, (x - 0.5) * 4.0))

  return mapping.Predictor(probs_fn=lambda inputs: apply(variables, inputs),
                           class_names=tuple(f'class {i}' for i in range(5)),
                           s2_bands=tuple(subset), uses_s1=with_s1, description='toy')


def _whole_scene_probs(predictor, scene, window, overlap, batch):
  """The previous in-memory algorithm: whole normalised scene, one full-width strip."""
  subset = predictor.s2_bands
  block = np.moveaxis(scene[list(subset)], 0, -1)
  image, _ = constants.normalise_to_uint8(block, [constants.S2_MEAN[i] for i in subset],
                                          [constants.S2_STD[i] for i in subset])
  nodata = np.all(block == 0, -1)
  height, width = image.shape[:2]
  grid = mapping.WindowGrid.create(height, width, window, overlap)
  w1 = mapping.taper(window, window - grid.stride)
  weights = np.outer(w1, w1)
  out = np.zeros((height, width, len(predictor.class_names)), np.float32)
  acc, norm = None, np.zeros((window, grid.padded_width), np.float32)
  for row in range(grid.rows):
    ys = mapping.reflect_indices(row * grid.stride - grid.margin, window, height)
    windows = []
    for col in range(grid.cols):
      xs = mapping.reflect_indices(col * grid.stride - grid.margin, window, width)
      windows.append((col, image[ys[:, None], xs[None, :]]))
    for start in range(0, len(windows), batch):
      chunk = windows[start:start + batch]
      stacked = np.stack([w for _, w in chunk])
      stacked = np.concatenate([stacked, np.zeros((batch - len(chunk),) + stacked.shape[1:],
                                                  stacked.dtype)])
      probs = np.asarray(predictor.probs_fn({'s2': stacked}), np.float32)
      if acc is None:
        acc = np.zeros((window, grid.padded_width, probs.shape[-1]), np.float32)
      for i, (col, _) in enumerate(chunk):
        x0 = col * grid.stride
        acc[:, x0:x0 + window] += probs[i] * weights[..., None]
        norm[:, x0:x0 + window] += weights
    done = grid.stride if row < grid.rows - 1 else window
    y0 = row * grid.stride - grid.margin
    first, last = max(y0, 0), min(y0 + done, height)
    if last > first:
      strip = slice(first - y0, last - y0)
      cols = slice(grid.margin, grid.margin + width)
      out[first:last] = acc[strip, cols] / norm[strip, cols, None]
    acc = np.concatenate([acc[done:], np.zeros_like(acc[:done])])
    norm = np.concatenate([norm[done:], np.zeros_like(norm[:done])])
  return out, nodata


def _expected_bands(probs, nodata):
  classes = np.argmax(probs, -1).astype(np.uint8)
  conf = np.minimum(np.rint(probs.max(-1) * 255.0), 254).astype(np.uint8)
  classes[nodata] = conf[nodata] = 255
  return classes, conf


@pytest.mark.slow
def test_streamed_map_equals_the_whole_scene_computation(tmp_path):
  height, width = 331, 1187                    # odd; 3 column blocks of 512 px
  scene = s2_scene(height, width, seed=1, nodata_rows=150)
  s2 = write_tif(tmp_path / 's2.tif', scene)
  predictor = toy_predictor(kernel=3)
  out = str(tmp_path / 'map.tif')
  summary = mapping.predict_scene(predictor, out, s2_path=s2, window=64, overlap=24, batch=6,
                                  confidence=True, progress=False, block_width=512)
  probs, nodata = _whole_scene_probs(predictor, scene, 64, 24, 6)
  classes, conf = _expected_bands(probs, nodata)
  with rasterio.open(out) as src:
    got_classes, got_conf = src.read()
  np.testing.assert_array_equal(got_classes, classes)
  np.testing.assert_array_equal(got_conf, conf)
  assert len(np.unique(classes[~nodata])) > 2          # a map, not one class
  assert summary['windows_skipped'] > 0                # the nodata rows were not computed
  assert summary['windows_computed'] + summary['windows_skipped'] == summary['windows']
  assert summary['nodata_pixels'] == nodata.sum()
  assert sum(summary['pixels_per_class'].values()) == (~nodata).sum()
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def _check_cog(path):
  with rasterio.open(path) as src:
    assert src.driver == 'GTiff'
    assert src.tags(ns='IMAGE_STRUCTURE').get('LAYOUT') == 'COG'
    assert src.profile['tiled'] and src.block_shapes[0] == (512, 512)
    assert src.compression is not None and src.compression.value == 'DEFLATE'
    assert src.overviews(1) == [2] and src.overviews(2) == [2]
    assert src.nodata == 255 and src.colormap(1)[0][:3] == constants.DW_PALETTE[0]
    # The overview is a nearest-neighbour subsample: values stay class indices (or nodata).
    overview = src.read(1, out_shape=(src.height // 2, src.width // 2))
    assert set(np.unique(overview)) <= set(range(5)) | {255}
    return src.read(), src.crs, src.transform


@pytest.mark.parametrize('crs,transform', [(UTM, UTM_T), (WGS84, WGS84_T)],
                         ids=['utm', 'epsg4326'])
@pytest.mark.slow
def test_cog_with_legend_in_the_input_crs(tmp_path, crs, transform):
  height, width = 613, 701
  scene = s2_scene(height, width, seed=2, nodata_rows=40)
  s2 = write_tif(tmp_path / 's2.tif', scene, crs=crs, transform=transform)
  predictor = toy_predictor(kernel=1)
  out = str(tmp_path / 'map.tif')
  summary = mapping.predict_scene(predictor, out, s2_path=s2, window=128, overlap=32, batch=8,
                                  confidence=True, progress=False)
  (classes, _), got_crs, got_transform = _check_cog(out)
  assert got_crs == crs and got_transform == transform
  assert np.all(classes[:40] == 255) and not np.any(classes[60:height // 2] == 255)

  # QGIS style: one palette entry per class with its name and colour; 255 declared nodata.
  qml = ET.parse(tmp_path / 'map.qml').getroot()
  renderer = qml.find('pipe/rasterrenderer')
  assert renderer.get('type') == 'paletted' and renderer.get('band') == '1'
  entries = renderer.findall('colorPalette/paletteEntry')
  assert [(int(e.get('value')), e.get('label'), e.get('color')) for e in entries] == [
      (i, f'class {i}', '#%02x%02x%02x' % constants.DW_PALETTE[i]) for i in range(5)]
  ranges = qml.findall('noData/noDataList/noDataRange')
  assert [(r.get('min'), r.get('max')) for r in ranges] == [('255', '255')]
  transparent = renderer.find('rasterTransparency/singleValuePixelList/pixelListEntry')
  assert transparent.get('min') == '255' and transparent.get('percentTransparent') == '100'

  # GDAL sidecar: category names and a thematic attribute table with colours and counts.
  pam = ET.parse(out + '.aux.xml').getroot()
  band = pam.find('PAMRasterBand')
  assert band.get('band') == '1'
  assert [c.text for c in band.findall('CategoryNames/Category')] == [
      f'class {i}' for i in range(5)]
  table = band.find('GDALRasterAttributeTable')
  assert [f.find('Name').text for f in table.findall('FieldDefn')] == [
      'Value', 'Class', 'Red', 'Green', 'Blue', 'Count']
  rows = [[f.text for f in row.findall('F')] for row in table.findall('Row')]
  assert rows == [[str(i), f'class {i}', *map(str, constants.DW_PALETTE[i]),
                   str(summary['pixels_per_class'][f'class {i}'])] for i in range(5)]
  assert sum(int(r[-1]) for r in rows) == int(np.sum(classes != 255))
  with rasterio.open(out) as src:              # GDAL reads the sidecar with the map
    assert src.tags(1, ns='LEGEND') == {'qml': 'map.qml'} and src.tags(1)['0'] == 'class 0'


def _stack(tmp_path, scene, name='s2.tif', **kw):
  return write_tif(tmp_path / name, scene, **kw)


@pytest.mark.slow
def test_s2_as_band_files_vrt_and_l2a(tmp_path):
  height, width = 150, 210                   # multiples of 6: the 60 m grid fits exactly
  scene = s2_scene(height, width, seed=3)
  stacked = _stack(tmp_path, scene)
  predictor = toy_predictor(kernel=1)

  def classes(s2, model=predictor, **kw):
    out = str(tmp_path / f'map_{len(os.listdir(tmp_path))}.tif')
    mapping.predict_scene(model, out, s2_path=s2, window=64, overlap=16, batch=8,
                          progress=False, **kw)
    with rasterio.open(out) as src:
      assert src.crs == UTM and src.transform == UTM_T and src.shape == (height, width)
      return src.read(1)

  reference = classes(stacked)

  # A folder of band files on the 10 m grid, named as users have them (B01.tif, B2.tif, a
  # SAFE-style ..._B8A.jp2, lossless JPEG 2000): exactly the stacked file's map.
  folder = tmp_path / 'bands10'
  folder.mkdir()
  for i, band in enumerate(constants.S2_BANDS):
    if band in ('B8A', 'B11'):
      write_tif(folder / f'T32TNS_20200601T101559_{band}.jp2', scene[i:i + 1],
                driver='JP2OpenJPEG', QUALITY='100', REVERSIBLE='YES')
    elif i % 2:
      write_tif(folder / f'B{int(band[1:]):02d}.tif', scene[i:i + 1])
    else:
      write_tif(folder / f'{band}.tif', scene[i:i + 1])
  (folder / 'TCI.tif').write_bytes(b'ignored: not a band')
  np.testing.assert_array_equal(classes(str(folder)), reference)

  # A VRT stacking those files is read like any raster.
  names = sorted((n for n in os.listdir(folder) if n != 'TCI.tif'),
                 key=lambda n: constants.S2_BANDS.index(mapping.s2_band_name(n[:-4])))
  sources = ''.join(
      f'<VRTRasterBand dataType="UInt16" band="{i + 1}"><SimpleSource><SourceFilename '
      f'relativeToVRT="1">bands10/{name}</SourceFilename><SourceBand>1</SourceBand>'
      '</SimpleSource></VRTRasterBand>' for i, name in enumerate(names))
  vrt = tmp_path / 'scene.vrt'
  vrt.write_text(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>EPSG:32632'
                 f'</SRS><GeoTransform>{", ".join(map(str, UTM_T.to_gdal()))}</GeoTransform>'
                 f'{sources}</VRTDataset>')
  np.testing.assert_array_equal(classes(str(vrt)), reference)

  # Band files at native resolution (20 m and 60 m bands block-averaged), resampled on the fly
  # onto the finest band's grid: the map stays on the 10 m grid and close to the 10 m map.
  native = tmp_path / 'native'
  native.mkdir()
  for i, band in enumerate(constants.S2_BANDS):
    f = constants.S2_RESOLUTION_M[i] // 10
    data = scene[i].reshape(height // f, f, width // f, f).mean((1, 3)).astype(np.uint16)
    write_tif(native / f'{band}.tif', data[None],
              transform=UTM_T @ Affine.scale(f))
  agreement = np.mean(classes(str(native)) == reference)
  assert agreement > 0.8, agreement

  # L2A: 12 bands (no B10). A 12-band model reads it; a 13-band model refuses it by name.
  l2a = constants.S2_BAND_SUBSETS[12]
  model12 = toy_predictor(kernel=1, subset=l2a)
  l2a_file = _stack(tmp_path, scene[list(l2a)], name='l2a.tif')
  np.testing.assert_array_equal(classes(l2a_file, model12), classes(stacked, model12))
  model9 = toy_predictor(kernel=1, subset=constants.S2_BAND_SUBSETS[9])
  np.testing.assert_array_equal(classes(l2a_file, model9), classes(stacked, model9))
  with pytest.raises(mapping.PredictionError, match=r'lacks band\(s\) B10.*12 bands'):
    classes(l2a_file)
  os.remove(folder / 'B10.tif')
  with pytest.raises(mapping.PredictionError, match=r'bands10 lacks band\(s\) B10'):
    classes(str(folder))
  # Band descriptions, when they name the bands, decide the order.
  shuffled = [12, 0, 5, 3, 1, 2, 4, 6, 7, 8, 9, 10, 11]
  named = _stack(tmp_path, scene[shuffled], name='named.tif',
                 descriptions=[f'B{constants.S2_BANDS[i][1:].zfill(2)}' for i in shuffled])
  np.testing.assert_array_equal(classes(named), reference)


def test_s1_on_its_own_grid_is_reprojected(tmp_path):
  from rasterio.warp import Resampling, reproject, transform_bounds
  height, width = 120, 160
  scene = s2_scene(height, width, seed=4)
  s2 = _stack(tmp_path, scene)
  # S1 in EPSG:4326 at ~2/3 of the S2 pixel, covering the S2 scene with a margin.
  west, south, east, north = transform_bounds(UTM, WGS84, 500_000, 5_000_000 - 10 * height,
                                              500_000 + 10 * width, 5_000_000)
  step = 6e-5
  s1_t = Affine(step, 0, west - 20 * step, 0, -step, north + 20 * step)
  s1_h, s1_w = int((north - south) / step) + 40, int((east - west) / step) + 40
  yy, xx = np.mgrid[0:s1_h, 0:s1_w]
  s1 = np.stack([-15 + 5 * np.sin(xx / 9.0), -22 + 4 * np.cos(yy / 7.0)]).astype(np.float32)
  s1_path = write_tif(tmp_path / 's1_wgs84.tif', s1, crs=WGS84, transform=s1_t)
  predictor = toy_predictor(kernel=1, with_s1=True)

  def run(s1_file, name):
    out = str(tmp_path / name)
    mapping.predict_scene(predictor, out, s2_path=s2, s1_path=s1_file, window=64, overlap=16,
                          batch=8, progress=False)
    with rasterio.open(out) as src:
      assert src.crs == UTM and src.transform == UTM_T
      return src.read(1)

  # Reference: S1 reprojected beforehand onto the S2 grid (what a user would do with gdalwarp).
  on_grid = np.full((2, height, width), np.nan, np.float32)
  reproject(s1, on_grid, src_transform=s1_t, src_crs=WGS84, dst_transform=UTM_T, dst_crs=UTM,
            resampling=Resampling.bilinear, src_nodata=np.nan, dst_nodata=np.nan)
  expected = run(write_tif(tmp_path / 's1_on_grid.tif', on_grid), 'expected.tif')
  with pytest.MonkeyPatch.context() as patch:
    notes = []
    patch.setattr(mapping.logging, 'info', lambda msg, *a: notes.append(msg % a))
    got = run(s1_path, 'map.tif')
  assert any('reprojected onto it on the fly' in n and 's1_wgs84.tif' in n for n in notes)
  assert np.mean(got == expected) > 0.99

  # Refused only when S1 does not overlap S2 at all.
  far = Affine(step, 0, west + 1.0, 0, -step, north)
  with pytest.raises(mapping.PredictionError, match='does not overlap'):
    run(write_tif(tmp_path / 's1_far.tif', s1, crs=WGS84, transform=far), 'x.tif')


def test_inputs_without_crs_and_bad_inputs(tmp_path):
  scene = s2_scene(64, 96, seed=5)
  predictor = toy_predictor(kernel=1)
  plain = tmp_path / 'plain.tif'
  with rasterio.open(plain, 'w', driver='GTiff', height=64, width=96, count=13,
                     dtype='uint16') as dst:
    dst.write(scene)
  out = str(tmp_path / 'map.tif')
  kw = dict(window=64, overlap=0, batch=2, progress=False)
  with pytest.raises(mapping.PredictionError, match='no georeferencing.*--allow_no_crs'):
    mapping.predict_scene(predictor, out, s2_path=str(plain), **kw)
  assert not os.path.exists(out)
  mapping.predict_scene(predictor, out, s2_path=str(plain), allow_no_crs=True, **kw)
  with rasterio.open(out) as src:
    assert src.crs is None and src.shape == (64, 96)
  (tmp_path / 'empty_dir').mkdir()
  with pytest.raises(mapping.PredictionError, match='holds no band files'):
    mapping.predict_scene(predictor, out, s2_path=str(tmp_path / 'empty_dir'), **kw)


def _sha(path):
  return hashlib.sha256(open(path, 'rb').read()).hexdigest()


def test_out_equal_to_an_input_is_refused_and_the_map_is_atomic(tmp_path):
  scene = s2_scene(64, 96, seed=6)
  s2 = _stack(tmp_path, scene)
  before = _sha(s2)
  predictor = toy_predictor(kernel=1)
  kw = dict(window=64, overlap=0, batch=2, progress=False)
  os.symlink(s2, tmp_path / 'link.tif')
  os.link(s2, tmp_path / 'hard.tif')
  for out in (s2, str(tmp_path / 'link.tif'), str(tmp_path / 'hard.tif'),
              str(tmp_path / '.' / 's2.tif')):
    with pytest.raises(mapping.PredictionError, match='would overwrite the input'):
      mapping.predict_scene(predictor, out, s2_path=s2, **kw)
  folder = tmp_path / 'bands'
  folder.mkdir()
  for i, band in enumerate(constants.S2_BANDS):
    write_tif(folder / f'{band}.tif', scene[i:i + 1])
  with pytest.raises(mapping.PredictionError, match='would overwrite the input'):
    mapping.predict_scene(predictor, str(folder / 'B8A.tif'), s2_path=str(folder), **kw)
  assert _sha(s2) == before

  # A run that fails half-way leaves the previous map as it was, and no temporary file.
  out = str(tmp_path / 'map.tif')
  mapping.predict_scene(predictor, out, s2_path=s2, **kw)
  old = _sha(out)

  def failing(inputs):
    raise RuntimeError('device lost')

  broken = mapping.Predictor(failing, predictor.class_names, predictor.s2_bands, False, 'x')
  with pytest.raises(RuntimeError, match='device lost'):
    mapping.predict_scene(broken, out, s2_path=s2, **kw)
  assert _sha(out) == old
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'cromss_jax.predict', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_refuses_out_equal_to_input_with_one_error_line(tmp_path):
  s2 = _stack(tmp_path, s2_scene(32, 32))
  before = _sha(s2)
  result = _cli('--model', str(tmp_path / 'any_model'), '--s2', s2, '--out', s2)
  assert result.returncode == 1, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith('error: --out ') and 'would overwrite the input' in lines[-1]
  assert 'Traceback' not in result.stderr
  assert _sha(s2) == before


def test_s1_only_model_maps_on_the_s1_grid_with_its_nodata(tmp_path):
  rng = np.random.default_rng(8)
  s1 = rng.normal(-15, 4, (2, 70, 90)).astype(np.float32)
  s1[:, :20] = np.nan                              # outside the swath
  s1_path = write_tif(tmp_path / 's1.tif', s1, crs=WGS84, transform=WGS84_T)
  net = TinyClassifier(1)
  variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2)))
  apply = jax.jit(lambda v, x: jax.nn.softmax(net.apply(v, (x / 255.0 - 0.5) * 4.0)))
  predictor = mapping.Predictor(lambda inputs: apply(variables, inputs['s1']),
                                tuple(f'class {i}' for i in range(5)), None, True, 'toy s1')
  out = str(tmp_path / 'map.tif')
  summary = mapping.predict_scene(predictor, out, s1_path=s1_path, window=64, overlap=16,
                                  batch=4, progress=False)
  with rasterio.open(out) as src:
    assert src.crs == WGS84 and src.transform == WGS84_T
    classes = src.read(1)
  assert np.all(classes[:20] == 255) and not np.any(classes[20:] == 255)
  assert summary['nodata_pixels'] == 20 * 90


def test_s2_dn_offset_of_baseline_04_products_is_removed(tmp_path):
  scene = s2_scene(64, 96, seed=9)
  predictor = toy_predictor(kernel=1)
  kw = dict(window=64, overlap=0, batch=2, progress=False)

  def classes(path, **extra):
    out = str(tmp_path / f'map_{len(os.listdir(tmp_path))}.tif')
    mapping.predict_scene(predictor, out, s2_path=path, **kw, **extra)
    with rasterio.open(out) as src:
      return src.read(1)

  reference = classes(_stack(tmp_path, scene))
  shifted = np.where(scene > 0, scene + 1000, 0).astype(np.uint16)   # nodata stays 0
  tagged = _stack(tmp_path, shifted, name='tagged.tif')
  with rasterio.open(tagged, 'r+') as dst:
    dst.update_tags(BOA_ADD_OFFSET='-1000')
  np.testing.assert_array_equal(classes(tagged), reference)          # auto: declared
  plain = _stack(tmp_path, shifted, name='untagged.tif')
  assert np.mean(classes(plain) == reference) < 0.95                 # auto: nothing declared
  np.testing.assert_array_equal(classes(plain, s2_offset=1000), reference)
  with pytest.raises(mapping.PredictionError, match='--s2_offset=x'):
    classes(plain, s2_offset='x')


def test_normalisation_recorded_with_the_model_is_used(tmp_path):
  import dataclasses
  scene = s2_scene(64, 96, seed=10)
  s2 = _stack(tmp_path, scene)
  predictor = toy_predictor(kernel=1)
  kw = dict(s2_path=s2, window=64, overlap=0, batch=2, progress=False)

  def classes(model):
    out = str(tmp_path / f'map_{len(os.listdir(tmp_path))}.tif')
    mapping.predict_scene(model, out, **kw)
    with rasterio.open(out) as src:
      return src.read(1)

  same = dataclasses.replace(predictor, normalisation={'s2': (constants.S2_MEAN, constants.S2_STD)})
  np.testing.assert_array_equal(classes(same), classes(predictor))
  brighter = dataclasses.replace(predictor, normalisation={
      's2': (tuple(m + 1500 for m in constants.S2_MEAN), constants.S2_STD)})
  assert np.mean(classes(brighter) == classes(predictor)) < 0.8
