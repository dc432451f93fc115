"""The optional PyTorch side of tml (the ``torch`` extra).

Nothing in the core imports this package; importing it imports nothing
either (each submodule imports torch itself):

  twins       PyTorch twins of the registered networks and of the loss terms
  convert     Flax <-> torch weight converters (exact, both ways)
  inputs      twins of the step's input side (Eq. 1 heatmap, DeVries label
              maps, batch standardisation, centred crop)
  optim       Adam and SGD with momentum exactly as optax defines them, and
              an adapter for the native ``torch.optim`` ones
  step        the torch train step, ``step(state, batch) -> (state, metrics)``
              like ``tml.train_step.make_train_step``'s
  trainer     the engine behind ``--framework=torch``: ``tml.train``'s loop
              trains the twins (``tml.engine`` picks it)
  trajectory  trajectory parity: both frameworks trained from the same
              weights on the same batches, compared step by step
"""
