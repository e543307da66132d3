"""Flax NNX building blocks whose module tree mirrors diffusers (see convert.py)."""
