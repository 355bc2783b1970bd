"""The network input convention: records hold normalised uint8; the networks see uint8 / 255."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def unit_float(x: jax.Array) -> jax.Array:
  """uint8 records -> [0, 1] float32 (the normalisation itself happened at conversion)."""
  return jnp.asarray(x).astype(jnp.float32) / 255.0
