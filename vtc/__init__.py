"""vtc — visual token compression for vision-language models."""

from .budget import resolve_budget as resolve_budget
from .reducers import Reducer as Reducer
from .reducers import ReducerConfig as ReducerConfig
from .reducers import create_reducer as create_reducer
from .reducers import list_reducers as list_reducers
from .reducers import register_reducer as register_reducer
from .tokenizers import TokenizedImages as TokenizedImages
from .tokenizers import create_tokenizer as create_tokenizer
from .tokenizers import list_tokenizers as list_tokenizers
from .types import Query as Query
from .types import Selection as Selection
from .types import VisualTokens as VisualTokens

__version__ = "0.1.0"

from .adapters import compress as compress  # noqa: E402  (after the reducers it patches in)
from .adapters import compressed as compressed  # noqa: E402
from .adapters import restore as restore  # noqa: E402
from .adapters.encoders import encode_and_reduce as encode_and_reduce  # noqa: E402
