"""The calibration profile: model shapes, the link, the layer split, and `Profile`."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from ...errors import InputError
from .checks import check_bandwidth, check_number
from .grid import Grid1D, Grid2D

SCHEMA = "pipedec-profile/1"
# How one step over several requests' rows is priced (Profile.batch_layer, `batching`):
# "sequential" one forward per request, "requests" one forward whose attention is each
# request's own (varlen / paged kernels; the torch backend's serving), "flat" one forward
# whose rows attend as one sequence over their mean context.
BATCHING = ("sequential", "requests", "flat")
DEFAULT_BATCHING = "requests"
SCHEMA_PREFIX = "pipedec-profile/"
SCHEMA_MAJOR = 1
CORE_SHARING = ("ps", "fifo")
CPU_FIELDS = ("stage_message_ms", "stage_notice_ms", "head_event_ms")   # in "latency"
DEVICE_FIELDS = ("contention_slowdown", "message_contention")            # in "devices"
# Compute whose caches other work evicted since it last ran (in "latency"; CPU hosts): a
# stage's batch costs cold_stage_ms + layers * cold_layer_ms more than the warm `layer`
# grid says, the LM head cold_lm_head_ms more, a draft step cold_draft_ms more.
COLD_FIELDS = ("cold_stage_ms", "cold_layer_ms", "cold_lm_head_ms", "cold_draft_ms")


@dataclass(frozen=True)
class BatchPoint:
    """One measured batched forward ("latency.batch", optional): a decoder layer of the
    target over B requests' rows at once, request b with rows[b] new rows over its own
    context[b] cached rows (`backends.torch.batch.forward_requests`: the weights once,
    attention per request); ms per layer, like the `layer` grid."""

    rows: tuple[int, ...]
    context: tuple[int, ...]
    ms: float

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:
        """(rows, context) per request: what `Profile.batch_layer` takes."""
        return tuple(zip(self.rows, self.context))

    def to_dict(self) -> dict:
        return {"rows": list(self.rows), "context": list(self.context), "ms": self.ms}


@dataclass(frozen=True)
class BatchError:
    """`Profile.batch_layer` at a measured `BatchPoint`: model_ms, and error = model_ms /
    measured - 1 (signed: > 0 the model overestimates)."""

    point: BatchPoint
    model_ms: float

    @property
    def error(self) -> float:
        return self.model_ms / self.point.ms - 1.0


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LLAMA_3_1_70B = ModelShape("meta-llama/Llama-3.1-70B", layers=80, hidden=8192, heads=64,
                           kv_heads=8, intermediate=28672, vocab=128256, dtype_bytes=2)
LLAMA_3_2_1B = ModelShape("meta-llama/Llama-3.2-1B", layers=16, hidden=2048, heads=32,
                          kv_heads=8, intermediate=8192, vocab=128256, dtype_bytes=2)


@dataclass(frozen=True)
class LinkModel:
    """One hop between neighbouring devices. bandwidth_gbps is in gigaBITs/s; inf = ideal."""

    latency_ms: float
    bandwidth_gbps: float

    def transfer_ms(self, nbytes: float) -> float:
        """Serialisation time only; add `latency_ms` once per message yourself."""
        return nbytes * 8e-6 / self.bandwidth_gbps  # bits / (Gbit/s) -> ms

    def to_dict(self) -> dict:
        bw = None if math.isinf(self.bandwidth_gbps) else self.bandwidth_gbps
        return {"latency_ms": self.latency_ms, "bandwidth_gbps": bw}


def split_layers(n_layers: int, stages: int) -> list[int]:
    """Contiguous layers per stage, as vLLM's get_pp_indices does.

    Each stage gets n // S; the remainder goes one each to the stages just before the last
    (the last also runs the final norm + LM head, so it is kept light).
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise InputError(f"must be a positive integer, got {stages!r}", field="stages")
    if stages > n_layers:
        raise InputError(f"{stages} stages but the target has only {n_layers} layers",
                         field="stages")
    parts = [n_layers // stages] * stages
    for i in range(2, n_layers % stages + 2):
        parts[-i] += 1
    return parts


@dataclass(frozen=True)
class Profile:
    name: str
    provenance: dict
    target: ModelShape
    draft: ModelShape
    layer: Grid2D
    draft_step: Grid2D
    lm_head: Grid1D
    embed: Grid1D
    kv_compact_ms: float
    head_overhead_ms: float
    link: LinkModel
    device_kind: str
    shared_cores: int | None
    split: tuple[int, ...] | None
    source: str | None = field(default=None, compare=False)
    # How processes share `shared_cores`: "ps" (processor sharing: n runnable processes
    # each progress at min(1, cores/n), as OS time-slicing does) or "fifo" (a process
    # holds a whole core until its work is done; others queue).
    core_sharing: str = "ps"
    # Measured share of a core each of n busy processes got (n = 1, 2, ...) while the
    # profile was measured: captures foreign load (other users' processes) too. None:
    # min(1, shared_cores / n), an otherwise idle machine.
    core_share: tuple[float, ...] | None = None
    # Optional CPU-host costs (module docstring); the defaults model nothing extra.
    stage_message_ms: float = 0.0
    stage_notice_ms: float = 0.0
    head_event_ms: float = 0.0
    contention_slowdown: float = 1.0
    message_contention: float = 1.0
    # Optional cold-cache extras (COLD_FIELDS); 0: compute as warm as the grids measured it.
    cold_stage_ms: float = 0.0
    cold_layer_ms: float = 0.0
    cold_lm_head_ms: float = 0.0
    cold_draft_ms: float = 0.0
    # Optional per-hop links ("servers" in the file): the server each stage runs on (the
    # head is on server 0) and the link between GPUs of one server; `link` is then the link
    # between servers. None: `link` is every hop, as in older profiles.
    stage_server: tuple[int, ...] | None = None
    intra_link: LinkModel | None = None
    # Optional measured batched forwards ("latency.batch"): what `batch_error` checks
    # `batch_layer` against; () in older profiles. Never used to simulate.
    batch: tuple[BatchPoint, ...] = ()
    # How a step over several requests' rows is priced (`batch_layer`, BATCHING):
    # "latency.batching" in the file; absent: DEFAULT_BATCHING, what the torch backend's
    # serving does (`backends.torch.batch`).
    batching: str = DEFAULT_BATCHING

    __hash__ = None  # type: ignore[assignment]  # provenance is a dict

    @property
    def host(self) -> dict:
        """The machine a measured profile was measured on (`provenance.host`: cpu_model,
        cpu_vendor, cpu_id, isa, cpu_count, affinity_cores, machine, load_average,
        description; all optional), {} where the profile does not say."""
        return dict(self.provenance.get("host") or {})

    def stage_layers(self, stages: int) -> list[int]:
        """Layers per stage; InputError if the profile's split or server placement is for
        another stage count."""
        if self.stage_server is not None:
            self.stage_servers(stages)
        if self.split is None:
            return split_layers(self.target.layers, stages)
        if len(self.split) != stages:
            raise InputError(f"profile splits the target over {len(self.split)} stages, "
                             f"but {stages} were asked for", file=self.source, field="split")
        return list(self.split)

    def check_topology(self, topology: str, field: str = "--topology") -> None:
        """InputError if the profile was made for the other topology: an analytic profile
        placed the head (and so its links and memory) for the one it records."""
        details = self.provenance.get("details")
        cluster = details.get("cluster") if isinstance(details, dict) else None
        made = cluster.get("topology") if isinstance(cluster, dict) else None
        if made in ("A", "B") and made != topology:
            raise InputError(f"the profile was made for topology {made} (its GPU placement, "
                             f"links and memory check), not {topology}: run with --topology "
                             f"{made}, or remake it with --topology {topology}",
                             file=self.source, field=field)

    def stage_servers(self, stages: int) -> tuple[int, ...]:
        """The server of each stage (the head's is 0); all 0 without per-hop links."""
        if self.stage_server is None:
            return (0,) * stages
        if len(self.stage_server) != stages:
            raise InputError(f"profile places {len(self.stage_server)} stages on servers, "
                             f"but {stages} were asked for", file=self.source,
                             field="servers.stage_server")
        return self.stage_server

    def hop_link(self, j: int, stages: int) -> LinkModel:
        """The link of hop j of the ring: 0 is head -> stage 1, j (0 < j < S) is stage j ->
        stage j+1, S is stage S -> head. Inside one server the intra-server link, else
        `link`; without per-hop links always `link` (older profiles: unchanged)."""
        if self.stage_server is None or self.intra_link is None:
            return self.link
        srv = self.stage_servers(stages)
        a = 0 if j == 0 else srv[j - 1]
        b = 0 if j == stages else srv[j]
        return self.intra_link if a == b else self.link

    def head_link(self, j: int, stages: int) -> LinkModel:
        """The link between the head and stage j (broadcast prune notices, stage 1's acks)."""
        if self.stage_server is None or self.intra_link is None:
            return self.link
        return self.intra_link if self.stage_servers(stages)[j - 1] == 0 else self.link

    def batch_layer(self, parts) -> float:
        """One decoder layer over a step whose rows come from several requests; `parts` is
        (rows, context) per request. `batching` says how (BATCHING): "sequential", one
        forward per request (the sum of their grid values); "requests", one forward: the
        weights' work shared by every row (the grid at the total rows over no context)
        plus each request's own attention (what its rows over its context add to the
        grid, layer(n, c) - layer(n, 0)); "flat", one forward whose rows attend as one
        sequence over their row-weighted mean context (the same attention arithmetic, the
        measured kernels' per-request overheads paid once, as a paged-attention kernel).
        One request: `layer(n, c)` itself, whatever the mode."""
        return _batched(self.layer, parts, self.batching)

    def batch_draft(self, parts) -> float:
        """One draft pass over several requests' rows: `batch_layer`'s model."""
        return _batched(self.draft_step, parts, self.batching)

    def with_batching(self, mode: str | None) -> Profile:
        """The profile with `batching` set (None: as it is)."""
        if mode is None:
            return self
        if mode not in BATCHING:
            raise InputError(f"must be one of {', '.join(BATCHING)}, got {mode!r}",
                             field="--batching")
        return dataclasses.replace(self, batching=mode)

    def batch_error(self) -> tuple[BatchError, ...]:
        """`batch_layer` against each measured batched forward (`batch`): the model's
        value and its relative error per point; () where the profile measured none. The
        torch backend's batched forward shares the weight work and gives each request
        attention over its own KV only, as the default model ("requests") assumes; so
        there the error is the formula's own (per-request kernel overheads, the grid's
        interpolation)."""
        return tuple(BatchError(pt, self.batch_layer(pt.parts)) for pt in self.batch)

    def hidden_bytes(self, rows: int) -> int:
        return rows * self.target.hidden * self.target.dtype_bytes

    def with_link(self, *, bandwidth_gbps: float | None = None,
                  latency_ms: float | None = None) -> Profile:
        """The profile with `link` changed (with per-hop links: the link between servers;
        hops inside a server keep theirs)."""
        bw = self.link.bandwidth_gbps if bandwidth_gbps is None else bandwidth_gbps
        lat = self.link.latency_ms if latency_ms is None else latency_ms
        check_bandwidth(bw, "bandwidth_gbps", None)
        check_number(lat, "latency_ms", None)
        return dataclasses.replace(self, link=LinkModel(float(lat), float(bw)))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "provenance": json.loads(json.dumps(self.provenance)),  # deep copy
            "target": self.target.to_dict(),
            "draft": self.draft.to_dict(),
            "latency": {
                "layer": self.layer.to_dict(),
                "draft_step": self.draft_step.to_dict(),
                "lm_head": self.lm_head.to_dict(),
                "embed": self.embed.to_dict(),
                "kv_compact_ms": self.kv_compact_ms,
                "head_overhead_ms": self.head_overhead_ms,
                **{k: getattr(self, k) for k in CPU_FIELDS + COLD_FIELDS if getattr(self, k)},
                **({"batch": [pt.to_dict() for pt in self.batch]} if self.batch else {}),
                **({"batching": self.batching} if self.batching != DEFAULT_BATCHING else {}),
            },
            "link": self.link.to_dict(),
            "devices": {"kind": self.device_kind, "shared_cores": self.shared_cores,
                        **({"core_sharing": self.core_sharing}
                           if self.core_sharing != "ps" else {}),
                        **({"core_share": list(self.core_share)}
                           if self.core_share else {}),
                        **{k: getattr(self, k) for k in DEVICE_FIELDS
                           if getattr(self, k) != 1.0}},
            "split": None if self.split is None else list(self.split),
            **({"servers": {"stage_server": list(self.stage_server),
                            "intra_link": self.intra_link.to_dict()}}
               if self.stage_server is not None and self.intra_link is not None else {}),
        }


# --------------------------------------------------------------------------- validation


def _batched(grid, parts, batching: str) -> float:
    if len(parts) == 1:
        n, c = parts[0]
        return grid(n, c)
    if batching == "sequential":
        return sum(grid(n, c) for n, c in parts)
    total = sum(n for n, _ in parts)
    if batching == "flat":
        return grid(total, sum(n * c for n, c in parts) / total)
    return grid(total, 0) + sum(grid(n, c) - grid(n, 0) for n, c in parts)
