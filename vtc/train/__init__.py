"""Training loops for the parts of vtc that learn (tiny VLMs, tokenizers)."""
