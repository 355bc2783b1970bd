"""Flax models of CromSS (docs/METHOD.md §3): ResNet encoders, U-Net decoder, mid/late fusion networks."""
from cromss_jax.models.fusion import (LateFusionUNet, MidFusionUNet, build_pretrain_model,
                                      compute_dtype, extract_encoder, insert_encoder)
from cromss_jax.models.resnet import ResNetEncoder, encoder_depth, pyramid_channels
from cromss_jax.models.unet import UNetDecoder
from cromss_jax.models.inputs import unit_float
from cromss_jax.models.init_options import jit_init

__all__ = [
    'LateFusionUNet',
    'MidFusionUNet',
    'ResNetEncoder',
    'UNetDecoder',
    'build_pretrain_model',
    'compute_dtype',
    'encoder_depth',
    'extract_encoder',
    'insert_encoder',
    'jit_init',
    'pyramid_channels',
    'unit_float',
]
