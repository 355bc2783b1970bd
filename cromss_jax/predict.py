"""`python -m cromss_jax.predict`: see `cromss_jax.apps.predict` (the library is `cromss_jax.mapping`,
whose names stay importable from here for existing callers)."""
from cromss_jax.mapping import *  # noqa: F401,F403  pylint: disable=wildcard-import

if __name__ == '__main__':
  from cromss_jax.apps import predict
  predict.run()
