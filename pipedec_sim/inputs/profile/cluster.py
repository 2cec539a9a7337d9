"""An analytic profile of a whole cluster: GPUs, servers and links, a target and a draft.

`cluster_profile` builds the `pipedec-profile/1` dict `pipedec-sim profile analytic` writes:
latency grids from the fitted roofline (`roofline.py`), per-hop links from the placement
(`servers`: a stage boundary inside a server uses the intra-server link, across servers the
inter-server one), the KV compaction cost of the largest stage's layers, and the layer
split. Before any of it `check_memory` makes sure every GPU holds what it must.

Placement: topology A puts the head (draft and LM head) on GPU 0 of server 0 and stage j on
GPU j; topology B puts stage j on GPU j-1 and the head and draft beside stage 1. GPUs fill a
server before the next one.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from ...errors import InputError
from ..hardware import DTYPE_BYTES, GPU, GPUS, Link
from ..model_shapes import ModelSpec
from .analytic import _pkg_version
from .grid import CONTEXT_AXIS, TOKENS_AXIS
from .model import SCHEMA, split_layers
from .roofline import (
    COMPACT_CONTEXT,
    COMPACT_LAYERS,
    Efficiency,
    Hardware,
    draft_step_ms,
    embed_ms,
    kv_compact_ms,
    layer_ms,
    lm_head_ms,
)

GIB = 2**30
ACTIVATION_BYTES = 2       # hidden states between stages stay bf16 (also with fp8 weights)
DEFAULT_UTILIZATION = 0.9  # of each GPU's memory for weights and KV (vLLM's default)
DEFAULT_MAX_CONTEXT = 8192


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    stages: int
    servers: int
    gpus_per_server: int
    topology: str
    intra: Link
    inter: Link

    def slot(self, j: int) -> int:
        """GPU index (0-based, over the whole cluster) of stage j (1-based)."""
        return j if self.topology == "A" else j - 1

    def stage_server(self) -> tuple[int, ...]:
        return tuple(self.slot(j) // self.gpus_per_server for j in range(1, self.stages + 1))

    def where(self, j: int) -> str:
        """Stage j's GPU in words, counting from 1 (stage_server counts servers from 0)."""
        s = self.slot(j)
        return f"GPU {s % self.gpus_per_server + 1} of server {s // self.gpus_per_server + 1}"

    def describe(self) -> str:
        n = self.servers * self.gpus_per_server
        inside = f", {self.intra.name} inside a server" if self.gpus_per_server > 1 else ""
        return (f"{n} x {self.gpu.label} ({self.servers} server(s) x {self.gpus_per_server} "
                f"GPU(s){inside}, {self.inter.name} between servers), {self.stages} stages, "
                f"topology {self.topology}")


def plan_cluster(gpu: GPU, *, stages: int | None, servers: int | None, gpus_per_server: int,
                 topology: str, intra: Link, inter: Link) -> Cluster:
    """Fill in the stage or server count and check the stages fit the GPUs (topology A's
    head takes a GPU of its own)."""
    if topology not in ("A", "B"):
        raise InputError(f"expected A or B, got {topology!r}", field="--topology")
    head = 1 if topology == "A" else 0
    if stages is None:
        if servers is None:
            raise InputError("give --stages, or --servers (with --gpus-per-server) to use "
                             "every GPU", field="--stages")
        stages = servers * gpus_per_server - head
        if stages < 1:
            raise InputError(f"{servers} x {gpus_per_server} GPU(s) leave no GPU for a stage "
                             "beside topology A's head", field="--servers")
    need = stages + head
    if servers is None:
        servers = -(-need // gpus_per_server)
    elif need > servers * gpus_per_server:
        what = f"{stages} stages" + (" and the head (topology A)" if head else "")
        raise InputError(f"{what} need {need} GPUs, but {servers} server(s) x "
                         f"{gpus_per_server} hold {servers * gpus_per_server}",
                         field="--stages")
    return Cluster(gpu, stages, servers, gpus_per_server, topology, intra, inter)


# --------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class DeviceMemory:
    """What one GPU holds, in bytes."""

    device: str               # "stage 3" or "head"
    where: str
    layers: int
    parts: dict[str, float]   # weights, kv cache, embedding, lm head, draft, ...

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        return " + ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)


def memory_plan(cluster: Cluster, target: ModelSpec, draft: ModelSpec, dtype: str,
                max_context: int) -> list[DeviceMemory]:
    """Weights plus the KV cache of `max_context` tokens on every GPU that computes."""
    wb = kb = DTYPE_BYTES[dtype]
    layers = split_layers(target.layers, cluster.stages)
    S = cluster.stages
    draft_parts: dict[str, float] = {"draft weights": draft.params * wb,
                   "draft kv cache": draft.kv_bytes_per_token(draft.layers, kb) * max_context}
    out = []
    for j, n in enumerate(layers, start=1):
        parts: dict[str, float] = {"weights": n * target.layer_params * wb,
                 "kv cache": target.kv_bytes_per_token(n, kb) * max_context}
        if j == 1:
            parts["embedding"] = target.embed_params * wb
        if j == S and cluster.topology == "B" and not (S == 1 and target.tied):
            parts["lm head"] = target.embed_params * wb
        if j == 1 and cluster.topology == "B":
            parts.update(draft_parts)
        out.append(DeviceMemory(f"stage {j}", cluster.where(j), n, parts))
    if cluster.topology == "A":
        out.insert(0, DeviceMemory("head", "GPU 1 of server 1", 0,
                                   {"lm head": target.embed_params * wb, **draft_parts}))
    return out


def check_memory(cluster: Cluster, plan: list[DeviceMemory], utilization: float) -> None:
    """InputError naming the first GPU that cannot hold its share, and by how much."""
    have = cluster.gpu.memory_gib * GIB * utilization
    for d in plan:
        if d.total > have:
            short = (d.total - have) / GIB
            raise InputError(
                f"{d.device} ({d.where}, {d.layers} layers) needs {d.total / GIB:.1f} GiB "
                f"({d.describe()} GiB) but each {cluster.gpu.label} offers {have / GIB:.1f} GiB "
                f"({cluster.gpu.memory_gib:g} GiB x --gpu-memory-utilization {utilization:g}): "
                f"{short:.1f} GiB short; use more stages, --dtype fp8, a shorter "
                f"--max-context or a larger GPU", field="--stages")


# --------------------------------------------------------------------------- the profile

def _r(x: float) -> float:
    return round(float(x), 6)


FORMULA = (
    "Roofline per operation with efficiency factors fitted to a measured H100 "
    "(pipedec_sim/inputs/profile/roofline.py). Decoder layer, n new rows over c cached, P "
    "weights of w bytes, hidden h: gemm = (t_mem^k + t_flop^k)^(1/k), t_mem = P w / (B "
    "mem_eff), t_flop = 2 P n / (F flop_eff h / (h + h_half)); attention = (c + n) heads a "
    "(w_kv / 2) / B + 4 n (c + n) heads head_dim / (F_bf16 attn_flop_eff), a = attn_bytes "
    "(tree rows) or attn_bytes_single (one row); layer = gemm(P_layer) + attention + "
    "layer_ms. lm_head = gemm(vocab h) + lm_head_ms; draft_step = draft.layers layer_draft "
    "+ lm_head_draft + draft_step_ms; embed = n h w / (B mem_eff) + embed_ms; kv_compact = "
    "L (compact_layer_ms + 4 kv_heads head_dim w_kv c / (B mem_eff)) for the largest "
    "stage's L layers at the longest context c. B = memory bandwidth, F = dense peak "
    "FLOP/s of the weights' dtype. Links per hop: inside a server the intra-server link, "
    "across servers the inter-server one; every transfer pays latency + bytes / line rate."
)


def cluster_profile(*, cluster: Cluster, target: ModelSpec, draft: ModelSpec, dtype: str,
                    efficiency: Efficiency, max_context: int = DEFAULT_MAX_CONTEXT,
                    utilization: float = DEFAULT_UTILIZATION, command: str, name: str,
                    fit_summary: str = "") -> dict:
    """The profile dict (validate it with parse_profile); raises InputError when a GPU
    cannot hold its stage (check_memory) or lacks tensor cores for `dtype`."""
    gpu = cluster.gpu
    plan = memory_plan(cluster, target, draft, dtype, max_context)
    check_memory(cluster, plan, utilization)
    wb = DTYPE_BYTES[dtype]
    bf16 = gpu.tflops.get("bf16") or gpu.peak_tflops(dtype)
    hw = Hardware.of(gpu.mem_bw_gbs, gpu.peak_tflops(dtype), bf16, wb, wb)
    e = efficiency
    ts = TOKENS_AXIS
    cs = tuple(sorted(set(CONTEXT_AXIS) | {max_context}))
    ts_shape, ds_shape = target.shape(wb), draft.shape(wb)   # the roofline's byte counts
    layers = split_layers(target.layers, cluster.stages)
    compact = kv_compact_ms(hw, e, ts_shape, max(layers), max_context)
    intra, inter = cluster.intra, cluster.inter
    sources = [*gpu.sources, f"intra-server link {intra.name}: {intra.source}",
               f"inter-server link {inter.name}: {inter.source}",
               f"target: {target.source}", f"draft: {draft.source}",
               f"efficiency factors '{e.name}' fitted to {e.fitted_to}"
               + (f" ({fit_summary})" if fit_summary else "")
               + " by benchmarks/analytic_fit.py; applied to this GPU unchanged (an assumption "
                 "unless it is an H100)",
               f"kv_compact_ms: compact_layer_ms fitted to one measured prune of a "
               f"{COMPACT_LAYERS}-layer stage at context {COMPACT_CONTEXT} (H100)",
               f"head_overhead_ms {e.head_overhead_ms:g}: the head CPU's time per event "
               "measured with the H100 profiles (a host figure, not the GPU's)"]
    mem = "; ".join(f"{d.device}: {d.total / GIB:.1f} GiB" for d in plan)
    notes = (f"{cluster.describe()}; {dtype} weights and KV cache, activations bf16 between "
             f"stages; layers per stage {layers}; memory per GPU (weights + KV cache for "
             f"{max_context} tokens) {mem} of {gpu.memory_gib:g} GiB x {utilization:g}. "
             f"kv_compact_ms is one prune of the largest stage ({max(layers)} layers) at "
             f"context {max_context}. Not a measurement: calibrate on real hardware "
             "(`pipedec-real profile --target-shape ...`) for absolute numbers.")
    return {
        "schema": SCHEMA,
        "name": name,
        "provenance": {
            "kind": "analytic", "device": cluster.describe(), "date": date.today().isoformat(),
            "command": command, "formula": FORMULA, "sources": sources,
            "versions": {"pipedec-sim": _pkg_version()}, "notes": notes,
            "details": {
                "cluster": {"gpu": gpu.name, "stages": cluster.stages,
                            "servers": cluster.servers,
                            "gpus_per_server": cluster.gpus_per_server,
                            "topology": cluster.topology, "intra_link": intra.name,
                            "inter_link": inter.name, "dtype": dtype,
                            "max_context": max_context,
                            "gpu_memory_utilization": utilization},
                "efficiency": e.to_dict(),
                "memory_gib": {d.device: round(d.total / GIB, 3) for d in plan},
            },
        },
        "target": {**ts_shape.to_dict(), "dtype_bytes": ACTIVATION_BYTES},
        "draft": {**ds_shape.to_dict(), "dtype_bytes": ACTIVATION_BYTES},
        "latency": {
            "layer": {"tokens": list(ts), "context": list(cs),
                      "ms": [[_r(layer_ms(hw, e, ts_shape, n, c)) for c in cs] for n in ts]},
            "draft_step": {"tokens": list(ts), "context": list(cs),
                           "ms": [[_r(draft_step_ms(hw, e, ds_shape, n, c)) for c in cs]
                                  for n in ts]},
            "lm_head": {"tokens": list(ts), "ms": [_r(lm_head_ms(hw, e, ts_shape, n))
                                                   for n in ts]},
            "embed": {"tokens": list(ts), "ms": [_r(embed_ms(hw, e, ts_shape, n)) for n in ts]},
            "kv_compact_ms": _r(compact),
            "head_overhead_ms": e.head_overhead_ms,
        },
        "link": {"latency_ms": inter.latency_ms, "bandwidth_gbps": inter.bandwidth_gbps},
        "devices": {"kind": "gpu", "shared_cores": None},
        "split": layers,
        "servers": {"stage_server": list(cluster.stage_server()),
                    "intra_link": {"latency_ms": intra.latency_ms,
                                   "bandwidth_gbps": intra.bandwidth_gbps}},
    }


def h100_hardware() -> Hardware:
    """The GPU the efficiency factors were fitted on (the measured H100 SXM, bf16)."""
    g = GPUS["h100-sxm"]
    return Hardware.of(g.mem_bw_gbs, g.peak_tflops("bf16"), g.peak_tflops("bf16"), 2, 2)
