"""The reference output of a (prompt, sampling): the target alone, one token at a time.

No pipeline and no draft: the target's logits at each position go through the core's
sampler (`pipedec_sim.protocol.sampling`) keyed on the request and that position, so this
is what every strategy must commit for the request. At temperature 0 it is the greedy
continuation (HF `generate(do_sample=False)`).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from backends.torch.compat import with_cache
from pipedec_sim.protocol.sampling import Sampling, request_key, sample


@torch.inference_mode()
def reference_output(loaded, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                     request_id: str) -> list[int]:
    """The target's own (sampled) continuation of `prompt_ids`; stops after EOS."""
    model, key = loaded.model, request_key(request_id)
    cache = DynamicCache()
    out = model(torch.tensor([prompt_ids]), use_cache=True, **with_cache(cache))
    output: list[int] = []
    pos = len(prompt_ids)                     # position of the token being chosen
    while True:
        logits = out.logits[0, -1].double().numpy()
        token = sample(logits, sampling, key, pos)
        output.append(token)
        if len(output) >= max_new_tokens or token == loaded.eos:
            return output
        out = model(torch.tensor([[token]]), use_cache=True, **with_cache(cache))
        pos += 1
