"""Shared test helpers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def numpy_variables(model, image_shape, seed=0):
  """``model``'s variables for inputs of ``image_shape``, filled from NumPy.

  The structure and shapes come from an abstract ``model.init``; kernels are
  fan-in scaled normals and biases are NON-zero, so a bias-mapping bug is
  visible. NumPy avoids compiling jax's initialisers, which is slow on CPU
  (the initialisers are tested directly in test_models).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "bias":
      return jnp.asarray(rng.normal(0, 0.1, leaf.shape), jnp.float32)
    std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)
