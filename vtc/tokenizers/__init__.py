"""Variable-length 1-D image tokenizers (FlexTok, One-D-Piece, KARL) on a shared TiTok-style core.

Importing this package registers every tokenizer; `vtc.create_tokenizer(name)` builds one and
`vtc.list_tokenizers()` lists the names.
"""

from . import flextok, karl, one_d_piece  # noqa: F401  (registers the methods)
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
