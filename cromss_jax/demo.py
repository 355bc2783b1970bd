"""`python -m cromss_jax.demo`: see `cromss_jax.apps.demo`."""
if __name__ == '__main__':
  from cromss_jax.apps import demo
  demo.run()
