"""`python -m cromss_jax.study`: the command of `cromss_jax.apps.study` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import study
  study.define_flags()  # before adopting them: --help lists them, and --out etc. are known
  __doc__ = study.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(study)
  study.run(flags_defined=True)
