"""Published PyTorch weights in this project's Flax variables, read without torch and safely.

Two parts:

* `read_checkpoint(path)`: the object stored in a `torch.save` file (`.ckpt`, `.pth`, `.pt`),
  with every tensor as a numpy array. A torch file is a zip (`<name>/data.pkl`, the pickled
  object, and `<name>/data/<key>`, the raw bytes of each storage) or, before torch 1.6, one
  stream of pickles followed by the storages; both are read here. The pickle is read by an
  unpickler that admits only a few harmless globals (ordered dicts, sets, bytes, torch's tensor
  and storage rebuild functions, reimplemented here on numpy); any other class is replaced by a
  `Skipped` placeholder that keeps its plain data and runs nothing, so a checkpoint never
  executes code. A tensor view must lie inside its storage, or the file is refused.
* `convert(state_dict)`: maps the state-dict keys of a CromSS Lightning checkpoint (mid fusion:
  `net.encoder1.*` = S1 encoder, `net.encoder.*` = S2 encoder, `net.decoder.*`,
  `net.segmentation_head.*`; late fusion: `net.model1.*` = S1 U-Net, `net.model2.*` = S2 U-Net,
  each smp `Unet` with `encoder`, `decoder`, `segmentation_head`) or of a torchvision/timm ResNet
  (`conv1`, `bn1`, `layerL.B.*`, `downsample.0/1`, optionally under a prefix such as `module.`,
  `encoder.` or `backbone.`; `fc.*` ignored) onto the variables of `models.MidFusionUNet`,
  `LateFusionUNet` or `ResNetEncoder`. Depth, bands, classes and decoder widths are read from
  the shapes; every key must be used and every variable filled, or the error lists them.

`import_checkpoint(path, out)` puts both together and writes an export (`cromss_jax.exports`)
that predict, transfer and evaluation use unchanged.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import zipfile
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import traverse_util

from cromss_jax import cli
from cromss_jax import constants
from cromss_jax import exports
from cromss_jax import models
from cromss_jax.models import resnet as resnet_lib


class CheckpointError(cli.UserError):
  """A checkpoint that cannot be read or does not fit a supported network."""


# ----------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_MAX_REPORTED = 12


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str
  dtype: Any


@dataclasses.dataclass
class _StorageRef:
  """A storage named by the pickle; its bytes are looked up when the tensors are built."""
  key: str
  dtype: Any
  numel: int
  offset: int = 0   # elements (legacy views into a larger storage)


@dataclasses.dataclass
class _LazyTensor:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


class Skipped:
  """Stands for an object of a class the reader does not admit; keeps its plain data only."""
  type_name = '?'

  def __new__(cls, *args: Any, **kwargs: Any) -> 'Skipped':
    del kwargs
    obj = object.__new__(cls)
    obj.args = args
    obj.state = None
    return obj

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    pass

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __setitem__(self, key: Any, value: Any) -> None:
    pass

  def append(self, value: Any) -> None:
    pass

  def extend(self, values: Any) -> None:
    pass

  def __repr__(self) -> str:
    return f'<skipped {self.type_name}>'


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise CheckpointError(f'a tensor has an invalid {what} {value!r}')
  return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    *unused: Any) -> _LazyTensor:
  if not isinstance(storage, _StorageRef):
    raise CheckpointError(f'a tensor refers to {storage!r}, not to a storage of the file')
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise CheckpointError(f'a tensor has an invalid storage offset {storage_offset!r}')
  return _LazyTensor(storage, storage_offset, _int_tuple(size, 'size'),
                     _int_tuple(stride, 'stride'))


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
  return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
  del new_type, state
  return func(*args)


def _encode(text: Any, encoding: str = 'utf-8') -> bytes:
  """`_codecs.encode` as protocol-2 pickles use it for bytes (text and codec only)."""
  if not isinstance(text, str) or encoding.lower() not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
    raise CheckpointError(f'unsupported bytes encoding in the pickle: {encoding!r}')
  return text.encode(encoding)


_ADMITTED: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type,
    ('torch', 'Size'): tuple,
    ('_codecs', 'encode'): _encode,
}
for _module in ('builtins', '__builtin__'):
  for _name, _value in (('set', set), ('frozenset', frozenset), ('slice', slice),
                        ('complex', complex)):
    _ADMITTED[(_module, _name)] = _value
_ADMITTED.update({('torch', name): _StorageType(name, dtype)
                  for name, dtype in _STORAGE_DTYPES.items()})


class _Unpickler(pickle.Unpickler):
  """Admits `_ADMITTED`; any other global becomes a `Skipped` subclass named after it."""

  def __init__(self, file: Any, storages: dict[str, _StorageRef], skipped: collections.Counter,
               legacy: bool):
    super().__init__(file)
    self._storages = storages
    self._skipped = skipped
    self._legacy = legacy
    self._classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ADMITTED:
      return _ADMITTED[(module, name)]
    qualname = f'{module}.{name}'
    self._skipped[qualname] += 1
    if qualname not in self._classes:
      self._classes[qualname] = type(f'Skipped[{qualname}]', (Skipped,), {'type_name': qualname})
    return self._classes[qualname]

  def persistent_load(self, pid: Any) -> _StorageRef:
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
      raise CheckpointError(f'unsupported persistent object {str(pid)[:80]!r} in the pickle')
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointError(f'unsupported storage type {storage_type!r} in the pickle')
    if not isinstance(numel, int) or numel < 0:
      raise CheckpointError(f'storage {key} has an invalid size {numel!r}')
    ref = self._storages.setdefault(key, _StorageRef(key, storage_type.dtype, numel))
    view = pid[5] if self._legacy and len(pid) > 5 else None
    if view is not None:  # legacy (view_key, offset, size): a view into storage `key`
      _, offset, size = view
      return _StorageRef(key, storage_type.dtype, int(size), int(offset))
    return ref


@dataclasses.dataclass
class Checkpoint:
  """What `read_checkpoint` found: the object and the names of the classes it skipped."""
  obj: Any
  skipped: dict[str, int]
  storages: dict[str, np.ndarray]
  path: str

  def tensor(self, lazy: _LazyTensor, name: str) -> np.ndarray:
    """The numpy array of one tensor (a copy), checked to lie inside its storage."""
    ref = lazy.storage
    base = self.storages.get(ref.key)
    if base is None:
      raise CheckpointError(f'{self.path}: tensor {name} refers to storage {ref.key}, which is '
                            'not in the file')
    if base.dtype != np.dtype(ref.dtype):
      base = base.view(ref.dtype) if base.dtype.itemsize == np.dtype(ref.dtype).itemsize else None
      if base is None:
        raise CheckpointError(f'{self.path}: tensor {name} reads storage {ref.key} with another '
                              'element type')
    start = ref.offset + lazy.offset
    if len(lazy.size) != len(lazy.stride):
      raise CheckpointError(f'{self.path}: tensor {name} has size {lazy.size} but stride '
                            f'{lazy.stride}')
    if any(s == 0 for s in lazy.size):
      return np.zeros(lazy.size, base.dtype)
    last = start + sum((n - 1) * s for n, s in zip(lazy.size, lazy.stride))
    if start > last or last >= min(base.size, ref.offset + ref.numel):
      raise CheckpointError(f'{self.path}: tensor {name} (size {lazy.size}, stride '
                            f'{lazy.stride}, offset {start}) lies outside its storage of '
                            f'{base.size} elements; the file is damaged or not a checkpoint')
    view = np.lib.stride_tricks.as_strided(
        base[start:], shape=lazy.size,
        strides=tuple(s * base.dtype.itemsize for s in lazy.stride), writeable=False)
    return np.array(view)


def _byte_order(value: bytes | None) -> str:
  if value is None or value.strip() in (b'', b'little'):
    return '<'
  if value.strip() == b'big':
    return '>'
  raise CheckpointError(f'unknown byte order {value!r}')


def _read_zip(path: str) -> Checkpoint:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise CheckpointError(f'{path}: a zip file but not a torch checkpoint (no single '
                            '<name>/data.pkl)')
    root = pickles[0][:-len('data.pkl')]
    order = _byte_order(archive.read(root + 'byteorder') if root + 'byteorder' in names
                        else None)
    refs: dict[str, _StorageRef] = {}
    skipped: collections.Counter = collections.Counter()
    obj = _load_pickle(archive.read(pickles[0]), refs, skipped, path, legacy=False)
    storages = {}
    for key, ref in refs.items():
      member = f'{root}data/{key}'
      if member not in names:
        raise CheckpointError(f'{path}: storage {key} is missing from the archive')
      dtype = np.dtype(ref.dtype)
      with archive.open(member) as data:   # never more than the pickle asks for (zip bombs)
        raw = data.read(ref.numel * dtype.itemsize)
      count = len(raw) // dtype.itemsize
      if count < ref.numel:
        raise CheckpointError(f'{path}: storage {key} holds {count} elements, the pickle says '
                              f'{ref.numel}; the file is truncated')
      storages[key] = _from_bytes(raw, dtype, count, order)
  return Checkpoint(obj, dict(skipped), storages, path)


def _load_pickle(data: bytes, refs: dict[str, _StorageRef], skipped: collections.Counter,
                 path: str, legacy: bool) -> Any:
  try:
    return _Unpickler(io.BytesIO(data), refs, skipped, legacy).load()
  except CheckpointError:
    raise
  except Exception as err:  # a malformed pickle or an object the placeholders cannot take
    raise CheckpointError(f'{path}: cannot read the pickled object ({type(err).__name__}: '
                          f'{err}); the file is damaged or holds objects this reader refuses'
                          ) from None


def _from_bytes(raw: bytes, dtype: Any, count: int, order: str) -> np.ndarray:
  array = np.frombuffer(raw, dtype, count)
  return array.byteswap() if order == '>' and array.dtype.itemsize > 1 else array


def _read_legacy(path: str) -> Checkpoint:
  refs: dict[str, _StorageRef] = {}
  skipped: collections.Counter = collections.Counter()
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    def load() -> Any:
      try:
        return _Unpickler(f, refs, skipped, legacy=True).load()
      except CheckpointError:
        raise
      except Exception as err:
        raise CheckpointError(f'{path}: cannot read the pickled object ({type(err).__name__}: '
                              f'{err}); the file is damaged or not a torch checkpoint'
                              ) from None

    if load() != _LEGACY_MAGIC:
      raise CheckpointError(f'{path}: not a torch checkpoint (neither a zip archive nor the '
                            'legacy format)')
    load()  # protocol version
    sys_info = load()
    order = '<' if not isinstance(sys_info, dict) or sys_info.get('little_endian', True) else '>'
    obj = load()
    keys = load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
      raise CheckpointError(f'{path}: the list of storages is damaged')
    storages = {}
    for key in keys:
      if key not in refs:
        raise CheckpointError(f'{path}: storage {key} is not used by the pickle')
      dtype = np.dtype(refs[key].dtype)
      header = f.read(8)
      if len(header) != 8:
        raise CheckpointError(f'{path}: truncated at storage {key}')
      (count,) = struct.unpack(order + 'q', header)
      if count < 0 or count * dtype.itemsize > size - f.tell():
        raise CheckpointError(f'{path}: truncated at storage {key}')
      raw = f.read(count * dtype.itemsize)
      if len(raw) != count * dtype.itemsize:
        raise CheckpointError(f'{path}: truncated at storage {key}')
      storages[key] = _from_bytes(raw, dtype, count, order)
  return Checkpoint(obj, dict(skipped), storages, path)


def read_checkpoint(path: str) -> Checkpoint:
  """The object of a `torch.save` file, never executing code from it (see the module doc)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(2, 'No such checkpoint file', path)
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  if tarfile.is_tarfile(path):
    raise CheckpointError(f'{path}: a tar checkpoint of torch < 0.4 is not supported; load and '
                          're-save it with a recent torch (torch.save(torch.load(f), f2))')
  return _read_legacy(path)


# ----------------------------------------------------------------------------------------------
# Finding the state dict
# ----------------------------------------------------------------------------------------------
_WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model')


def _is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj)
          and any(isinstance(v, _LazyTensor) for v in obj.values()))


def state_dict_of(checkpoint: Checkpoint) -> tuple[dict[str, np.ndarray], str]:
  """({key: array}, where it was found) of the checkpoint's weights."""
  obj, where = checkpoint.obj, ''
  while not _is_state_dict(obj):
    inner = next((k for k in _WRAPPER_KEYS if isinstance(obj, dict) and k in obj), None)
    if inner is None:
      what = (obj.type_name if isinstance(obj, Skipped) else type(obj).__name__)
      hint = (' It holds a pickled object, not a state dict: save model.state_dict() instead.'
              if isinstance(obj, Skipped) else '')
      keys = sorted(map(str, obj))[:_MAX_REPORTED] if isinstance(obj, dict) else []
      raise CheckpointError(f'{checkpoint.path}: no state dict found ({what}'
                            f'{" with keys " + str(keys) if keys else ""}{where and " in " + where}).'
                            f'{hint}')
    obj, where = obj[inner], f'{where}[{inner!r}]'
  bad = sorted(k for k, v in obj.items() if not isinstance(v, _LazyTensor))
  if bad:
    raise CheckpointError(f'{checkpoint.path}: the state dict{where and " " + where} has '
                          f'entries that are not tensors: {_listing(bad)}')
  return {k: checkpoint.tensor(v, k) for k, v in obj.items()}, where or 'the top level'


# ----------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------
_LEAVES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
           ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
           ('batch_stats', 'var'): 'running_var'}
_IGNORED_SUFFIX = '.num_batches_tracked'


def _listing(names: Iterable[Any], limit: int = _MAX_REPORTED) -> str:
  names = list(names)
  shown = ', '.join(map(str, names[:limit]))
  return shown + (f' ... ({len(names)} in all)' if len(names) > limit else '')


def _encoder_module(name: str) -> str:
  if name.startswith('block'):
    return name[len('block'):]
  return {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(name, name)


def _encoder_key(path: tuple[str, ...]) -> str:
  return '.'.join(_encoder_module(p) for p in path)


def _decoder_key(path: tuple[str, ...], decoder: str, head: str) -> str:
  """('block0', 'bn1') -> decoder.blocks.0.conv1.1 (smp Conv2dReLU = conv, bn, relu)."""
  if path == ('head',):
    return f'{head}.0'
  block, layer = path
  index = int(block[len('block'):])
  conv = 'conv' + layer[-1]
  return f'{decoder}.blocks.{index}.{conv}.{0 if layer.startswith("conv") else 1}'


def _torch_names(template: Mapping[str, Any], prefixes: Mapping[str, Any]
                 ) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """{torch key: (collection, flax path, flax shape)} for a template variables tree.

  `prefixes` maps a top-level Flax module to ('encoder', torch prefix) or
  ('decoder', torch decoder prefix, torch head prefix); the key '' stands for a template
  whose top level is the encoder itself.
  """
  out = {}
  for collection, tree in template.items():
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
      top, rest = (path[0], path[1:]) if '' not in prefixes else ('', path)
      spec = prefixes[top]
      module, name = rest[:-1], rest[-1]
      if spec[0] == 'encoder':
        key = spec[1] + _encoder_key(module)
      else:
        key = _decoder_key(module, spec[1], spec[2])
      out[f'{key}.{_LEAVES[(collection, name)]}'] = (collection, path, tuple(leaf.shape))
  return out


def _to_flax(array: np.ndarray, name: str) -> np.ndarray:
  array = np.asarray(array, np.float32)
  return array.transpose(2, 3, 1, 0) if name == 'kernel' else array   # OIHW -> HWIO


def _fill(state_dict: Mapping[str, np.ndarray], names: Mapping[str, Any], ignored: Iterable[str],
          source: str) -> dict[str, Any]:
  """The variables tree from the state dict; an error lists missing/unused keys and shapes."""
  ignored = set(ignored)
  missing = sorted(k for k in names if k not in state_dict)
  unused = sorted(k for k in state_dict if k not in names and k not in ignored
                  and not k.endswith(_IGNORED_SUFFIX))
  flat: dict[tuple[str, ...], np.ndarray] = {}
  mismatched = []
  for key, (collection, path, shape) in names.items():
    if key in missing:
      continue
    value = _to_flax(state_dict[key], path[-1]) if state_dict[key].ndim in (
        (4,) if path[-1] == 'kernel' else (1,)) else None
    if value is None or tuple(value.shape) != shape:
      want = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == 'kernel' else shape
      mismatched.append(f'{key} {tuple(state_dict[key].shape)} (expected {want})')
      continue
    flat[(collection,) + path] = value
  problems = []
  if missing:
    problems.append(f'missing keys: {_listing(missing)}')
  if unused:
    problems.append(f'unmapped keys: {_listing(unused)}')
  if mismatched:
    problems.append(f'shape mismatches: {_listing(mismatched)}')
  if problems:
    raise CheckpointError(f'{source} does not fit the network read from its shapes; '
                          + '; '.join(problems))
  return traverse_util.unflatten_dict(flat)


def _resnet_depth(state_dict: Mapping[str, np.ndarray], prefix: str, source: str) -> int:
  """18/34/50 from the block counts and kind under `prefix` (torchvision layout)."""
  counts = []
  for stage in range(1, 5):
    pattern = re.compile(re.escape(f'{prefix}layer{stage}.') + r'(\d+)\.')
    blocks = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    counts.append(max(blocks) + 1 if blocks else 0)
  kind = 'bottleneck' if f'{prefix}layer1.0.conv3.weight' in state_dict else 'basic'
  for depth, layout in resnet_lib.RESNET_LAYOUTS.items():
    if layout == (kind, tuple(counts)):
      return depth
  supported = ', '.join(f'ResNet-{d} {k} blocks {c}' for d, (k, c) in
                        sorted(resnet_lib.RESNET_LAYOUTS.items()))
  raise CheckpointError(f'{source}: the encoder under {prefix or "the top level"!r} has '
                        f'{kind} blocks {tuple(counts)} per stage; supported are {supported}')


def _in_channels(state_dict: Mapping[str, np.ndarray], key: str, source: str) -> int:
  weight = state_dict.get(key)
  if weight is None or weight.ndim != 4:
    raise CheckpointError(f'{source}: {key} is missing or not a 4-D conv weight')
  return int(weight.shape[1])


def _s2_bands(channels: int, source: str, key: str) -> int:
  if channels not in constants.S2_BAND_SUBSETS:
    raise CheckpointError(f'{source}: {key} takes {channels} input bands; an S2 encoder must '
                          f'take one of {sorted(constants.S2_BAND_SUBSETS)} (an S1 one 2)')
  return channels


@dataclasses.dataclass
class Converted:
  """Flax variables of a recognised network and what was read from the shapes."""
  kind: str                           # 'pretrain_model' | 'encoder'
  variables: dict[str, Any]
  depth: int
  fusion: str | None = None           # 'mid' | 'late' for a whole network
  modality: str | None = None         # 's1' | 's2' for a lone encoder
  s2_bands: int | None = None
  num_classes: int | None = None
  decoder_channels: tuple[int, ...] | None = None
  prefix: str = ''
  notes: list[str] = dataclasses.field(default_factory=list)


def _find_suffix(state_dict: Mapping[str, Any], suffix: str) -> list[str]:
  return sorted(k[:-len(suffix)] for k in state_dict if k.endswith(suffix)
                and (k == suffix or k[:-len(suffix)].endswith('.')))


def _model_config(fusion: str, depth: int, decoder_channels: tuple[int, ...]) -> dict[str, Any]:
  return {'fusion': fusion, 'encoder': f'resnet{depth}', 'decoder_channels': list(decoder_channels),
          's1_channels': len(constants.S1_BANDS), 'compute_dtype': 'float32'}


def _template(fusion: str, depth: int, s2_bands: int, num_classes: int,
              decoder_channels: tuple[int, ...]) -> dict[str, Any]:
  model = models.build_pretrain_model(_model_config(fusion, depth, decoder_channels),
                                      num_classes, s2_bands)
  size = 64
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, len(constants.S1_BANDS))),
      jnp.zeros((1, size, size, s2_bands)), train=False))


def _decoder_shapes(state_dict: Mapping[str, np.ndarray], decoder: str, head: str,
                    source: str) -> tuple[tuple[int, ...], int]:
  channels = []
  while (key := f'{decoder}.blocks.{len(channels)}.conv1.0.weight') in state_dict:
    channels.append(int(state_dict[key].shape[0]))
  head_key = f'{head}.0.weight'
  if not channels or head_key not in state_dict:
    raise CheckpointError(f'{source}: no U-Net decoder ({decoder}.blocks.0.conv1.0.weight) or '
                          f'head ({head_key}) found')
  if len(channels) != 5:
    raise CheckpointError(f'{source}: the decoder has {len(channels)} blocks; the U-Net of '
                          'this project has 5 (encoder depth 5)')
  return tuple(channels), int(state_dict[head_key].shape[0])


def _convert_cromss(state_dict: Mapping[str, np.ndarray], prefix: str, fusion: str,
                    source: str) -> Converted:
  p = prefix
  if fusion == 'mid':
    enc = {'s1': f'{p}encoder1.', 's2': f'{p}encoder.'}
    dec = {'decoder': (f'{p}decoder', f'{p}segmentation_head')}
  else:
    enc = {'s1': f'{p}model1.encoder.', 's2': f'{p}model2.encoder.'}
    dec = {f'decoder_{m}': (f'{p}model{i}.decoder', f'{p}model{i}.segmentation_head')
           for i, m in ((1, 's1'), (2, 's2'))}
  depths = {m: _resnet_depth(state_dict, e, source) for m, e in enc.items()}
  if depths['s1'] != depths['s2']:
    raise CheckpointError(f'{source}: the S1 encoder is a ResNet-{depths["s1"]} and the S2 '
                          f'encoder a ResNet-{depths["s2"]}; both must have one depth')
  s1_channels = _in_channels(state_dict, enc['s1'] + 'conv1.weight', source)
  if s1_channels != len(constants.S1_BANDS):
    raise CheckpointError(f'{source}: the S1 encoder ({enc["s1"]}conv1.weight) takes '
                          f'{s1_channels} bands, expected 2 (VV, VH)')
  s2_bands = _s2_bands(_in_channels(state_dict, enc['s2'] + 'conv1.weight', source), source,
                       enc['s2'] + 'conv1.weight')
  shapes = {name: _decoder_shapes(state_dict, d, h, source) for name, (d, h) in dec.items()}
  if len(set(shapes.values())) != 1:
    raise CheckpointError(f'{source}: the two U-Nets differ in decoder widths or classes: '
                          f'{shapes}')
  decoder_channels, num_classes = next(iter(shapes.values()))
  template = _template(fusion, depths['s1'], s2_bands, num_classes, decoder_channels)
  prefixes: dict[str, Any] = {f'encoder_{m}': ('encoder', e) for m, e in enc.items()}
  prefixes.update({name: ('decoder', d, h) for name, (d, h) in dec.items()})
  variables = _fill(state_dict, _torch_names(template, prefixes), (), source)
  return Converted('pretrain_model', variables, depths['s1'], fusion=fusion, s2_bands=s2_bands,
                   num_classes=num_classes, decoder_channels=decoder_channels, prefix=prefix)


def _convert_resnet(state_dict: Mapping[str, np.ndarray], prefix: str, explicit: bool,
                    source: str) -> Converted:
  notes = []
  outside = sorted(k for k in state_dict if not k.startswith(prefix))
  if explicit and outside:
    notes.append(f'ignored {len(outside)} tensors outside the prefix {prefix!r} '
                 f'({_listing(outside, 4)})')
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  head = sorted(k for k in state_dict if k.startswith(prefix + 'fc.'))
  if head:
    notes.append(f'ignored the classification head of the backbone: {_listing(head, 4)}')
  depth = _resnet_depth(state_dict, prefix, source)
  channels = _in_channels(state_dict, prefix + 'conv1.weight', source)
  modality = 's1' if channels == len(constants.S1_BANDS) else 's2'
  s2_bands = None if modality == 's1' else _s2_bands(channels, source, prefix + 'conv1.weight')
  encoder = models.ResNetEncoder(depth=depth)
  template = jax.eval_shape(lambda: encoder.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, channels)), train=False))
  variables = _fill(state_dict, _torch_names(template, {'': ('encoder', prefix)}), head, source)
  return Converted('encoder', variables, depth, modality=modality, s2_bands=s2_bands,
                   prefix=prefix, notes=notes)


def convert(state_dict: Mapping[str, np.ndarray], *, prefix: str | None = None,
            source: str = 'the checkpoint') -> Converted:
  """Recognises the network of a state dict and returns its Flax variables (see module doc).

  `prefix` selects the ResNet under that key prefix (e.g. 'module.encoder_q.' of a MoCo
  checkpoint); keys outside it are then ignored. Without it the prefix is found from the keys
  and every key must belong to the network.
  """
  if prefix is None:
    for fusion, marker in (('mid', 'encoder1.conv1.weight'), ('late', 'model1.encoder.conv1.weight')):
      found = _find_suffix(state_dict, marker)
      if found:
        return _convert_cromss(state_dict, found[0], fusion, source)
  if prefix is not None:
    if prefix + 'conv1.weight' not in state_dict:
      raise CheckpointError(f'{source}: no {prefix}conv1.weight (prefix {prefix!r} given)')
    return _convert_resnet(state_dict, prefix, True, source)
  candidates = [p for p in _find_suffix(state_dict, 'conv1.weight')
                if 'layer' not in p and p + 'bn1.weight' in state_dict]
  if not candidates:
    raise CheckpointError(f'{source}: neither a CromSS network (net.encoder1.*, net.model1.*) '
                          'nor a ResNet (conv1.weight, bn1.*, layer1.*) was recognised; keys '
                          f'are {_listing(sorted(state_dict), 6)}')
  if len(candidates) > 1:
    raise CheckpointError(f'{source}: several ResNets found, under the prefixes '
                          f'{candidates}; choose one with --prefix')
  return _convert_resnet(state_dict, candidates[0], False, source)


# ----------------------------------------------------------------------------------------------
# Import into an export
# ----------------------------------------------------------------------------------------------
def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _class_names(num_classes: int) -> list[str]:
  if num_classes == len(constants.DW_CLASSES):
    return list(constants.DW_CLASSES)
  return [f'class {i}' for i in range(num_classes)]


def _int_or_none(value: Any) -> int | None:
  return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def export_items(converted: Converted, checkpoint: Checkpoint, sha256: str
                 ) -> dict[str, tuple[dict, dict]]:
  """{export item name: (variables, metadata)} for `exports.write_export`."""
  top = checkpoint.obj if isinstance(checkpoint.obj, dict) else {}
  common: dict[str, Any] = {
      'source_file': os.path.abspath(checkpoint.path), 'source_sha256': sha256,
      'source_step': _int_or_none(top.get('global_step')),
      'epoch': _int_or_none(top.get('epoch')),
      'encoder': f'resnet{converted.depth}', 'normalisation': exports.NORMALISATION,
      'imported_by': 'cromss_jax.import_weights',
  }
  if converted.kind == 'encoder':
    modality = converted.modality
    meta = dict(common, kind='encoder', modality=modality, classes=[], num_classes=None,
                source_format='torchvision/timm ResNet state dict',
                source_prefix=converted.prefix,
                note='a backbone of another pretraining: the state dict does not record its '
                     'input normalisation; this project feeds the normalisation above',
                **exports.band_metadata(modality, converted.s2_bands or 13))
    return {f'encoder_{modality}': (converted.variables, meta)}
  num_classes = int(converted.num_classes)
  config = {'model': _model_config(converted.fusion, converted.depth,
                                   converted.decoder_channels),
            'data': {'s2_bands': converted.s2_bands},
            'objective': {'num_classes': num_classes}}
  common.update(classes=_class_names(num_classes), num_classes=num_classes, config=config,
                source_format='CromSS PyTorch Lightning checkpoint', source_prefix=converted.prefix)
  items = {}
  for modality in exports.MODALITIES:
    items[f'encoder_{modality}'] = (
        models.extract_encoder(converted.variables, modality),
        dict(common, kind='encoder', modality=modality,
             **exports.band_metadata(modality, converted.s2_bands)))
  items['pretrain_model'] = (converted.variables, dict(
      common, kind='pretrain_model', fusion=converted.fusion,
      s1=exports.band_metadata('s1', converted.s2_bands),
      s2=exports.band_metadata('s2', converted.s2_bands)))
  return items


def import_checkpoint(path: str, out_dir: str, *, prefix: str | None = None,
                      overwrite: bool = False, fmt: str = 'orbax') -> dict[str, str]:
  """Reads a PyTorch checkpoint and writes its networks as an export; returns the paths."""
  out_abs = os.path.abspath(out_dir)
  if os.path.exists(out_abs) and not overwrite:
    raise FileExistsError(f'{out_abs} exists; pass --overwrite to replace it')
  checkpoint = read_checkpoint(path)
  if checkpoint.skipped:
    logging.info('%s: skipped objects of classes this reader does not admit (not needed for '
                 'the weights): %s', path, ', '.join(f'{k} x{v}' for k, v in
                                                     sorted(checkpoint.skipped.items())))
  state_dict, where = state_dict_of(checkpoint)
  converted = convert(state_dict, prefix=prefix, source=f'{path} (state dict {where})')
  for note in converted.notes:
    logging.info('%s: %s', path, note)
  what = (f'CromSS {converted.fusion} fusion, ResNet-{converted.depth}, S2 {converted.s2_bands} '
          f'bands, {converted.num_classes} classes' if converted.kind == 'pretrain_model' else
          f'ResNet-{converted.depth} {converted.modality.upper()} encoder')
  logging.info('%s: %s (%d tensors, prefix %r)', path, what, len(state_dict), converted.prefix)
  items = export_items(converted, checkpoint, sha256_of(path))
  return exports.write_export(out_abs, items, overwrite=overwrite, fmt=fmt)
