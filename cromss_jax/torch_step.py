"""The PyTorch side of `benchmark step --compare_torch`: the same networks and an Adam step.

The networks are the independent PyTorch implementation of the CromSS networks that the weight
parity tests use (`tests/torch_reference.py`: torchvision ResNets wrapped as
segmentation_models_pytorch U-Nets, mid or late fusion), loaded from the source tree by path so
that torch stays an optional dependency of the project. The loss is CE + Dice on both branches
plus a CE consistency term between them: the same family as the CromSS objective, without the
prior, the sample selection and the ramp, so the PyTorch step does slightly less work than the
JAX step it is compared with (the comparison favours PyTorch).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

from cromss_jax import cli

TORCH_PIN = 'torch==2.13.0'
_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
                          'torch_reference.py')


def import_torch():
  """torch, or a user error saying how to install the pinned CPU build."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise cli.UserError(f'--compare_torch needs PyTorch, which is not importable ({err}); '
                        f'pip install {TORCH_PIN}') from None
  return torch


def _reference_module():
  if not os.path.exists(_REFERENCE):
    raise cli.UserError(f'{_REFERENCE}: the PyTorch networks of --compare_torch are missing '
                        '(run from a source checkout of the project)')
  spec = importlib.util.spec_from_file_location('cromss_torch_reference', _REFERENCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_torch_step(*, encoder: str, fusion: str, s2_bands: int, num_classes: int,
                     batch: int, size: int, learning_rate: float = 5e-3,
                     weight_decay: float = 1e-8, threads: int | None = None,
                     seed: int = 0) -> Callable[[], float]:
  """A closure running one PyTorch training step (f32, NCHW) and returning its loss."""
  torch = import_torch()
  ref = _reference_module()
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  depth = int(encoder.replace('resnet', ''))
  net_cls = ref.MidFusion if fusion == 'mid' else ref.LateFusion
  net = net_cls(depth, s2_bands, num_classes).train()
  opt = torch.optim.Adam(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
  gen = torch.Generator().manual_seed(seed)
  # uint8 records scaled to [0, 1], as the JAX step does on the device.
  s1 = torch.randint(0, 256, (batch, 2, size, size), generator=gen).float() / 255.0
  s2 = torch.randint(0, 256, (batch, s2_bands, size, size), generator=gen).float() / 255.0
  labels = torch.randint(0, num_classes, (batch, size, size), generator=gen)
  one_hot = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
  functional = torch.nn.functional

  def dice(logits):
    probs = logits.softmax(1)
    inter = (probs * one_hot).sum((0, 2, 3))
    union = probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3))
    return 1.0 - ((2.0 * inter + 1.0) / (union + 1.0)).mean()

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    z1, z2 = net(s1, s2)
    loss = (functional.cross_entropy(z1, labels) + dice(z1)
            + functional.cross_entropy(z2, labels) + dice(z2)
            + functional.cross_entropy(z1, z2.detach().softmax(1))
            + functional.cross_entropy(z2, z1.detach().softmax(1)))
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step
