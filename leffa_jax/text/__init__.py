"""Text side of conditioning: the CLIP tokenizer (pure Python, no torch)."""

from leffa_jax.text.tokenizer import CLIPTokenizer, TokenizerError

__all__ = ["CLIPTokenizer", "TokenizerError"]
