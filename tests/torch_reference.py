"""An independent PyTorch implementation of the CromSS networks, for the import parity tests.

Written for the tests from the published definitions, not from this project's Flax code:
* the ResNet encoder is torchvision's (v1.5: the stride of a bottleneck sits on its 3x3 conv;
  module names conv1, bn1, layer1..layer4 of blocks conv1/bn1/conv2/bn2[/conv3/bn3] and a
  `downsample` Sequential(conv 1x1, BN)), wrapped as segmentation_models_pytorch does: forward
  returns [input, stem, layer1 .. layer4] and there is no avgpool/fc;
* the U-Net decoder and head are smp's `UnetDecoder` (blocks of nearest x2 upsampling, skip
  concatenation, two Conv2dReLU = Sequential(conv 3x3 no bias, BN, ReLU), identity centre) and
  `SegmentationHead` (Sequential(conv 3x3 with bias, identity upsampling, identity activation));
* the two-branch wrappers use the CromSS attribute names: mid fusion `encoder1` (S1),
  `encoder` (S2), one `decoder` and `segmentation_head`; late fusion `model1` (S1) and `model2`
  (S2), each a whole smp `Unet` (`encoder`, `decoder`, `segmentation_head`). The Lightning
  module keeps the network as `net`, hence the `net.` prefix of checkpoint keys.
"""
from __future__ import annotations

import collections

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + identity)


LAYOUTS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
           50: (Bottleneck, (3, 4, 6, 3))}


class ResNetEncoder(nn.Module):
  """torchvision ResNet as an smp encoder; `with_fc` adds the classifier of a backbone."""

  def __init__(self, depth: int, in_channels: int, with_fc: bool = False):
    super().__init__()
    block, counts = LAYOUTS[depth]
    self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
      layers = []
      for j in range(count):
        layers.append(block(inplanes, planes, (1 if i == 0 else 2) if j == 0 else 1))
        inplanes = planes * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*layers))
    self.out_channels = (in_channels, 64, 64 * block.expansion, 128 * block.expansion,
                         256 * block.expansion, 512 * block.expansion)
    self.fc = nn.Linear(inplanes, 1000) if with_fc else None

  def forward(self, x):
    stem = F.relu(self.bn1(self.conv1(x)))
    l1 = self.layer1(self.maxpool(stem))
    l2 = self.layer2(l1)
    l3 = self.layer3(l2)
    l4 = self.layer4(l3)
    return [x, stem, l1, l2, l3, l4]


def conv2d_relu(cin: int, cout: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU())


class DecoderBlock(nn.Module):

  def __init__(self, cin: int, skip: int, cout: int):
    super().__init__()
    self.conv1 = conv2d_relu(cin + skip, cout)
    self.conv2 = conv2d_relu(cout, cout)

  def forward(self, x, skip=None):
    x = F.interpolate(x, scale_factor=2, mode='nearest')
    if skip is not None:
      x = torch.cat([x, skip], dim=1)
    return self.conv2(self.conv1(x))


class UnetDecoder(nn.Module):

  def __init__(self, encoder_channels, decoder_channels=(256, 128, 64, 32, 16)):
    super().__init__()
    channels = list(encoder_channels[1:])[::-1]
    ins = [channels[0]] + list(decoder_channels[:-1])
    skips = channels[1:] + [0]
    self.blocks = nn.ModuleList(DecoderBlock(i, s, o)
                                for i, s, o in zip(ins, skips, decoder_channels))

  def forward(self, *features):
    features = features[1:][::-1]
    x, skips = features[0], features[1:]
    for i, block in enumerate(self.blocks):
      x = block(x, skips[i] if i < len(skips) else None)
    return x


def segmentation_head(cin: int, classes: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(cin, classes, 3, padding=1), nn.Identity(), nn.Identity())


class Unet(nn.Module):

  def __init__(self, depth: int, in_channels: int, classes: int, decoder_channels):
    super().__init__()
    self.encoder = ResNetEncoder(depth, in_channels)
    self.decoder = UnetDecoder(self.encoder.out_channels, decoder_channels)
    self.segmentation_head = segmentation_head(decoder_channels[-1], classes)

  def forward(self, x):
    return self.segmentation_head(self.decoder(*self.encoder(x)))


class MidFusion(nn.Module):

  def __init__(self, depth: int, s2_channels: int, classes: int,
               decoder_channels=(256, 128, 64, 32, 16)):
    super().__init__()
    self.encoder1 = ResNetEncoder(depth, 2)
    self.encoder = ResNetEncoder(depth, s2_channels)
    self.decoder = UnetDecoder(self.encoder1.out_channels, decoder_channels)
    self.segmentation_head = segmentation_head(decoder_channels[-1], classes)

  def forward(self, x1, x2):
    return (self.segmentation_head(self.decoder(*self.encoder1(x1))),
            self.segmentation_head(self.decoder(*self.encoder(x2))))


class LateFusion(nn.Module):

  def __init__(self, depth: int, s2_channels: int, classes: int,
               decoder_channels=(256, 128, 64, 32, 16)):
    super().__init__()
    self.model1 = Unet(depth, 2, classes, decoder_channels)
    self.model2 = Unet(depth, s2_channels, classes, decoder_channels)

  def forward(self, x1, x2):
    return self.model1(x1), self.model2(x2)


def randomise(module: nn.Module, seed: int) -> nn.Module:
  """Weights and non-trivial BatchNorm running statistics, scaled to keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=gen))
        m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
        m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
        m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
        m.num_batches_tracked.fill_(1234)
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.01)
        m.bias.zero_()
  return module.eval()


class NotAllowed:
  """A class of the test module: pickled by reference, so the reader must skip it."""

  def __init__(self, value):
    self.value = value


def lightning_checkpoint(net: nn.Module, epoch: int = 199, step: int = 12345) -> dict:
  """What PyTorch Lightning's `trainer.save_checkpoint` writes for the CromSS module."""
  import argparse  # pylint: disable=g-import-not-at-top
  state = collections.OrderedDict((f'net.{k}', v) for k, v in net.state_dict().items())
  optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
  return {
      'epoch': epoch, 'global_step': step, 'pytorch-lightning_version': '2.1.3',
      'state_dict': state,
      'loops': {'fit_loop': {'state_dict': {}, 'epoch_progress': {'total': {'ready': epoch}}}},
      'callbacks': {"ModelCheckpoint{'monitor': 'v_loss'}": {
          'best_model_score': torch.tensor(0.42), 'best_model_path': '/x/epoch=199.ckpt',
          'dirpath': '/x'}},
      'optimizer_states': [optimizer.state_dict()],
      'lr_schedulers': [],
      'hparams_name': 'args',
      'hyper_parameters': {'args': argparse.Namespace(mt='resnet50', n_channels=13, lr=5e-3,
                                                      fuse_type='mid', extra=NotAllowed(3))},
  }
