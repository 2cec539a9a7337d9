"""`pipedec-sim profile`: a calibration profile for your own cluster, without measuring.

    pipedec-sim profile analytic --gpu a100-80gb --target llama-3.1-70b --draft llama-3.2-1b \\
        --servers 4 --gpus-per-server 2 --intra-link nvlink --inter-link 25gbe \\
        --topology B --out a100x8.json
    pipedec-sim profile list          # the GPUs, links and model presets it knows

The profile comes from a roofline model whose efficiency factors were fitted to the measured
H100 profiles (pipedec_sim/inputs/profile/roofline.py; errors per grid point:
benchmarks/analytic_fit.py). A measured profile of your own GPU: `pipedec-real profile
--target-shape ... --draft-shape ...`.
"""
from __future__ import annotations

import shlex
import sys

from pipedec_sim.inputs.hardware import DTYPES, GPUS, LINKS
from pipedec_sim.inputs.model_shapes import PRESETS
from pipedec_sim.inputs.profile.cluster import DEFAULT_MAX_CONTEXT, DEFAULT_UTILIZATION
from pipedec_sim.inputs.profile.roofline import DEFAULT_EFFICIENCY, EFFICIENCY


def add_parser(sub) -> None:
    from pipedec_sim.programs.flags import Parser, file_path, number, positive
    p = sub.add_parser("profile", help="write an analytic calibration profile for a cluster "
                                       "(pipedec-sim profile analytic --help)",
                       description="Calibration profiles without measuring: `analytic` "
                       "models a cluster of catalogue (or described) GPUs running a target "
                       "and a draft of named or config.json shapes; `list` prints what the "
                       "catalogues hold.")
    psub = p.add_subparsers(dest="profile_command", required=True, parser_class=Parser)
    a = psub.add_parser("analytic", help="model a cluster: GPUs, servers, links, models",
                        description="Write a pipedec-profile/1 profile from a roofline model "
                        "of the cluster (efficiency factors fitted to the measured H100 "
                        "profiles), with per-hop links (intra-server inside a server, "
                        "inter-server between servers), the layer split, and a memory check: "
                        "every GPU must hold its weights plus the KV cache of --max-context "
                        "tokens, or the command names the GPU and the shortfall and exits 2.")
    g = a.add_argument_group("hardware")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--gpu", metavar="NAME",
                       help=f"a catalogue GPU: {', '.join(GPUS)} (see `profile list`)")
    which.add_argument("--gpu-spec", type=file_path, metavar="FILE",
                       help='a GPU described in JSON: {"name", "memory_gib", "mem_bw_gbs", '
                            '"tflops": {"bf16": dense TFLOP/s, "fp8": ... or null}, '
                            '"sources": [where each figure comes from]}')
    g.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="weights and KV cache dtype (default bf16; fp8 needs FP8 tensor "
                        "cores); activations between stages stay bf16")
    g.add_argument("--efficiency", choices=tuple(EFFICIENCY), default=DEFAULT_EFFICIENCY,
                   help="fitted factors: kernels (summed kernel time of the measured H100: what "
                        "CUDA graphs approach) or eager (eager PyTorch wall time, host launch "
                        f"overhead included) (default {DEFAULT_EFFICIENCY})")
    g.add_argument("--gpu-memory-utilization", type=number(float, lo=0, lo_open=True, hi=1),
                   default=DEFAULT_UTILIZATION, metavar="F",
                   help="fraction of each GPU's memory for weights and KV cache, the rest for "
                        f"the CUDA context and activations (default {DEFAULT_UTILIZATION}, as "
                        "vLLM)")
    m = a.add_argument_group("models")
    m.add_argument("--target", required=True, metavar="NAME|CONFIG",
                   help=f"target model: a preset ({', '.join(PRESETS)}) or an HF config.json "
                        "(or its folder) (required)")
    m.add_argument("--draft", required=True, metavar="NAME|CONFIG",
                   help="draft model, as --target (required)")
    m.add_argument("--max-context", type=positive(hi=10_000_000), default=DEFAULT_MAX_CONTEXT,
                   metavar="N",
                   help="longest context (prompt + output + speculative rows) the KV caches "
                        "must hold; also the context of the KV compaction cost (default "
                        f"{DEFAULT_MAX_CONTEXT})")
    c = a.add_argument_group("cluster")
    c.add_argument("--stages", type=positive(hi=1024), default=None, metavar="S",
                   help="pipeline stages S (default: every GPU of --servers x "
                        "--gpus-per-server, less one for topology A's head)")
    c.add_argument("--servers", type=positive(hi=1024), default=None, metavar="N",
                   help="servers N (default: as many as the stages need)")
    c.add_argument("--gpus-per-server", type=positive(hi=64), default=1, metavar="G",
                   help="GPUs per server G; stages fill a server before the next (default 1)")
    c.add_argument("--intra-link", default="pcie4", metavar="LINK",
                   help=f"link between GPUs of one server: {', '.join(LINKS)} (default pcie4)")
    c.add_argument("--inter-link", default="10gbe", metavar="LINK",
                   help=f"link between servers: {', '.join(LINKS)} (default 10gbe)")
    c.add_argument("--topology", choices=("A", "B"), default="A",
                   help="A: the head (draft, LM head) has a GPU of its own before stage 1; "
                        "B: the draft shares stage 1's GPU and the last stage runs the LM head "
                        "(default A; run the simulator with the same --topology)")
    o = a.add_argument_group("output")
    o.add_argument("--out", required=True, type=file_path, help="profile JSON to write (required)")
    o.add_argument("--name", default=None,
                   help="the profile's name (default: from the GPU, models and stages)")
    o.add_argument("--quiet", action="store_true", help="no summary on stderr")
    psub.add_parser("list", help="print the GPU, link and model catalogues",
                    description="Print the catalogue GPUs (memory, bandwidth, dense TFLOP/s), "
                    "links (line rate, assumed latency) and model presets.")


def _short(name: str) -> str:
    return name.split("/")[-1].lower().replace("meta-llama-", "llama-")


def command_line(args) -> str:
    """The command, canonical: every setting spelled out."""
    parts = ["pipedec-sim", "profile", "analytic"]
    parts += ["--gpu", args.gpu] if args.gpu else ["--gpu-spec", str(args.gpu_spec)]
    parts += ["--target", args.target, "--draft", args.draft]
    for flag, v in (("--stages", args.stages), ("--servers", args.servers)):
        if v is not None:
            parts += [flag, str(v)]
    parts += ["--gpus-per-server", str(args.gpus_per_server), "--intra-link", args.intra_link,
              "--inter-link", args.inter_link, "--topology", args.topology,
              "--dtype", args.dtype, "--efficiency", args.efficiency,
              "--max-context", str(args.max_context),
              "--gpu-memory-utilization", f"{args.gpu_memory_utilization:g}"]
    if args.name:
        parts += ["--name", args.name]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def fit_summary(efficiency_name: str) -> str:
    """The fitted factors' error on the measured profile they were fitted to."""
    from pipedec_sim.inputs.profile import load_profile
    from pipedec_sim.inputs.profile.cluster import h100_hardware
    from pipedec_sim.inputs.profile.fit import report
    e = EFFICIENCY[efficiency_name]
    measured = e.fitted_to.split(" ", 1)[0]
    rep = report(h100_hardware(), e, load_profile(measured))
    return "error |model/measured - 1| median / worst: " + ", ".join(
        f"{g} {100 * rep.summary(g)[0]:.1f}% / {100 * rep.summary(g)[1]:.1f}%"
        for g in ("layer", "draft_step", "lm_head"))


def build(args) -> dict:
    from pipedec_sim.inputs.hardware import load_gpu_spec, resolve_gpu, resolve_link
    from pipedec_sim.inputs.model_shapes import resolve_model
    from pipedec_sim.inputs.profile.cluster import cluster_profile, plan_cluster
    gpu = load_gpu_spec(args.gpu_spec) if args.gpu_spec else resolve_gpu(args.gpu)
    gpu.peak_tflops(args.dtype)                              # fp8 on a GPU without it: exit 2
    target = resolve_model(args.target, flag="--target")
    draft = resolve_model(args.draft, flag="--draft")
    from pipedec_sim.errors import InputError
    if target.vocab != draft.vocab:
        raise InputError(f"draft vocab {draft.vocab} differs from target vocab {target.vocab}: "
                         "they must share a tokenizer", field="--draft")
    cluster = plan_cluster(gpu, stages=args.stages, servers=args.servers,
                           gpus_per_server=args.gpus_per_server, topology=args.topology,
                           intra=resolve_link(args.intra_link, "--intra-link"),
                           inter=resolve_link(args.inter_link, "--inter-link"))
    if cluster.stages > target.layers:
        raise InputError(f"{cluster.stages} stages but {target.name} has only {target.layers} "
                         "layers", field="--stages")
    name = args.name or (f"analytic-{gpu.name}x{cluster.servers * cluster.gpus_per_server}-"
                         f"{_short(target.name)}-{_short(draft.name)}-s{cluster.stages}")
    return cluster_profile(cluster=cluster, target=target, draft=draft, dtype=args.dtype,
                           efficiency=EFFICIENCY[args.efficiency], max_context=args.max_context,
                           utilization=args.gpu_memory_utilization, command=command_line(args),
                           name=name, fit_summary=fit_summary(args.efficiency))


def cmd_list() -> int:
    print("GPUs (dense peak tensor TFLOP/s; sources: pipedec_sim/inputs/hardware.py):")
    for g in GPUS.values():
        print(f"  {g.name:<10} {g.describe()}")
    print("links (line rate per direction; latencies assumed):")
    for x in LINKS.values():
        print(f"  {x.name:<10} {x.label}: {x.bandwidth_gbps:g} Gbit/s, {x.latency_ms:g} ms")
    print("model presets (from their config.json; or pass a config.json path):")
    for m in PRESETS.values():
        print(f"  {m.name.split('/')[-1].lower():<14} {m.name}: {m.layers} layers, hidden "
              f"{m.hidden}, heads {m.heads}/{m.kv_heads} KV, intermediate {m.intermediate}, "
              f"vocab {m.vocab}{', tied head' if m.tied else ''}, {m.params / 1e9:.2f}B params")
    return 0


def cmd_profile(args) -> int:
    if args.profile_command == "list":
        return cmd_list()
    from pipedec_sim.atomic import check_output
    from pipedec_sim.inputs.profile import parse_profile, save_profile
    check_output(args.out, "--out")
    data = build(args)
    prof = parse_profile(data)                    # never write what we could not load back
    save_profile(data, args.out)
    if not args.quiet:
        mem = data["provenance"]["details"]["memory_gib"]
        print(f"wrote {args.out}: {prof.provenance['device']}; layers per stage "
              f"{list(prof.split or ())}; memory per GPU (GiB) "
              + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()), file=sys.stderr)
        print(f"simulate it: pipedec-sim run --profile {args.out} --stages "
              f"{len(prof.split or ())} --topology {args.topology} --trace ...",
              file=sys.stderr)
    return 0
