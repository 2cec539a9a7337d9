"""The hardware catalogue for analytic profiles: GPUs and the links between them.

Every GPU figure names its source: the vendor's datasheet or architecture whitepaper and
the figure as printed there. FLOP/s are *dense* peak tensor-core rates (no 2:4 structured
sparsity); where a datasheet prints only the sparse figure, the dense one is half of it and
the source says so. Memory is the vendor's capacity (those "GB" are binary: an 80 GB A100
reports 81920 MiB); memory bandwidth is in GB/s (1e9 bytes/s). A GPU that is not listed is
described in a JSON file (`load_gpu_spec`, `pipedec-sim profile analytic --gpu-spec`).

Links are line rates in Gbit/s per direction (what one hop can carry at best); their
per-message latencies are assumptions, not measurements, and say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.files import FilePath, load_json, read_text, short

DTYPES = ("bf16", "fp8")                 # weight dtypes the analytic model knows
DTYPE_BYTES = {"bf16": 2, "fp8": 1}


@dataclass(frozen=True)
class GPU:
    """One accelerator: capacity, bandwidth and dense peak tensor FLOP/s per dtype."""

    name: str                            # catalogue key, e.g. "a100-80gb"
    label: str                           # what the vendor calls it
    memory_gib: float
    mem_bw_gbs: float                    # GB/s = 1e9 bytes/s
    tflops: dict[str, float | None]      # dense peak per dtype; None: not supported
    sources: tuple[str, ...] = field(default=())

    def peak_tflops(self, dtype: str) -> float:
        """Dense peak TFLOP/s for `dtype`; InputError if this GPU has no such tensor cores."""
        v = self.tflops.get(dtype)
        if v is None:
            have = ", ".join(k for k, x in self.tflops.items() if x) or "none"
            raise InputError(f"{self.label} has no {dtype} tensor cores (it has: {have})",
                             field="--dtype")
        return float(v)

    def describe(self) -> str:
        rates = ", ".join(f"{k} {v:g}" for k, v in self.tflops.items() if v)
        return (f"{self.label}: {self.memory_gib:g} GiB, {self.mem_bw_gbs:g} GB/s, "
                f"dense TFLOP/s {rates}")


def _gpu(name: str, label: str, memory_gib: float, mem_bw_gbs: float, bf16: float,
         fp8: float | None, *sources: str) -> GPU:
    return GPU(name, label, memory_gib, mem_bw_gbs, {"bf16": bf16, "fp8": fp8}, sources)


GPUS: dict[str, GPU] = {g.name: g for g in (
    _gpu("a100-40gb", "NVIDIA A100 40GB SXM4", 40, 1555, 312, None,
         "NVIDIA A100 Tensor Core GPU datasheet (2021): A100 40GB SXM: 40GB HBM2 at "
         "1,555 GB/s; BFLOAT16 Tensor Core 312 TFLOPS (624 with sparsity: dense = 312)",
         "Ampere has no FP8 tensor cores"),
    _gpu("a100-80gb", "NVIDIA A100 80GB SXM4", 80, 2039, 312, None,
         "NVIDIA A100 Tensor Core GPU datasheet (2021): A100 80GB SXM: 80GB HBM2e at "
         "2,039 GB/s (the PCIe card: 1,935 GB/s); BFLOAT16 Tensor Core 312 TFLOPS "
         "(624 with sparsity: dense = 312)",
         "Ampere has no FP8 tensor cores"),
    _gpu("h100-sxm", "NVIDIA H100 SXM5 80GB", 80, 3350, 989.4, 1978.9,
         "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM: 80GB HBM3 at 3.35 TB/s; "
         "BFLOAT16 Tensor Core 1,979 TFLOPS and FP8 3,958 TFLOPS, both 'with sparsity' "
         "(dense: half, 989.4 and 1978.9 as in the Hopper architecture whitepaper's "
         "table)"),
    _gpu("h100-pcie", "NVIDIA H100 PCIe 80GB", 80, 2000, 756.0, 1513.0,
         "NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe: 80GB HBM2e at 2 TB/s; "
         "BFLOAT16 Tensor Core 1,513 TFLOPS and FP8 3,026 TFLOPS, both 'with sparsity' "
         "(dense: half, 756 and 1513)"),
    _gpu("h200", "NVIDIA H200 SXM 141GB", 141, 4800, 989.4, 1978.9,
         "NVIDIA H200 Tensor Core GPU datasheet: H200 SXM: 141GB HBM3e at 4.8 TB/s; "
         "BFLOAT16 Tensor Core 1,979 TFLOPS and FP8 3,958 TFLOPS 'with sparsity' "
         "(dense: half, the same tensor cores as H100 SXM)"),
    _gpu("l40s", "NVIDIA L40S 48GB", 48, 864, 362.05, 733.0,
         "NVIDIA L40S datasheet: 48GB GDDR6 with ECC at 864 GB/s; BFLOAT16 Tensor Core "
         "362.05 TFLOPS dense (733 with sparsity); FP8 Tensor Core 733 TFLOPS dense "
         "(1,466 with sparsity)"),
    _gpu("l4", "NVIDIA L4 24GB", 24, 300, 121.0, 242.5,
         "NVIDIA L4 Tensor Core GPU datasheet: 24GB GDDR6 at 300 GB/s; BFLOAT16 Tensor "
         "Core 242 TFLOPS and FP8 485 TFLOPS, both 'with sparsity' (dense: half, 121 and "
         "242.5)"),
    _gpu("rtx-3090", "NVIDIA GeForce RTX 3090 24GB", 24, 936, 71.0, None,
         "NVIDIA Ampere GA102 GPU architecture whitepaper, appendix table (RTX 3090): "
         "24GB GDDR6X at 936 GB/s; Peak BF16 Tensor TFLOPS with FP32 Accumulate 71 dense "
         "(142 with sparsity); GeForce cards run FP32-accumulate at half the FP16-"
         "accumulate rate",
         "Ampere has no FP8 tensor cores"),
    _gpu("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", 24, 1008, 165.2, 330.3,
         "NVIDIA Ada Lovelace GPU architecture whitepaper, appendix table (RTX 4090): "
         "24GB GDDR6X at 1008 GB/s; Peak BF16 Tensor TFLOPS with FP32 Accumulate 165.2 "
         "dense (330.4 with sparsity)",
         "FP8: the same table's Peak FP8 Tensor TFLOPS with FP32 Accumulate, 330.3 dense "
         "(660.6 with sparsity), as recalled from the whitepaper, not re-checked: verify "
         "before relying on fp8 figures for this card"),
    _gpu("mi300x", "AMD Instinct MI300X 192GB", 192, 5300, 1307.4, 2614.9,
         "AMD Instinct MI300X accelerator data sheet: 192 GB HBM3 at 5.3 TB/s; peak BF16 "
         "1307.4 TFLOPS dense (2614.9 with structured sparsity); peak FP8 2614.9 TFLOPS "
         "dense (5229.8 with sparsity)",
         "the efficiency factors are fitted on an NVIDIA H100 with PyTorch's CUDA kernels; "
         "ROCm kernels may reach other fractions of these peaks"),
)}

GPU_ALIASES = {"a100": "a100-80gb", "a100-40g": "a100-40gb", "a100-80g": "a100-80gb",
               "h100": "h100-sxm", "h100-80gb": "h100-sxm", "3090": "rtx-3090",
               "4090": "rtx-4090", "rtx3090": "rtx-3090", "rtx4090": "rtx-4090",
               "h200-141gb": "h200"}


def gpu_names() -> str:
    return ", ".join(GPUS)


def resolve_gpu(name: str) -> GPU:
    """A catalogue GPU by name (case-insensitive; a few aliases); InputError listing them."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = GPU_ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    raise InputError(f"unknown GPU {name!r} (known: {gpu_names()}; describe another one in "
                     "a JSON file for --gpu-spec)", field="--gpu")


GPU_SPEC_KEYS = ("name", "memory_gib", "mem_bw_gbs", "tflops", "sources", "label")
# Each rating's bounds, far beyond any real device both ways (today's: tens to a few
# hundred GiB, 1-10 TB/s, 10-5000 TFLOP/s): the roofline raises them to powers, so an
# absurd value would overflow it, not just give absurd times.
GPU_SPEC_RANGE = {"memory_gib": (1e-3, 1e6), "mem_bw_gbs": (1e-3, 1e7), "tflops": (1e-3, 1e6)}


def parse_gpu_spec(d: Any, *, file: FilePath | None = None) -> GPU:
    """A GPU described in JSON: {"name", "memory_gib", "mem_bw_gbs", "tflops": {"bf16": x,
    "fp8": y or null}, "sources": [...]} ("label" optional). Every figure needs a source."""
    if not isinstance(d, dict):
        raise InputError("a GPU spec must be a JSON object", file=file)
    unknown = sorted(set(d) - set(GPU_SPEC_KEYS))
    if unknown:
        raise InputError(f"unknown key (known: {', '.join(GPU_SPEC_KEYS)})", file=file,
                         field=unknown[0])
    for key in ("name", "memory_gib", "mem_bw_gbs", "tflops", "sources"):
        if key not in d:
            raise InputError("missing required key", file=file, field=key)
    name = d["name"]
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"expected a non-empty string, got {short(name)}", file=file,
                         field="name")
    label = d.get("label", name)
    if not isinstance(label, str) or not label.strip():
        raise InputError(f"expected a non-empty string, got {short(label)}", file=file,
                         field="label")

    def positive(v: Any, where: str) -> float:
        lo, hi = GPU_SPEC_RANGE[where.split(".")[0]]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not lo <= v <= hi:
            raise InputError(f"expected a number in [{lo:g}, {hi:g}], got {short(v)}",
                             file=file, field=where)
        return float(v)

    tf = d["tflops"]
    if not isinstance(tf, dict) or not tf:
        raise InputError("expected an object of dense peak TFLOP/s per dtype, e.g. "
                         '{"bf16": 312, "fp8": null}', file=file, field="tflops")
    rates: dict[str, float | None] = {}
    for k, v in tf.items():
        if k not in DTYPES:
            raise InputError(f"unknown dtype (known: {', '.join(DTYPES)})", file=file,
                             field=f"tflops.{k}")
        rates[k] = None if v is None else positive(v, f"tflops.{k}")
    if not any(rates.values()):
        raise InputError("needs at least one dtype with a rate", file=file, field="tflops")
    src = d["sources"]
    if not isinstance(src, list) or not src or not all(isinstance(s, str) and s.strip()
                                                        for s in src):
        raise InputError("expected a non-empty list of strings: where each figure comes "
                         "from", file=file, field="sources")
    return GPU(name.strip(), label.strip(), positive(d["memory_gib"], "memory_gib"),
               positive(d["mem_bw_gbs"], "mem_bw_gbs"), rates, tuple(src))


def load_gpu_spec(path: FilePath) -> GPU:
    return parse_gpu_spec(load_json(read_text(path), file=path), file=path)


# --------------------------------------------------------------------------- links

@dataclass(frozen=True)
class Link:
    """One hop's line rate (Gbit/s per direction) and per-message latency (ms)."""

    name: str
    label: str
    bandwidth_gbps: float
    latency_ms: float
    source: str


LATENCY_NOTE = ("latency assumed (a small message through NCCL or sockets), not measured")

LINKS: dict[str, Link] = {x.name: x for x in (
    Link("nvlink", "NVLink 3 (A100 generation)", 2400.0, 0.01,
         "NVIDIA A100 datasheet: NVLink 600 GB/s GPU-to-GPU, both directions together: "
         "300 GB/s = 2400 Gbit/s each way; " + LATENCY_NOTE),
    Link("nvlink4", "NVLink 4 (H100 generation)", 3600.0, 0.01,
         "NVIDIA H100 datasheet: NVLink 900 GB/s, both directions together: 450 GB/s = "
         "3600 Gbit/s each way; " + LATENCY_NOTE),
    Link("pcie3", "PCIe 3.0 x16", 126.0, 0.015,
         "PCI-SIG PCIe 3.0: 8 GT/s per lane, 128b/130b: 15.75 GB/s per direction at x16; "
         + LATENCY_NOTE),
    Link("pcie4", "PCIe 4.0 x16", 252.0, 0.015,
         "PCI-SIG PCIe 4.0: 16 GT/s per lane, 128b/130b: 31.5 GB/s per direction at x16; "
         + LATENCY_NOTE),
    Link("pcie5", "PCIe 5.0 x16", 504.0, 0.015,
         "PCI-SIG PCIe 5.0: 32 GT/s per lane, 128b/130b: 63 GB/s per direction at x16; "
         + LATENCY_NOTE),
    Link("10gbe", "10 Gigabit Ethernet", 10.0, 0.05,
         "IEEE 802.3 10GBASE-T: 10 Gbit/s line rate; latency as the bundled "
         "analytic-llama70b-1b profile (assumed)"),
    Link("25gbe", "25 Gigabit Ethernet", 25.0, 0.03,
         "IEEE 802.3by 25GBASE-R: 25 Gbit/s line rate; " + LATENCY_NOTE),
    Link("40gbe", "40 Gigabit Ethernet", 40.0, 0.02,
         "IEEE 802.3ba 40GBASE-R: 40 Gbit/s line rate; " + LATENCY_NOTE),
    Link("100gbe", "100 Gigabit Ethernet", 100.0, 0.01,
         "IEEE 802.3ba/bj 100GBASE: 100 Gbit/s line rate; latency as the bundled "
         "analytic-llama70b-1b-100gbe profile (assumed)"),
    Link("200gbe", "200 Gigabit Ethernet", 200.0, 0.01,
         "IEEE 802.3bs 200GBASE: 200 Gbit/s line rate; " + LATENCY_NOTE),
    Link("ib-hdr", "InfiniBand HDR", 200.0, 0.01,
         "InfiniBand Trade Association HDR: 200 Gbit/s per 4x port; " + LATENCY_NOTE),
    Link("ib-ndr", "InfiniBand NDR", 400.0, 0.01,
         "InfiniBand Trade Association NDR: 400 Gbit/s per 4x port; " + LATENCY_NOTE),
)}

LINK_ALIASES = {"nvlink3": "nvlink", "pcie": "pcie4", "10g": "10gbe", "25g": "25gbe",
                "40g": "40gbe", "100g": "100gbe", "200g": "200gbe", "ib": "ib-ndr",
                "infiniband": "ib-ndr", "hdr": "ib-hdr", "ndr": "ib-ndr"}


def link_names() -> str:
    return ", ".join(LINKS)


def resolve_link(name: str, flag: str) -> Link:
    """A catalogue link by name (case-insensitive); InputError naming `flag` and the list."""
    key = name.strip().lower().replace("_", "-")
    key = LINK_ALIASES.get(key, key)
    if key in LINKS:
        return LINKS[key]
    raise InputError(f"unknown link {name!r} (known: {link_names()})", field=flag)
