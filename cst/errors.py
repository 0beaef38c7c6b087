"""Exceptions shared by cst's file readers (GGUF, safetensors, Hugging Face directories)."""


class FormatError(ValueError):
    """A model or tokenizer file is corrupt, truncated, or not in the format its name claims.
    The message names the file and the problem."""
