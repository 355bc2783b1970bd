"""`python -m cromss_jax.demo`: the command of `cromss_jax.apps.demo` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import demo
  __doc__ = demo.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(demo)
  demo.run()
