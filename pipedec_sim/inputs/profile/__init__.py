"""Calibration profiles: how long each piece of work takes on some hardware.

A profile (JSON, schema ``pipedec-profile/1``) holds latency grids for one target decoder
layer, one whole draft step, the target LM head and embedding, plus a link model and a device
map. The simulator looks durations up in its hot loop, so lookups are plain-Python bisect +
linear interpolation (a few microseconds), and everything is immutable after load.

Optional CPU-host fields (absent in older profiles: then 0, resp. 1, and the simulator
behaves exactly as before), all CPU work on the host's shared cores, measured by
`backends.torch.profiler.measure_stage_overhead`:

  latency.stage_message_ms   CPU ms a stage process spends per batch message outside the
                             compute (wire recv/isend, row decoding, gloo's threads)
  latency.stage_notice_ms    the same per prune notice message (one per head event, however
                             many notices it carries; KV compaction excluded: kv_compact_ms)
  latency.head_event_ms      CPU ms the head spends per event outside the draft and LM head
                             (reader threads, wire, gloo); unlike head_overhead_ms (a delay)
                             it occupies the head's core
  devices.contention_slowdown  how much slower work runs while more processes are runnable
                             than there are cores (cache and memory contention that a
                             time-share table cannot see); 1 = none
  devices.message_contention   how much more CPU a stage spends per message (and notice)
                             while the cores are oversubscribed: a process woken for each
                             message runs cache-cold, and gloo's loop thread competes; 1 = none
  latency.cold_stage_ms, latency.cold_layer_ms
                             extra ms of a stage's batch whose caches the rest of the pipeline
                             evicted since its last batch (the `layer` grid is measured warm,
                             back to back): cold_stage_ms + layers * cold_layer_ms per batch
  latency.cold_lm_head_ms, latency.cold_draft_ms
                             the same for the LM head and for a draft step (0 when absent)

Optional per-hop links (absent in older profiles: `link` is then every hop, as before):

  servers.stage_server       the server of each stage (0-based, ascending; the head is on
                             server 0); a profile with it fits only that stage count
  servers.intra_link         {latency_ms, bandwidth_gbps} between GPUs of one server; `link`
                             is then the link between servers (`Profile.hop_link`)

Optional provenance of a measured profile (validated when present, never used to simulate):
`provenance.host` (the CPU model, vendor, family/model/stepping, ISA flags, core counts and
load average of the machine that measured it; `pipedec_sim.inputs.host` compares it with
this machine's) and `provenance.versions` (torch, transformers, python).

Bad files raise `InputError` naming the file, the JSON line (syntax errors) or the JSON path
(``field``, e.g. ``latency.layer.ms[2][3]``), so the CLIs can print one line and exit 2.
"""
from __future__ import annotations

from .analytic import analytic_profile, constant_profile, layer_params
from .grid import CONTEXT_AXIS, TOKENS_AXIS, Grid1D, Grid2D
from .model import (
                    LLAMA_3_1_70B,
                    LLAMA_3_2_1B,
                    SCHEMA,
                    LinkModel,
                    ModelShape,
                    Profile,
                    split_layers,
)
from .store import (
                    PROFILES_DIR,
                    bundled_profiles,
                    dumps_profile,
                    load_profile,
                    save_profile,
)
from .validate import parse_profile

__all__ = ["CONTEXT_AXIS", "TOKENS_AXIS", "Grid1D", "Grid2D", "LLAMA_3_1_70B", "LLAMA_3_2_1B",
           "LinkModel", "ModelShape", "PROFILES_DIR", "Profile", "SCHEMA", "analytic_profile",
           "bundled_profiles", "constant_profile", "dumps_profile", "layer_params",
           "load_profile", "parse_profile", "save_profile", "split_layers"]
