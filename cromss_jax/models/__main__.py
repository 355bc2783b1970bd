"""`python -m cromss_jax.models`: the command of `cromss_jax.apps.model_summary` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import model_summary
  __doc__ = model_summary.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(model_summary)
  model_summary.run()
