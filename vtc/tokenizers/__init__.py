"""Variable-length 1-D image tokenizers (FlexTok, One-D-Piece, KARL) on a shared TiTok-style core.

Importing this package registers every tokenizer; `vtc.create_tokenizer(name)` builds one and
`vtc.list_tokenizers()` lists the names. `tower.TokenizerTower` makes a trained tokenizer the vision tower of a
stock LLaVA (the tokenizer → VLM bridge, trained by `vtc train bridge`).
"""

# importing registers the methods, and the tokenizer tower with transformers' Auto classes
from . import flextok, karl, one_d_piece, tower  # noqa: F401
from .base import (
    TOKENIZERS,
    TokenizedImages,
    Tokenizer1D,
    TokenizerConfig,
    create_tokenizer,
    get_tokenizer_class,
    list_tokenizers,
    register_tokenizer,
)
from .quantizers import FSQ, VectorQuantizer

__all__ = [
    "FSQ",
    "TOKENIZERS",
    "TokenizedImages",
    "Tokenizer1D",
    "TokenizerConfig",
    "VectorQuantizer",
    "create_tokenizer",
    "get_tokenizer_class",
    "list_tokenizers",
    "register_tokenizer",
]
