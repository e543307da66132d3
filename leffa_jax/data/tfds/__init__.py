"""TFDS builders writing the three datasets as ArrayRecord (see ``builders``)."""
