"""`python -m cromss_jax.main --config=configs/pretrain.py --workdir=DIR`: see `cromss_jax.apps.main`."""
if __name__ == '__main__':
  from cromss_jax.apps import main
  main.run()
