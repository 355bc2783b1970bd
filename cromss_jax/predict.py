"""`python -m cromss_jax.predict`: see `cromss_jax.apps.predict` (the library is `cromss_jax.mapping`,
whose names stay importable from here for existing callers)."""
from cromss_jax.mapping import *  # noqa: F401,F403  pylint: disable=wildcard-import

if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import predict
  __doc__ = predict.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(predict)
  predict.run()
