"""`python -m cromss_jax.models`: the command of `cromss_jax.apps.model_summary` (kept here)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import model_summary
  model_summary.define_flags()  # before adopting them: --help lists them
  __doc__ = model_summary.__doc__  # pylint: disable=redefined-builtin
  flags.adopt_module_key_flags(model_summary)
  model_summary.run(flags_defined=True)
