"""`python -m cromss_jax.evaluate`: the command of `cromss_jax.apps.evaluate` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import evaluate
  __doc__ = evaluate.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(evaluate)
  evaluate.run()
