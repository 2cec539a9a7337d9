"""The analytic cost model of `pipedec-sim profile analytic`: a roofline per operation with
efficiency factors fitted to the measured H100 profiles (`fit.py`, `benchmarks/analytic_fit.py`).

Per decoder layer with n new rows over c cached ones (P weights of w bytes, hidden h):

    gemm(P, n)  = (t_mem^k + t_flop^k)^(1/k),  t_mem = P w / (B mem_eff),
                  t_flop = 2 P n / (F flop_eff h / (h + h_half))
    attention   = (c + n) heads a / B  +  4 n (c + n) heads head_dim / (F_bf16 attn_flop_eff)
    layer(n, c) = gemm(P_layer, n) + attention + layer_ms

with B the memory bandwidth, F the dense peak FLOP/s of the weights' dtype, k the `knee`
(how sharply memory-bound turns into compute-bound; k -> inf is the plain max), h_half the
hidden size at which a GEMM reaches half of `flop_eff` (small GEMMs use the GPU less), and a
the bytes-equivalent of attention per (cached key, query head): `attn_bytes` for a batch of
tree rows, `attn_bytes_single` for one row (eager PyTorch attention picks another kernel
without a tree mask), scaled by the KV dtype's size / 2. Then

    lm_head(n)        = gemm(vocab h, n) + lm_head_ms
    draft_step(n, c)  = draft.layers layer_draft(n, c) + lm_head_draft(n) + draft_step_ms
    embed(n)          = n h w / (B mem_eff) + embed_ms
    kv_compact(L, c)  = L (compact_layer_ms + 4 kv_heads head_dim w_kv c / (B mem_eff))

(a compaction reads and writes the K and V of its L layers once). The fixed terms are kernel
time in ms and are kept as fitted on every GPU: an assumption (small kernels take about the
same few microseconds on any recent GPU).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .analytic import layer_params
from .model import ModelShape

# The measured point the KV compaction term is fitted to: benchmarks/gpu/check.py times one
# prune of a 6-layer stage at context 4096 (see its profiles' provenance notes).
COMPACT_LAYERS = 6
COMPACT_CONTEXT = 4096


@dataclass(frozen=True)
class Efficiency:
    """Fitted fractions of a GPU's peaks and fixed kernel times (module docstring)."""

    name: str
    mem_eff: float
    flop_eff: float
    gemm_half_hidden: float
    knee: float
    attn_bytes: float
    attn_bytes_single: float
    attn_flop_eff: float
    layer_ms: float
    lm_head_ms: float
    draft_step_ms: float
    embed_ms: float
    compact_layer_ms: float
    head_overhead_ms: float
    fitted_to: str

    def to_dict(self) -> dict:
        return asdict(self)


# Fitted by `python benchmarks/analytic_fit.py` (pipedec_sim.inputs.profile.fit); the
# benchmark refits them and prints the error at every grid point.
EFFICIENCY: dict[str, Efficiency] = {e.name: e for e in (
    Efficiency("kernels", mem_eff=0.7768, flop_eff=0.9635, gemm_half_hidden=3984.0,
               knee=2.510, attn_bytes=3488.0, attn_bytes_single=1050.0,
               attn_flop_eff=0.9775, layer_ms=0.0494, lm_head_ms=0.0, draft_step_ms=0.9407,
               embed_ms=0.0033, compact_layer_ms=0.1041, head_overhead_ms=0.0621,
               fitted_to="h100-llama70b-1b-kernels (summed GPU kernel time: what CUDA-graph "
                         "replay of eager PyTorch's kernels approaches)"),
    Efficiency("eager", mem_eff=0.674, flop_eff=0.8899, gemm_half_hidden=3942.0, knee=5.061,
               attn_bytes=2798.0, attn_bytes_single=0.0, attn_flop_eff=0.2264,
               layer_ms=0.2164, lm_head_ms=0.1842, draft_step_ms=7.632, embed_ms=0.0371,
               compact_layer_ms=0.0649, head_overhead_ms=0.1151,
               fitted_to="h100-llama70b-1b (eager PyTorch wall time: host launch overhead "
                         "included)"),
)}
DEFAULT_EFFICIENCY = "kernels"


@dataclass(frozen=True)
class Hardware:
    """One GPU at one dtype: bytes and FLOPs per ms."""

    bytes_per_ms: float
    flops_per_ms: float           # dense tensor-core peak of the weights' dtype
    attn_flops_per_ms: float      # bf16: attention runs in bf16 even with fp8 weights
    weight_bytes: int
    kv_bytes: int

    @classmethod
    def of(cls, mem_bw_gbs: float, tflops: float, bf16_tflops: float, weight_bytes: int,
           kv_bytes: int) -> Hardware:
        return cls(mem_bw_gbs * 1e9 / 1e3, tflops * 1e12 / 1e3, bf16_tflops * 1e12 / 1e3,
                   weight_bytes, kv_bytes)


def _gemm(hw: Hardware, e: Efficiency, params: float, n: Any, hidden: int) -> Any:
    t_mem = params * hw.weight_bytes / (hw.bytes_per_ms * e.mem_eff)
    t_flop = 2.0 * params * n / (hw.flops_per_ms * e.flop_eff * hidden
                                 / (hidden + e.gemm_half_hidden))
    return (t_mem ** e.knee + t_flop ** e.knee) ** (1.0 / e.knee)


def layer_ms(hw: Hardware, e: Efficiency, s: ModelShape, n: Any, c: Any) -> Any:
    """One decoder layer of shape `s`: n new rows over c cached (scalars or numpy arrays)."""
    keys = np.asarray(c) + n
    per_key = np.where(np.asarray(n) == 1, e.attn_bytes_single, e.attn_bytes)
    attn = (keys * s.heads * per_key * (hw.kv_bytes / 2) / hw.bytes_per_ms
            + 4.0 * n * keys * s.heads * s.head_dim / (hw.attn_flops_per_ms * e.attn_flop_eff))
    return _gemm(hw, e, layer_params(s), n, s.hidden) + attn + e.layer_ms


def lm_head_ms(hw: Hardware, e: Efficiency, s: ModelShape, n: Any) -> Any:
    return _gemm(hw, e, s.hidden * s.vocab, n, s.hidden) + e.lm_head_ms


def draft_step_ms(hw: Hardware, e: Efficiency, s: ModelShape, n: Any, c: Any) -> Any:
    return s.layers * layer_ms(hw, e, s, n, c) + lm_head_ms(hw, e, s, n) + e.draft_step_ms


def embed_ms(hw: Hardware, e: Efficiency, s: ModelShape, n: Any) -> Any:
    return n * s.hidden * hw.weight_bytes / (hw.bytes_per_ms * e.mem_eff) + e.embed_ms


def kv_compact_ms(hw: Hardware, e: Efficiency, s: ModelShape, layers: int,
                  context: int) -> float:
    kv = 2 * s.kv_heads * s.head_dim * hw.kv_bytes * context        # K and V of one layer
    return float(layers * (e.compact_layer_ms + 2 * kv / (hw.bytes_per_ms * e.mem_eff)))
