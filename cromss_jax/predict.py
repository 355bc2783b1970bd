"""`python -m cromss_jax.predict`: the command of `cromss_jax.apps.predict` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import predict
  __doc__ = predict.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(predict)
  predict.run()
