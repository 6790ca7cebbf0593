"""Tensors only: a step's flat batch, the model's forward pass, sampling. No policy lives
here: the engine's scheduler decides what runs, the runner runs it. Depends on
:mod:`convoy.model`; nothing in the model imports it."""
