"""Vision-encoder adapters: timm and open_clip vision transformers → `vtc.VisualTokens`, for custom VLM pipelines.

* `encode(encoder, images)` — features, CLS-attention logits and keys of chosen layers, grid (`core.py`).
* `encode_and_reduce(encoder, images, reducer, budget, query=None)` — the one call between encoder and LLM.
* `image_transform(encoder)` — the preprocessing the encoder expects.
* `capture_attention(encoder, layer)` — the q/k capture around any forward of the encoder.
* `reduce_in_encoder(encoder, reducer, budget, layers)` — ToMe / CLS pruning between blocks, reversible.

One file per library: `timm_vit.py`, `open_clip_vit.py` (imported on first use).
"""

from .core import AttentionRecord as AttentionRecord
from .core import EncoderBackend as EncoderBackend
from .core import capture_attention as capture_attention
from .core import encode as encode
from .core import encode_and_reduce as encode_and_reduce
from .core import image_transform as image_transform
from .core import resolve_encoder as resolve_encoder
from .inside import EncoderReduction as EncoderReduction
from .inside import reduce_in_encoder as reduce_in_encoder
