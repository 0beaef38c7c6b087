"""Exceptions shared by cst's file readers (GGUF, safetensors, Hugging Face directories)."""


class FormatError(ValueError):
    """A model or tokenizer file is corrupt, truncated, or not in the format its name claims.
    The message names the file and the problem."""


class ChatTemplateError(ValueError):
    """A chat template failed or went past its bounds (time, loop iterations, sizes), or its markup
    cannot be told from the message contents. The message says which."""
