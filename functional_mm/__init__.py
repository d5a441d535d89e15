"""functional_mm: a JAX-style functional training stack for large multimodal models on PyTorch.

Models are pure functions over parameter pytrees, every parameter carries logical axis names, optimizers are
optax-style transformations and the train step is a stateless, compiled function. See README.md.
"""

__version__ = "0.1.0"
