"""transformers API drift we must absorb (ENV.md pins 5.24 for CI; GPU images carry others).

The KV-cache keyword of decoder layers and models was `past_key_values` up to 5.17 and is
`cache` from later 5.x on (where `past_key_values` survives as a deprecated alias). An
unknown keyword is swallowed by `**kwargs`, so passing the wrong one does not fail: the
cache is silently ignored and tree decoding goes wrong. Hence one name, looked up once.
"""
from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaDecoderLayer

CACHE_KW = ("cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters
            else "past_key_values")


def with_cache(cache) -> dict:
    """`**with_cache(c)`: the cache keyword argument for this transformers version."""
    return {CACHE_KW: cache}
