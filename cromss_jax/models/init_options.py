"""How a model's init program is compiled (the one program that draws the parameters)."""
from __future__ import annotations

from typing import Any, Callable

import jax


def init_compiler_options(platform: str) -> dict[str, Any] | None:
  """XLA options for an init program on `platform`: on CPU, no LLVM optimisation of its kernels.

  The init program is one threefry (+ erf_inv) kernel per parameter. On CPU, LLVM's optimisation
  of those kernels is most of the program's compile time, yet the program runs once (figures in
  docs/PERFORMANCE.md). Values agree with an optimised build to float32 rounding, and every run
  compiles init with these same options, so runs that must match (resume, several processes,
  FSDP) still do. GPU and TPU builds are left alone.
  """
  if platform == 'cpu':
    return {'xla_backend_optimization_level': 0}
  return None


def jit_init(fn: Callable[..., Any], platform: str | None = None, **jit_kwargs) -> Any:
  """jax.jit of a function that initialises a model, compiled with init_compiler_options."""
  options = init_compiler_options(platform or jax.default_backend())
  return jax.jit(fn, compiler_options=options, **jit_kwargs)
