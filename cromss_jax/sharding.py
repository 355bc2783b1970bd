"""The device mesh and every sharding of the project, in one place.

The mesh has two axes: `data` (batch split across all devices of all hosts) and `fsdp` (also
splits the batch, and additionally shards parameters and optimiser state along their largest
divisible dimension, FSDP-style, for large encoders). With fsdp=1 parameters are replicated.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cromss_jax.config_validation import mesh_shape

DATA_AXES = ('data', 'fsdp')   # the batch dimension is split over both axes
# Parameters smaller than this stay replicated even with fsdp > 1 (not worth the all-gather).
_MIN_FSDP_SIZE = 2 ** 18


def create_mesh(config: ml_collections.ConfigDict,
                devices: list[jax.Device] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  data, fsdp = mesh_shape(config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, ('data', 'fsdp'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split across every device; other dimensions whole."""
  return NamedSharding(mesh, P(DATA_AXES))


def _param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < _MIN_FSDP_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
  """A NamedSharding per leaf of the (abstract) train state: FSDP over 'fsdp', else replicated."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp)),
                      abstract_state)


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-host numpy batch (this host's share) -> global jax.Arrays split over the data axes."""
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in batch.items()}
