"""Importing published PyTorch weights: safe reading, key mapping, logit parity, the export.

The reference networks are `torch_reference` (an independent PyTorch implementation of the
torchvision ResNet, the smp U-Net and the CromSS mid/late fusion wrappers). Their random weights
and non-trivial BatchNorm running statistics are saved as the CromSS Lightning module writes
them (`net.` keys, hyper-parameters in an argparse.Namespace, optimiser state); the import must
reproduce their logits in float32 within 1e-4 relative (max |difference| / max |logit|; run
with -s to see the figures). torch is needed by these tests only (requirements-test.txt).
"""
import json
import os
import re
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch   # requirements-test.txt; the project itself never needs it

import torch_reference as ref
from configs import transfer as transfer_config
from cromss_jax import cli
from cromss_jax import constants
from cromss_jax import checkpointing
from cromss_jax import exports
from cromss_jax import models
from cromss_jax import torch_weights
from cromss_jax.tasks import transfer
from test_transfer import dfc_dir  # pylint: disable=unused-import

REPO = Path(__file__).resolve().parents[1]
RELATIVE_TOLERANCE = 1e-4
SIZE = 64
CLI_TIMEOUT_S = 600


def _nhwc(x: 'torch.Tensor') -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _relative(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
  diff = float(np.max(np.abs(got - want)))
  return diff, diff / float(np.max(np.abs(want)))


def _save_lightning(net, path) -> str:
  torch.save(ref.lightning_checkpoint(net), str(path))
  return str(path)


def _run(args: list[str], cwd=REPO, timeout=CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# Reading torch files without torch
# ----------------------------------------------------------------------------------------------
def _odd_tensors() -> OrderedDict:
  g = torch.Generator().manual_seed(0)
  shared = torch.randn(30, generator=g)
  return OrderedDict([
      ('f32', torch.randn(3, 4, generator=g)),
      ('f64', torch.randn(2, 2, generator=g, dtype=torch.float64)),
      ('f16', torch.randn(5, generator=g).half()),
      ('bf16', torch.randn(2, 3, generator=g).bfloat16()),
      ('i64_scalar', torch.tensor(1234)),
      ('i32', torch.arange(6, dtype=torch.int32).reshape(2, 3)),
      ('u8', torch.arange(7, dtype=torch.uint8)),
      ('bool', torch.tensor([True, False, True])),
      ('transposed', torch.randn(3, 5, generator=g).t()),                # non-contiguous
      ('view_a', shared[4:10].view(2, 3)),                               # offset into a storage
      ('view_b', shared[10:22:2]),                                       # strided view, same
      ('empty', torch.zeros(0, 3)),
      ('param', torch.nn.Parameter(torch.randn(2, generator=g))),
  ])


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_reader_gives_the_tensors_torch_load_gives(tmp_path, legacy):
  tensors = _odd_tensors()
  path = str(tmp_path / 'odd.pth')
  torch.save({'state_dict': tensors, 'epoch': 7, 'name': 'x', 'raw': b'\x00\xff',
              'tags': {1, 2}}, path, _use_new_zipfile_serialization=not legacy)
  assert zipfile.is_zipfile(path) is not legacy
  checkpoint = torch_weights.read_checkpoint(path)
  state, where = torch_weights.state_dict_of(checkpoint)
  assert where == "['state_dict']"
  assert checkpoint.obj['epoch'] == 7 and checkpoint.obj['raw'] == b'\x00\xff'
  assert checkpoint.obj['tags'] == {1, 2} and checkpoint.skipped == {}
  expected = torch.load(path, weights_only=False)['state_dict']
  assert list(state) == list(expected)
  for key, want in expected.items():
    want = want.detach()
    got = state[key]
    assert got.shape == tuple(want.shape), key
    if want.dtype == torch.bfloat16:
      np.testing.assert_array_equal(got.astype(np.float32), want.float().numpy(), err_msg=key)
    else:
      assert got.dtype == want.numpy().dtype, key
      np.testing.assert_array_equal(got, want.numpy(), err_msg=key)


class _RunsCode:
  """What a malicious checkpoint holds: unpickling it calls os.system."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_reader_never_runs_code_from_the_file(tmp_path):
  marker = tmp_path / 'code_ran'
  net = ref.randomise(ref.ResNetEncoder(18, 3), seed=1)
  path = str(tmp_path / 'evil.pth')
  torch.save({'state_dict': net.state_dict(), 'payload': _RunsCode(marker)}, path)
  checkpoint = torch_weights.read_checkpoint(path)
  assert not marker.exists()
  assert any(name.endswith('.system') for name in checkpoint.skipped), checkpoint.skipped
  assert isinstance(checkpoint.obj['payload'], torch_weights.Skipped)
  state, _ = torch_weights.state_dict_of(checkpoint)    # the weights are still usable
  assert 'layer4.1.bn2.running_var' in state
  # The file really is malicious: an unrestricted torch.load runs the payload.
  torch.load(path, weights_only=False)
  assert marker.exists()


def _rewrite_zip(src: str, dst: str, edit) -> str:
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
    for item in zin.infolist():
      data = edit(item.filename, zin.read(item.filename))
      if data is not None:
        zout.writestr(item, data)
  return dst


def test_damaged_or_foreign_files_are_refused_with_a_message(tmp_path):
  good = str(tmp_path / 'good.pth')
  torch.save({'w': torch.arange(6, dtype=torch.float32).reshape(2, 3)}, good)
  torch_weights.state_dict_of(torch_weights.read_checkpoint(good))   # reads fine

  # A view larger than its storage (the size (2, 3) edited to (2, 9) in the pickle).
  def bigger(name, data):
    if name.endswith('data.pkl'):
      assert data.count(b'K\x02K\x03\x86') == 1
      return data.replace(b'K\x02K\x03\x86', b'K\x02K\x09\x86')
    return data
  with pytest.raises(torch_weights.CheckpointError, match='outside its storage'):
    checkpoint = torch_weights.read_checkpoint(_rewrite_zip(good, str(tmp_path / 'oob.pth'),
                                                            bigger))
    torch_weights.state_dict_of(checkpoint)
  # A truncated storage.
  short = _rewrite_zip(good, str(tmp_path / 'short.pth'),
                       lambda n, d: d[:8] if '/data/' in n else d)
  with pytest.raises(torch_weights.CheckpointError, match='truncated'):
    torch_weights.read_checkpoint(short)
  # A truncated legacy (pre-zip) file.
  legacy = tmp_path / 'legacy.pth'
  torch.save({'w': torch.zeros(100)}, str(legacy), _use_new_zipfile_serialization=False)
  (tmp_path / 'legacy_cut.pth').write_bytes(legacy.read_bytes()[:-40])
  with pytest.raises(torch_weights.CheckpointError, match='truncated'):
    torch_weights.read_checkpoint(str(tmp_path / 'legacy_cut.pth'))
  # Not a checkpoint at all.
  junk = tmp_path / 'junk.ckpt'
  junk.write_bytes(b'not a torch checkpoint, just text\n' * 8)
  with pytest.raises(torch_weights.CheckpointError, match='junk.ckpt'):
    torch_weights.read_checkpoint(str(junk))
  # A whole pickled module instead of a state dict.
  whole = str(tmp_path / 'module.pth')
  torch.save(ref.ResNetEncoder(18, 3), whole)
  with pytest.raises(torch_weights.CheckpointError, match='save model.state_dict'):
    torch_weights.state_dict_of(torch_weights.read_checkpoint(whole))


# ----------------------------------------------------------------------------------------------
# Parity: same weights, same logits
# ----------------------------------------------------------------------------------------------
PARITY_CASES = [
    pytest.param(18, 'mid', 13, 'orbax', id='resnet18-mid'),
    pytest.param(18, 'late', 9, 'safetensors', id='resnet18-late'),
    pytest.param(50, 'mid', 13, 'safetensors', id='resnet50-mid', marks=pytest.mark.slow),
    pytest.param(50, 'late', 9, 'orbax', id='resnet50-late', marks=pytest.mark.slow),
]


@pytest.mark.slow
@pytest.mark.parametrize('depth,fusion,bands,fmt', PARITY_CASES)
def test_imported_cromss_checkpoint_gives_the_pytorch_logits(tmp_path, depth, fusion, bands, fmt):
  cls = ref.MidFusion if fusion == 'mid' else ref.LateFusion
  net = ref.randomise(cls(depth, bands, 9), seed=depth)
  ckpt = _save_lightning(net, tmp_path / 'cromss.ckpt')
  paths = torch_weights.import_checkpoint(ckpt, str(tmp_path / 'E'), fmt=fmt)
  assert sorted(paths) == ['encoder_s1', 'encoder_s2', 'pretrain_model']

  variables, meta = exports.load_exported(paths['pretrain_model'])
  assert meta['kind'] == 'pretrain_model' and meta['fusion'] == fusion
  assert meta['encoder'] == f'resnet{depth}' and meta['num_classes'] == 9
  assert meta['storage'] == fmt and meta['source_file'] == ckpt
  assert meta['source_step'] == 12345 and meta['epoch'] == 199
  assert len(meta['source_sha256']) == 64 and meta['source_sha256'] == torch_weights.sha256_of(
      ckpt)
  assert meta['s2']['bands'] == exports.band_metadata('s2', bands)['bands']
  config = checkpointing.config_from_meta({'config': json.dumps(meta['config'])})
  model = models.build_pretrain_model(config.model, meta['num_classes'], config.data.s2_bands)

  g = torch.Generator().manual_seed(5)
  x1 = torch.randn(2, 2, SIZE, SIZE, generator=g)
  x2 = torch.rand(2, bands, SIZE, SIZE, generator=g)
  with torch.no_grad():
    want1, want2 = net(x1, x2)
  got1, got2 = jax.jit(lambda v, a, b: model.apply(v, a, b, train=False))(
      variables, jnp.asarray(_nhwc(x1)), jnp.asarray(_nhwc(x2)))
  for branch, got, want in (('s1', got1, want1), ('s2', got2, want2)):
    diff, rel = _relative(np.asarray(got), _nhwc(want))
    print(f'\nparity resnet{depth} {fusion} {branch}: max |logit diff| {diff:.3g}, '
          f'relative {rel:.3g} (max |logit| {np.abs(_nhwc(want)).max():.3g})')
    assert rel <= RELATIVE_TOLERANCE, (branch, diff, rel)

  # The encoders alone are the branches' encoders.
  for modality in ('s1', 's2'):
    encoder, info = exports.load_exported(paths[f'encoder_{modality}'])
    assert info['kind'] == 'encoder' and info['modality'] == modality
    jax.tree.map(np.testing.assert_array_equal, encoder,
                 models.extract_encoder(variables, modality))


# ----------------------------------------------------------------------------------------------
# torchvision / timm ResNet state dicts: one encoder
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('prefix,channels', [('module.', 2), ('backbone.', 12), ('', 3)])
def test_resnet_state_dict_becomes_one_encoder_that_transfer_accepts(tmp_path, prefix, channels):
  net = ref.randomise(ref.ResNetEncoder(18, channels, with_fc=True), seed=channels)
  path = str(tmp_path / 'backbone.pth')
  torch.save({'state_dict': OrderedDict((prefix + k, v) for k, v in net.state_dict().items())},
             path)
  checkpoint = torch_weights.read_checkpoint(path)
  converted = torch_weights.convert(torch_weights.state_dict_of(checkpoint)[0])
  modality = 's1' if channels == 2 else 's2'
  assert (converted.kind, converted.modality, converted.depth) == ('encoder', modality, 18)
  assert converted.prefix == prefix
  assert any('fc.weight' in note and 'ignored' in note for note in converted.notes)

  out = tmp_path / 'E'
  paths = torch_weights.import_checkpoint(path, str(out))
  assert list(paths) == [f'encoder_{modality}'] and sorted(os.listdir(out)) == [
      f'encoder_{modality}', f'encoder_{modality}.json']
  variables, meta = exports.load_exported(paths[f'encoder_{modality}'])
  assert meta['source_prefix'] == prefix and meta['encoder'] == 'resnet18'

  x = torch.randn(2, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    want = net(x)[1:]
  got = jax.jit(lambda v, a: models.ResNetEncoder(depth=18).apply(v, a, train=False))(
      variables, jnp.asarray(_nhwc(x)))
  for level, (g, w) in enumerate(zip(got, want)):
    _, rel = _relative(np.asarray(g), _nhwc(w))
    assert rel <= RELATIVE_TOLERANCE, (level, rel)

  config = transfer_config.get_config()
  config.model.encoder = 'resnet18'
  config.transfer.modality = modality
  config.transfer.encoder_path = paths[f'encoder_{modality}']
  if modality == 's2':
    config.data.s2_bands = channels
  loaded = transfer.load_pretrained_encoder(config)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def _resnet_state(depth=18, channels=13, seed=0) -> OrderedDict:
  return OrderedDict(ref.randomise(ref.ResNetEncoder(depth, channels), seed).state_dict())


def test_mismatches_are_errors_that_list_every_key():
  state = _resnet_state()
  del state['layer2.1.bn1.running_var']
  state['layer5.0.conv1.weight'] = torch.zeros(1)
  state['layer3.0.bn2.weight'] = torch.zeros(7)
  arrays = {k: v.numpy() for k, v in state.items()}
  with pytest.raises(torch_weights.CheckpointError) as err:
    torch_weights.convert(arrays, source='x.pth')
  message = str(err.value)
  assert 'missing keys: layer2.1.bn1.running_var' in message
  assert 'unmapped keys: layer5.0.conv1.weight' in message
  assert 'layer3.0.bn2.weight (7,) (expected (256,))' in message
  assert isinstance(err.value, cli.UserError)

  # Unsupported depth and band counts are named.
  deep = {k: v.numpy() for k, v in _resnet_state().items()}
  deep['layer3.2.conv1.weight'] = deep['layer3.1.conv1.weight']
  with pytest.raises(torch_weights.CheckpointError, match=r'basic blocks \(2, 2, 3, 2\)'):
    torch_weights.convert(deep)
  odd = {k: v.numpy() for k, v in _resnet_state(channels=5).items()}
  with pytest.raises(torch_weights.CheckpointError, match='takes 5 input bands'):
    torch_weights.convert(odd)


def test_cromss_own_torch_save_with_a_module_prefix_is_recognised():
  net = ref.randomise(ref.MidFusion(18, 3, 5, decoder_channels=(64, 32, 16, 16, 8)), seed=9)
  state = {f'module.{k}': v.numpy() for k, v in net.state_dict().items()}
  converted = torch_weights.convert(state)
  assert (converted.kind, converted.fusion, converted.prefix) == ('pretrain_model', 'mid',
                                                                  'module.')
  assert (converted.s2_bands, converted.num_classes) == (3, 5)
  assert converted.decoder_channels == (64, 32, 16, 16, 8)
  np.testing.assert_array_equal(converted.variables['params']['decoder']['head']['bias'],
                                state['module.segmentation_head.0.bias'])


def test_two_resnets_need_a_prefix_and_the_prefix_selects_one():
  query = _resnet_state(seed=1)
  state = {f'module.encoder_q.{k}': v.numpy() for k, v in query.items()}
  state.update({f'module.encoder_k.{k}': v.numpy() for k, v in _resnet_state(seed=2).items()})
  state['module.queue'] = np.zeros((128, 4), np.float32)
  with pytest.raises(torch_weights.CheckpointError, match='choose one with --prefix'):
    torch_weights.convert(state)
  converted = torch_weights.convert(state, prefix='module.encoder_q.')
  assert any('outside the prefix' in note for note in converted.notes)
  np.testing.assert_array_equal(converted.variables['params']['conv1']['kernel'],
                                query['conv1.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      converted.variables['batch_stats']['layer4']['block1']['bn2']['var'],
      query['layer4.1.bn2.running_var'].numpy())


# ----------------------------------------------------------------------------------------------
# The command line, the export folder, and README's three commands
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_errors_are_one_line_and_overwrite_is_explicit(tmp_path):
  net = ref.randomise(ref.ResNetEncoder(18, 13), seed=4)
  path = str(tmp_path / 'b.pth')
  state = net.state_dict()
  state['extra.weight'] = torch.zeros(3)
  torch.save(state, path)
  cmd = [sys.executable, '-m', 'cromss_jax.import_weights', f'--checkpoint={path}',
         f'--out={tmp_path / "E"}']
  bad = _run(cmd)
  assert bad.returncode == 1, bad.stderr[-2000:]
  assert 'error: ' in bad.stderr and 'unmapped keys: extra.weight' in bad.stderr
  assert 'Traceback' not in bad.stderr and not (tmp_path / 'E').exists()

  del state['extra.weight']
  torch.save(state, path)
  torch_weights.import_checkpoint(path, str(tmp_path / 'E'))
  (tmp_path / 'E' / 'stale_file').write_text('from before')
  with pytest.raises(FileExistsError, match='exists; pass --overwrite'):
    torch_weights.import_checkpoint(path, str(tmp_path / 'E'))
  assert (tmp_path / 'E' / 'stale_file').exists()
  replaced = _run(cmd + ['--overwrite', '--format=safetensors'])
  assert replaced.returncode == 0, replaced.stderr[-2000:]
  assert 'encoder_s2: ' in replaced.stdout
  assert sorted(os.listdir(tmp_path / 'E')) == ['encoder_s2', 'encoder_s2.json']
  assert os.listdir(tmp_path / 'E' / 'encoder_s2') == [exports.SAFETENSORS_FILE]
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


@pytest.mark.slow
def test_a_failing_write_leaves_the_previous_export_whole(tmp_path, monkeypatch):
  net = ref.randomise(ref.MidFusion(18, 13, 9), seed=6)
  ckpt = _save_lightning(net, tmp_path / 'c.ckpt')
  out = str(tmp_path / 'E')
  torch_weights.import_checkpoint(ckpt, out, fmt='safetensors')
  before = {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)}
  calls = []
  real = exports._save_tree  # pylint: disable=protected-access

  def dies_on_the_second(path, tree, fmt):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt('killed while writing')
    real(path, tree, fmt)

  monkeypatch.setattr(exports, '_save_tree', dies_on_the_second)
  with pytest.raises(KeyboardInterrupt):
    torch_weights.import_checkpoint(ckpt, out, overwrite=True, fmt='orbax')
  assert {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)} == before
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]
  variables, meta = exports.load_exported(os.path.join(out, 'pretrain_model'))
  assert meta['storage'] == 'safetensors' and 'decoder' in variables['params']


def _readme_commands() -> list[str]:
  text = (REPO / 'README.md').read_text()
  section = text.split('## Using the published CromSS weights', 1)[1].split('\n## ', 1)[0]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  return [line for line in block.replace('\\\n', ' ').splitlines()
          if line.strip() and not line.startswith('#')]


def _write_s2_scene(path: Path, size: int = SIZE) -> None:
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.transform import Affine  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  data = rng.uniform(200, 4000, (13, size, size)).astype(np.uint16)
  with rasterio.open(path, 'w', driver='GTiff', height=size, width=size, count=13,
                     dtype='uint16', crs='EPSG:32632',
                     transform=Affine(10, 0, 500000, 0, -10, 5000000)) as dst:
    dst.write(data)


# Test scale for the README's transfer command (which trains a ResNet-50 for 50 epochs): the
# synthetic checkpoint is a ResNet-18 and the DFC2020 fixture holds four 64 px tiles.
_TRANSFER_TEST_SCALE = [
    '--config.model.encoder=resnet18', '--config.model.compute_dtype=float32',
    '--config.data.tile_size=64', '--config.data.crop_size=64', '--config.data.shuffle_buffer=8',
    '--config.training.num_epochs=1', '--config.training.steps_per_epoch=2',
    '--config.training.global_batch_size=2', '--config.training.log_every_steps=1',
    '--config.training.checkpoint_every_epochs=1',
]


@pytest.mark.slow
def test_readme_commands_import_predict_and_transfer(tmp_path, dfc_dir):  # noqa: F811
  commands = _readme_commands()
  assert [c.split()[2] for c in commands] == ['cromss_jax.import_weights', 'cromss_jax.predict',
                                             'cromss_jax.main']
  # The working folder the commands expect: a checkpoint in the published format, a scene,
  # the configs and a converted DFC2020 folder.
  ckpt = re.search(r'--checkpoint (\S+)', commands[0]).group(1)
  (tmp_path / ckpt).parent.mkdir(parents=True)
  _save_lightning(ref.randomise(ref.MidFusion(18, 13, 9), seed=8), tmp_path / ckpt)
  scene = re.search(r'--s2 (\S+)', commands[1]).group(1)
  _write_s2_scene(tmp_path / scene)
  (tmp_path / 'configs').symlink_to(REPO / 'configs')
  dataset = re.search(r'--config.data.dataset_dir=(\S+)', commands[2]).group(1)
  (tmp_path / dataset).parent.mkdir(parents=True)
  (tmp_path / dataset).symlink_to(dfc_dir)

  for i, command in enumerate(commands):
    args = command.split()
    assert args[0] == 'python'
    args[0] = sys.executable
    if i == 2:
      args += _TRANSFER_TEST_SCALE
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])

  export = re.search(r'--out (\S+)', commands[0]).group(1)
  assert sorted(os.listdir(tmp_path / export)) == [
      'encoder_s1', 'encoder_s1.json', 'encoder_s2', 'encoder_s2.json', 'pretrain_model',
      'pretrain_model.json']
  import rasterio  # pylint: disable=g-import-not-at-top
  with rasterio.open(tmp_path / re.search(r'--out (\S+)', commands[1]).group(1)) as src:
    classes = src.read(1)
  assert classes.shape == (SIZE, SIZE) and classes.max() < len(constants.DW_CLASSES)
  workdir = tmp_path / re.search(r'--workdir=(\S+)', commands[2]).group(1)
  with open(workdir / 'metrics.json') as f:
    report = json.load(f)
  assert report['step'] == 2 and list(report['per_class']) == list(constants.DFC_DW8_CLASSES)
