"""Flax NNX building blocks whose module trees mirror diffusers (see leffa_jax/weights/)."""
