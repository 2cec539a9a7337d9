"""Analytic profiles: a roofline model of a GPU, and constant profiles for tests."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import date

from .grid import CONTEXT_AXIS, TOKENS_AXIS, Grid1D, Grid2D
from .model import LLAMA_3_1_70B, LLAMA_3_2_1B, SCHEMA, LinkModel, ModelShape, Profile

# kv_compact_ms is estimated for one stage of ~80/14 layers holding a 1k-token context.
KV_COMPACT_LAYERS = 6
KV_COMPACT_CONTEXT = 1024


ANALYTIC_FORMULA = (
    "Roofline per op: t_ms = max(bytes/(mem_bw*mem_eff), flops/(peak*flop_eff)) + "
    "layer_overhead. Decoder layer with n new tokens and c cached rows, P params of b bytes, "
    "head_dim = hidden/heads: P = 2*hidden*hidden (q,o) + 2*hidden*kv_heads*head_dim (k,v) + "
    "3*hidden*intermediate (MLP), norms negligible; bytes = P*b + 2*kv_heads*head_dim*b*(c+n) "
    "(KV read/write); flops = 2*P*n + 4*n*(c+n)*heads*head_dim (attention scores+values). "
    "lm_head(n): P = hidden*vocab, bytes = P*b, flops = 2*P*n (+ argmax negligible), "
    "+ layer_overhead. embed(n): bytes = n*hidden*b, flops = 0, + layer_overhead. "
    "draft_step(n,c) = draft.layers * layer_draft(n,c) + lm_head_draft(n). "
    "kv_compact_ms = 2*(6*2*kv_heads*head_dim*b*1024)/(mem_bw*mem_eff) + layer_overhead "
    "(read+write once the K and V of one ~6-layer stage at 1k context). "
    "head_overhead_ms = 0.05 (assumed). Units: GB = 1e9 bytes, TFLOPS = 1e12 flop/s."
)

ANALYTIC_SOURCES = [
    "NVIDIA Ada Lovelace GPU architecture whitepaper (RTX 4090): 1008 GB/s GDDR6X memory "
    "bandwidth; 165.2 dense FP16/BF16 tensor TFLOPS with FP32 accumulate",
    "meta-llama/Llama-3.1-70B config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads, "
    "intermediate 28672, vocab 128256, bfloat16",
    "meta-llama/Llama-3.2-1B config.json: 16 layers, hidden 2048, 32 heads, 8 KV heads, "
    "intermediate 8192, vocab 128256, bfloat16",
    "IEEE 802.3 10GBASE-T / 100GBASE: 10 and 100 Gbit/s line rate",
    "assumed, not measured: mem_eff, flop_eff, layer_overhead (kernel launches), "
    "link latency, head_overhead",
]


@dataclass(frozen=True)
class _Roofline:
    bytes_per_ms: float
    flops_per_ms: float
    overhead_ms: float

    def ms(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.bytes_per_ms, flops / self.flops_per_ms) + self.overhead_ms


def layer_params(s: ModelShape) -> int:
    """Weights of one Llama decoder layer (norm weights ignored)."""
    return (2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * s.head_dim
            + 3 * s.hidden * s.intermediate)


def _layer_ms(hw: _Roofline, s: ModelShape, n: int, c: int) -> float:
    p, b, hd = layer_params(s), s.dtype_bytes, s.head_dim
    nbytes = p * b + 2 * s.kv_heads * hd * b * (c + n)
    flops = 2 * p * n + 4 * n * (c + n) * s.heads * hd
    return hw.ms(nbytes, flops)


def _lm_head_ms(hw: _Roofline, s: ModelShape, n: int) -> float:
    p = s.hidden * s.vocab
    return hw.ms(p * s.dtype_bytes, 2 * p * n)


def _embed_ms(hw: _Roofline, s: ModelShape, n: int) -> float:
    return hw.ms(n * s.hidden * s.dtype_bytes, 0)


def _kv_compact_ms(hw: _Roofline, s: ModelShape) -> float:
    kv = KV_COMPACT_LAYERS * 2 * s.kv_heads * s.head_dim * s.dtype_bytes * KV_COMPACT_CONTEXT
    return hw.ms(2 * kv, 0)


def _r(x: float) -> float:
    return round(x, 6)  # ns resolution: keeps bundled files readable, far below any effect


def _pkg_version() -> str:
    try:
        from importlib.metadata import version
        return version("pipedec-sim")
    except Exception:  # running from a source tree without an install
        return "source-tree"


def analytic_profile(*, mem_bw_gbs: float = 1008.0, peak_tflops: float = 165.0,
                     mem_eff: float = 0.8, flop_eff: float = 0.6,
                     layer_overhead_ms: float = 0.03, link_gbps: float = 10.0,
                     link_latency_ms: float = 0.05,
                     device: str = "24 GB consumer GPU (RTX 4090-class)",
                     target: ModelShape = LLAMA_3_1_70B,
                     draft: ModelShape = LLAMA_3_2_1B) -> dict:
    """A roofline-model profile dict (see ANALYTIC_FORMULA); validate it with parse_profile."""
    hw = _Roofline(mem_bw_gbs * 1e9 * mem_eff / 1e3, peak_tflops * 1e12 * flop_eff / 1e3,
                   layer_overhead_ms)
    ts, cs = TOKENS_AXIS, CONTEXT_AXIS
    params = (f"mem_bw={mem_bw_gbs} GB/s, mem_eff={mem_eff}, peak={peak_tflops} TFLOPS, "
              f"flop_eff={flop_eff}, layer_overhead={layer_overhead_ms} ms, "
              f"link={link_gbps} Gbit/s + {link_latency_ms} ms per hop")
    return {
        "schema": SCHEMA,
        "name": "analytic-llama70b-1b",
        "provenance": {
            "kind": "analytic", "device": device, "date": date.today().isoformat(),
            "command": "python -m pipedec_sim.profiles.make_analytic",
            "formula": ANALYTIC_FORMULA, "sources": list(ANALYTIC_SOURCES),
            "versions": {"pipedec-sim": _pkg_version()},
            "notes": f"Parameters: {params}. Not a measurement: use it for shape-of-the-curve "
                     "questions; calibrate on real hardware for absolute numbers.",
        },
        "target": target.to_dict(),
        "draft": draft.to_dict(),
        "latency": {
            "layer": {"tokens": list(ts), "context": list(cs),
                      "ms": [[_r(_layer_ms(hw, target, n, c)) for c in cs] for n in ts]},
            "draft_step": {"tokens": list(ts), "context": list(cs),
                           "ms": [[_r(draft.layers * _layer_ms(hw, draft, n, c)
                                      + _lm_head_ms(hw, draft, n)) for c in cs] for n in ts]},
            "lm_head": {"tokens": list(ts), "ms": [_r(_lm_head_ms(hw, target, n)) for n in ts]},
            "embed": {"tokens": list(ts), "ms": [_r(_embed_ms(hw, target, n)) for n in ts]},
            "kv_compact_ms": _r(_kv_compact_ms(hw, target)),
            "head_overhead_ms": 0.05,
        },
        "link": {"latency_ms": link_latency_ms, "bandwidth_gbps": link_gbps},
        "devices": {"kind": "gpu", "shared_cores": None},
        "split": None,
    }


# --------------------------------------------------------------------------- test helper

def constant_profile(*, layers: int = 8, layer_ms: float = 1.0, draft_ms: float = 0.0,
                     lm_head_ms: float = 0.0, embed_ms: float = 0.0,
                     link_latency_ms: float = 0.0, bandwidth_gbps: float | None = None,
                     kv_compact_ms: float = 0.0, head_overhead_ms: float = 0.0,
                     shared_cores: int | None = None, core_sharing: str = "ps") -> Profile:
    """A profile whose every grid is flat, so closed-form checks are exact.

    bandwidth_gbps=None means an ideal link (transfer_ms == 0).
    """
    def flat2(ms: float) -> Grid2D:
        return Grid2D((1,), (0,), ((float(ms),),))

    def flat1(ms: float) -> Grid1D:
        return Grid1D((1,), (float(ms),))

    return Profile(
        name="constant",
        provenance={"kind": "analytic", "device": "none (test profile)",
                    "date": date.today().isoformat(), "command": "constant_profile()",
                    "formula": "every duration is a constant",
                    "sources": ["synthetic: chosen by the caller"]},
        target=dataclasses.replace(LLAMA_3_1_70B, name="constant-target", layers=layers),
        draft=dataclasses.replace(LLAMA_3_2_1B, name="constant-draft"),
        layer=flat2(layer_ms), draft_step=flat2(draft_ms),
        lm_head=flat1(lm_head_ms), embed=flat1(embed_ms),
        kv_compact_ms=float(kv_compact_ms), head_overhead_ms=float(head_overhead_ms),
        link=LinkModel(float(link_latency_ms),
                  math.inf if bandwidth_gbps is None else float(bandwidth_gbps)),
        device_kind="gpu" if shared_cores is None else "cpu",
        shared_cores=shared_cores, split=None, core_sharing=core_sharing,
    )
