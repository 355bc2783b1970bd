"""Two-sensor CromSS networks (docs/METHOD.md §3) and moving encoders in and out of their variables.

Middle fusion: an S1 and an S2 encoder share ONE U-Net decoder + head, applied to each branch
separately. Late fusion: two complete U-Nets. Either way the model returns (logits_s1,
logits_s2) and its variables (`params` and `batch_stats`) have only the top-level keys
`encoder_s1`, `encoder_s2` and `decoder` (mid) or `decoder_s1`, `decoder_s2` (late).

Under jit with the batch sharded over the mesh, BatchNorm statistics span the global batch,
unlike the per-GPU statistics of the PyTorch DDP reference (see `resnet`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from cromss_jax.models.resnet import ResNetEncoder, encoder_depth
from cromss_jax.models.unet import UNetDecoder

Dtype = Any

COMPUTE_DTYPES: dict[str, Dtype] = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODALITIES = ('s1', 's2')
ENCODER_COLLECTIONS = ('params', 'batch_stats')


def _check_input(name: str, x: jax.Array, channels: int) -> None:
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f'{name} must be NHWC with {channels} channels, got shape {x.shape}.')


class _TwoBranchBase(nn.Module):
  """Fields shared by both fusion variants."""
  num_classes: int
  s1_channels: int
  s2_channels: int
  depth: int = 50
  decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _encoder(self, name: str) -> ResNetEncoder:
    return ResNetEncoder(depth=self.depth, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=name)

  def _decoder(self, name: str) -> UNetDecoder:
    return UNetDecoder(num_classes=self.num_classes, decoder_channels=tuple(self.decoder_channels),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class MidFusionUNet(_TwoBranchBase):
  """Two encoders, one shared decoder + head.

  The shared decoder is called once per branch (not on a concatenated batch), so in training its
  BatchNorm normalises each branch with that branch's own statistics and its running averages are
  updated twice per step, S1 then S2, as in the PyTorch reference.
  """

  def setup(self) -> None:
    self.encoder_s1 = self._encoder('encoder_s1')
    self.encoder_s2 = self._encoder('encoder_s2')
    self.decoder = self._decoder('decoder')

  def __call__(self, s1: jax.Array, s2: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    _check_input('s1', s1, self.s1_channels)
    _check_input('s2', s2, self.s2_channels)
    logits_s1 = self.decoder(self.encoder_s1(s1, train=train), train=train)
    logits_s2 = self.decoder(self.encoder_s2(s2, train=train), train=train)
    return logits_s1.astype(jnp.float32), logits_s2.astype(jnp.float32)


class LateFusionUNet(_TwoBranchBase):
  """Two complete U-Nets (encoder + decoder + head each)."""

  def setup(self) -> None:
    self.encoder_s1 = self._encoder('encoder_s1')
    self.encoder_s2 = self._encoder('encoder_s2')
    self.decoder_s1 = self._decoder('decoder_s1')
    self.decoder_s2 = self._decoder('decoder_s2')

  def __call__(self, s1: jax.Array, s2: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    _check_input('s1', s1, self.s1_channels)
    _check_input('s2', s2, self.s2_channels)
    logits_s1 = self.decoder_s1(self.encoder_s1(s1, train=train), train=train)
    logits_s2 = self.decoder_s2(self.encoder_s2(s2, train=train), train=train)
    return logits_s1.astype(jnp.float32), logits_s2.astype(jnp.float32)


def compute_dtype(name: str) -> Dtype:
  """'bfloat16' | 'float32' -> jnp dtype, with an error naming the allowed values."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'model.compute_dtype={name!r} is not supported; expected one of '
                     f'{sorted(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[name]


def build_pretrain_model(model_cfg: Mapping[str, Any], num_classes: int,
                         s2_channels: int) -> nn.Module:
  """The CromSS pretraining network described by `config.model` (docs/METHOD.md §3).

  Parameters are always float32; `model_cfg.compute_dtype` sets the compute dtype. Logits are
  float32.
  """
  fusion = model_cfg['fusion']
  classes = {'mid': MidFusionUNet, 'late': LateFusionUNet}
  if fusion not in classes:
    raise ValueError(f'model.fusion={fusion!r} is not supported; expected one of '
                     f'{sorted(classes)}.')
  return classes[fusion](
      num_classes=int(num_classes),
      s1_channels=int(model_cfg['s1_channels']),
      s2_channels=int(s2_channels),
      depth=encoder_depth(model_cfg['encoder']),
      decoder_channels=tuple(int(c) for c in model_cfg['decoder_channels']),
      dtype=compute_dtype(model_cfg['compute_dtype']),
      param_dtype=jnp.float32)


def _encoder_key(modality: str) -> str:
  if modality not in MODALITIES:
    raise ValueError(f'modality={modality!r} is not supported; expected one of {MODALITIES}.')
  return f'encoder_{modality}'


def extract_encoder(variables: Mapping[str, Any], modality: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} of one encoder: directly usable with a standalone ResNetEncoder."""
  key = _encoder_key(modality)
  out = {}
  for collection in ENCODER_COLLECTIONS:
    if collection in variables:
      if key not in variables[collection]:
        raise ValueError(f'variables[{collection!r}] has no {key!r}; top-level keys are '
                         f'{sorted(variables[collection])}.')
      out[collection] = variables[collection][key]
  if 'params' not in out:
    raise ValueError(f'variables have no "params" collection; got {sorted(variables)}.')
  return out


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape}; works for arrays and for jax.eval_shape's ShapeDtypeStructs."""
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(unfreeze(tree)).items()}


def insert_encoder(variables: Mapping[str, Any], encoder_variables: Mapping[str, Any],
                   modality: str) -> dict[str, Any]:
  """A new variables tree with `encoder_<modality>` replaced; the input is not modified.

  Every collection in `encoder_variables` must match the existing encoder's structure and
  shapes exactly (same depth, same input channel count), otherwise ValueError says what differs.
  """
  key = _encoder_key(modality)
  new = {collection: dict(tree) for collection, tree in variables.items()}
  for collection, tree in encoder_variables.items():
    if collection not in new or key not in new[collection]:
      raise ValueError(f'cannot insert {collection!r} of the encoder: the target variables have '
                       f'no {collection}/{key}.')
    want, got = _shapes(new[collection][key]), _shapes(tree)
    if want != got:
      missing = sorted(set(want) - set(got))[:3]
      extra = sorted(set(got) - set(want))[:3]
      differing = [(k, want[k], got[k]) for k in sorted(set(want) & set(got))
                   if want[k] != got[k]][:3]
      raise ValueError(f'encoder {collection!r} does not fit {key}: missing {missing}, '
                       f'unexpected {extra}, shape differs (path, want, got) {differing}.')
    new[collection][key] = tree
  return new
