"""vtc.adapters — plug reducers into real models.

* Model families (`compress` / `restore` / `compressed`): one file per transformers VLM family.
"""

from . import llava as llava  # noqa: F401  (registers the family)
from . import llava_next as llava_next  # noqa: F401  (registers the family)
from . import qwen2_vl as qwen2_vl  # noqa: F401
from .base import adapter_of as adapter_of
from .base import compress as compress
from .base import compressed as compressed
from .base import restore as restore
from .base import supported_models as supported_models
