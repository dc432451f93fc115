"""tml: JAX/Flax multi-task face analysis (Chu & Liu 2019; DeVries et al. 2014).

Importing tml imports neither PyTorch nor TensorFlow; the PyTorch twins live in
``tml.torch`` (the package) behind the ``torch`` extra.
"""

__version__ = "0.1.0"


def __getattr__(name):
  # tml.Predictor without importing jax/flax on `import tml`.
  if name == "Predictor":
    from tml.predict import Predictor
    return Predictor
  raise AttributeError(f"module 'tml' has no attribute {name!r}")
