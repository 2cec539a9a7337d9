"""Calibration profiles: interpolation, layer splits, analytic numbers, load/validate/save."""
from __future__ import annotations

import copy
import json
import math
import os

import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs import profile as cal
from pipedec_sim.inputs.profile import (
    LLAMA_3_1_70B,
    SCHEMA,
    Grid1D,
    Grid2D,
    LinkModel,
    Profile,
    analytic_profile,
    bundled_profiles,
    constant_profile,
    layer_params,
    load_profile,
    parse_profile,
    save_profile,
    split_layers,
)


@pytest.fixture(scope="module")
def analytic() -> dict:
    return analytic_profile()


def write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------- interpolation

G2 = Grid2D([1, 3], [0, 10], [[1.0, 2.0], [5.0, 10.0]])


def test_grid2d_exact_at_points():
    assert [G2(t, c) for t in (1, 3) for c in (0, 10)] == [1.0, 2.0, 5.0, 10.0]


def test_grid2d_bilinear_between():
    assert G2(2, 0) == pytest.approx(3.0)
    assert G2(1, 5) == pytest.approx(1.5)
    assert G2(2, 5) == pytest.approx((1 + 2 + 5 + 10) / 4)


def test_grid2d_linear_extrapolation_and_floor():
    assert G2(5, 0) == pytest.approx(9.0)      # slope 2 per token on the end segment
    assert G2(1, 20) == pytest.approx(3.0)     # slope 0.1 per context row
    assert G2(5, 20) == pytest.approx(27.0)    # both axes: bilinear form continued
    assert G2(-10, 0) == 0.0                   # would be -21: clamped, never negative


def test_grid2d_single_point_axes():
    g = Grid2D([4], [0, 100], [[1.0, 3.0]])
    assert g(1, 50) == g(999, 50) == pytest.approx(2.0)
    assert Grid2D([1], [0], [[7.0]])(123, 4567) == 7.0


def test_grid1d():
    g = Grid1D([1, 2, 4], [1.0, 2.0, 2.0])
    assert [g(1), g(2), g(4)] == [1.0, 2.0, 2.0]
    assert g(1.5) == pytest.approx(1.5)
    assert g(3) == pytest.approx(2.0)
    assert g(10) == pytest.approx(2.0)         # flat end segment stays flat
    assert g(0) == pytest.approx(0.0) and g(-5) == 0.0
    assert Grid1D([8], [3.0])(1000) == 3.0


def test_link_transfer():
    link = LinkModel(latency_ms=0.05, bandwidth_gbps=10.0)
    assert link.transfer_ms(1_250_000) == pytest.approx(1.0)   # 10 Mbit at 10 Gbit/s
    assert LinkModel(0.0, math.inf).transfer_ms(10**9) == 0.0


# ----------------------------------------------------------------------- splits

def test_split_layers_vllm_rule():
    parts = split_layers(80, 14)
    assert sum(parts) == 80 and len(parts) == 14
    assert parts == [5, 5, 5] + [6] * 10 + [5]   # remainder on the stages before the last
    assert split_layers(22, 4) == [5, 6, 6, 5]
    assert split_layers(80, 8) == [10] * 8
    assert split_layers(3, 3) == [1, 1, 1]


@pytest.mark.parametrize("stages", [81, 0, -1])
def test_split_layers_bad_stages(stages):
    with pytest.raises(InputError) as e:
        split_layers(80, stages)
    assert e.value.field == "stages"


def test_stage_layers_override(analytic, tmp_path):
    data = copy.deepcopy(analytic)
    data["split"] = [40, 40]
    p = load_profile(write(tmp_path, data))
    assert p.stage_layers(2) == [40, 40]
    with pytest.raises(InputError, match="split"):
        p.stage_layers(3)
    assert parse_profile(analytic).stage_layers(14) == split_layers(80, 14)


# ----------------------------------------------------------------------- analytic model

def test_analytic_70b_decode_layer(analytic):
    p = load_profile("analytic-llama70b-1b")
    params = 2 * 8192**2 + 2 * 8192 * 8 * 128 + 3 * 8192 * 28672
    assert layer_params(LLAMA_3_1_70B) == params
    nbytes = params * 2 + 2 * 8 * 128 * 2 * 1              # weights + one new KV row
    expect = nbytes / (1008e9 * 0.8) * 1e3 + 0.03          # memory-bound at 1 token
    assert 2.0 < expect < 2.2 and 1.6e9 < nbytes < 1.8e9
    assert p.layer(1, 0) == pytest.approx(expect, abs=1e-6)
    assert analytic["latency"]["layer"]["ms"][0][0] == pytest.approx(expect, abs=1e-6)


def test_analytic_compute_bound_and_monotone(analytic):
    p = parse_profile(analytic)
    n, c = 2048, 8192
    params = layer_params(LLAMA_3_1_70B)
    flops = 2 * params * n + 4 * n * (c + n) * 64 * 128
    assert p.layer(n, c) == pytest.approx(flops / (165e12 * 0.6) * 1e3 + 0.03, abs=1e-6)
    for grid in (p.layer, p.draft_step):
        for row in grid.ms:
            assert list(row) == sorted(row)
        for col in zip(*grid.ms):
            assert list(col) == sorted(col)
    assert p.draft_step(1, 0) < p.layer(1, 0) * 2   # a 1B step costs ~2 70B layers


def test_bundled_profiles_load_and_match_generator(analytic):
    names = bundled_profiles()
    assert {"analytic-llama70b-1b", "analytic-llama70b-1b-100gbe"} <= set(names)
    p10, p100 = load_profile("analytic-llama70b-1b"), load_profile("analytic-llama70b-1b-100gbe")
    assert p10.provenance["kind"] == "analytic" and p10.provenance["formula"]
    assert (p10.link.bandwidth_gbps, p10.link.latency_ms) == (10.0, 0.05)
    assert (p100.link.bandwidth_gbps, p100.link.latency_ms) == (100.0, 0.01)
    assert p10.layer == p100.layer == parse_profile(analytic).layer   # bundled file is current
    assert p10.source == str(names["analytic-llama70b-1b"])


def test_with_link_and_hidden_bytes():
    p = load_profile("analytic-llama70b-1b")
    q = p.with_link(bandwidth_gbps=100.0)
    assert q.link == LinkModel(0.05, 100.0) and p.link == LinkModel(0.05, 10.0)
    assert q.with_link(latency_ms=0.0).link == LinkModel(0.0, 100.0)
    assert p.hidden_bytes(2) == 2 * 8192 * 2
    with pytest.raises(InputError, match="bandwidth_gbps"):
        p.with_link(bandwidth_gbps=0)


def test_constant_profile():
    p = constant_profile(layers=6, layer_ms=2.0, draft_ms=0.5, link_latency_ms=0.1)
    assert p.layer(1, 0) == p.layer(500, 9000) == 2.0
    assert p.draft_step(64, 100) == 0.5 and p.lm_head(9) == 0.0
    assert p.link.transfer_ms(10**9) == 0.0 and p.link.latency_ms == 0.1
    assert p.stage_layers(3) == [2, 2, 2]
    assert constant_profile(bandwidth_gbps=8.0).link.transfer_ms(10**6) == pytest.approx(1.0)
    assert constant_profile(shared_cores=2).device_kind == "cpu"


# ----------------------------------------------------------------------- load / save

def test_round_trip(tmp_path):
    for p in (load_profile("analytic-llama70b-1b"), constant_profile(shared_cores=2)):
        path = tmp_path / "rt.json"
        save_profile(p, path)
        q = load_profile(path)
        assert q == p and q.to_dict() == p.to_dict() and q.source == str(path)


def test_unknown_keys_ignored(analytic, tmp_path):
    data = copy.deepcopy(analytic)
    data["future_key"] = {"x": 1}
    data["latency"]["layer"]["fitted_by"] = "lstsq"
    assert load_profile(write(tmp_path, data)).layer == parse_profile(analytic).layer


def _mutate(data, path, value):
    *parents, last = path
    for k in parents:
        data = data[k]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


DELETE = object()

BAD = [
    # (JSON path to change, new value, field the error must name)
    (("latency", "layer"), DELETE, "latency.layer"),
    (("schema",), DELETE, "schema"),
    (("target", "hidden"), "8192", "target.hidden"),
    (("target", "layers"), 0, "target.layers"),
    (("draft", "dtype_bytes"), True, "draft.dtype_bytes"),
    (("latency", "layer", "tokens"), [1, 4, 2], "latency.layer.tokens[2]"),
    (("latency", "layer", "context"), [0, 0, 1], "latency.layer.context[1]"),
    (("latency", "layer", "ms", 2), [1.0, 2.0], "latency.layer.ms[2]"),
    (("latency", "layer", "ms"), [[1.0] * 8], "latency.layer.ms"),
    (("latency", "draft_step", "ms", 2, 3), -1.0, "latency.draft_step.ms[2][3]"),
    (("latency", "lm_head", "ms", 1), float("nan"), "latency.lm_head.ms[1]"),
    (("latency", "embed", "ms"), [0.1], "latency.embed.ms"),
    (("latency", "kv_compact_ms"), "fast", "latency.kv_compact_ms"),
    (("link", "bandwidth_gbps"), 0, "link.bandwidth_gbps"),
    (("devices", "kind"), "tpu", "devices.kind"),
    (("devices", "shared_cores"), 0, "devices.shared_cores"),
    (("provenance", "kind"), "guessed", "provenance.kind"),
    (("provenance", "date"), "26/11/2025", "provenance.date"),
    (("provenance", "formula"), DELETE, "provenance.formula"),
    (("schema",), "pipedec-profile/2", "schema"),
    (("schema",), "something-else/1", "schema"),
    (("latency", "cold_stage_ms"), -1.0, "latency.cold_stage_ms"),
    (("latency", "cold_lm_head_ms"), "warm", "latency.cold_lm_head_ms"),
    (("provenance", "host"), [], "provenance.host"),
    (("split",), [40, 39], "split"),
    (("split",), [80, 0], "split[1]"),
]


@pytest.mark.parametrize("path,value,fld", BAD,
                         ids=[b[2] + "-" + str(i) for i, b in enumerate(BAD)])
def test_malformed_profile(analytic, tmp_path, path, value, fld):
    data = copy.deepcopy(analytic)
    _mutate(data, path, value)
    file = write(tmp_path, data)
    with pytest.raises(InputError) as e:
        load_profile(file)
    assert e.value.field == fld and e.value.file == str(file)
    assert str(file) in str(e.value) and f"field '{fld}'" in str(e.value)


def test_cold_cache_fields_are_optional(analytic, tmp_path):
    """Absent: 0 (the simulator charges nothing extra); present: kept through a round trip."""
    p = parse_profile(analytic)
    assert (p.cold_stage_ms, p.cold_layer_ms, p.cold_lm_head_ms, p.cold_draft_ms) == (0, 0, 0, 0)
    assert not any(k.startswith("cold_") for k in p.to_dict()["latency"])
    data = copy.deepcopy(analytic)
    data["latency"].update(cold_stage_ms=1.7, cold_layer_ms=0.03, cold_lm_head_ms=0.26)
    save_profile(data, tmp_path / "c.json")
    q = load_profile(tmp_path / "c.json")
    assert (q.cold_stage_ms, q.cold_layer_ms, q.cold_lm_head_ms, q.cold_draft_ms) == (
        1.7, 0.03, 0.26, 0.0)
    assert parse_profile(q.to_dict()) == q


def test_unsupported_schema_message(analytic, tmp_path):
    data = dict(analytic, schema="pipedec-profile/2")
    with pytest.raises(InputError, match="unsupported schema version"):
        load_profile(write(tmp_path, data))
    assert parse_profile(dict(analytic, schema="pipedec-profile/1.3")).name  # minor bump is fine


def test_not_json_names_line(tmp_path):
    file = write(tmp_path, '{\n  "schema": "pipedec-profile/1",\n  "name": oops\n}')
    with pytest.raises(InputError) as e:
        load_profile(file)
    assert e.value.line == 3 and str(e.value).startswith(f"{file}:3: ")


def test_not_an_object_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="JSON object"):
        load_profile(write(tmp_path, "[1, 2]"))
    with pytest.raises(InputError, match="bundled") as e:
        load_profile(tmp_path / "absent.json")
    assert e.value.file == str(tmp_path / "absent.json")


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("OLD")
    p = constant_profile()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(InputError, match="No space left"):
        save_profile(p, target)
    monkeypatch.undo()
    assert target.read_text() == "OLD" and os.listdir(tmp_path) == ["out.json"]

    bad = p.to_dict()
    bad["target"]["layers"] = -1
    with pytest.raises(InputError, match="target.layers"):
        save_profile(bad, target)
    assert target.read_text() == "OLD" and os.listdir(tmp_path) == ["out.json"]

    save_profile(p, target)
    assert load_profile(target) == p and os.listdir(tmp_path) == ["out.json"]


def test_dumps_keeps_strings_and_is_strict_json():
    d = constant_profile().to_dict()
    d["provenance"]["notes"] = "odd [1,\\n 2] text"
    text = cal.dumps_profile(d)
    assert json.loads(text) == json.loads(json.dumps(d))
    assert Profile.__hash__ is None and SCHEMA == d["schema"]
