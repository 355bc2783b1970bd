"""`python -m cromss_jax.import_weights`: the command of `cromss_jax.apps.import_weights` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import import_weights
  __doc__ = import_weights.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(import_weights)
  import_weights.run()
