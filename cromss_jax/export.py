"""`python -m cromss_jax.export`: the command of `cromss_jax.apps.export` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import export
  __doc__ = export.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(export)
  export.run()
