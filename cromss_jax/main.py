"""`python -m cromss_jax.main`: the command of `cromss_jax.apps.main` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import main
  __doc__ = main.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(main)
  main.run()
