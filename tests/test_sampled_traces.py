"""Traces recorded at temperature > 0: the header's `sampling`, read, written and checked."""
from __future__ import annotations

import dataclasses
import json

import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.traces import read_trace, trace_sampling, write_trace
from pipedec_sim.programs.cli import main as sim_main
from pipedec_sim.protocol.sampling import GREEDY, Sampling
from tests.helpers import bernoulli_trace, random_trace


def _with_sampling(trace, sampling):
    return dataclasses.replace(trace, header=dataclasses.replace(trace.header,
                                                                   sampling=sampling))


def test_a_sampled_header_round_trips_and_greedy_is_the_default(tmp_path):
    plain = bernoulli_trace(2, 10, 0.5)
    assert trace_sampling(plain.header) == GREEDY
    s = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 3}
    write_trace(_with_sampling(plain, s), tmp_path / "t.jsonl")
    back = read_trace(tmp_path / "t.jsonl")
    assert back.header.sampling == s
    assert trace_sampling(back.header) == Sampling(0.7, 0.9, 0, 3)


@pytest.mark.parametrize("bad, field", [({"temperature": -1}, "sampling"),
                                        ({"temprature": 0.7}, "sampling.temprature"),
                                        ("hot", "sampling")])
def test_a_bad_sampling_header_names_the_field(tmp_path, bad, field):
    path = tmp_path / "t.jsonl"
    write_trace(bernoulli_trace(1, 5, 0.5), path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    header["sampling"] = bad
    path.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    with pytest.raises(InputError) as e:
        read_trace(path)
    assert e.value.field == field and e.value.line == 1


def test_run_says_how_the_trace_sampled(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write_trace(_with_sampling(bernoulli_trace(1, 8, 0.5), {"temperature": 0.7, "seed": 5}),
                path)
    assert sim_main(["run", "--stages", "2", "--trace", str(path), "--strategies", "ar",
                     "--profile", "analytic-llama70b-1b"]) == 0
    assert "target tokens sampled at temperature 0.7, seed 5" in capsys.readouterr().err


def test_a_fit_to_a_sampled_trace_stands_for_its_temperature(tmp_path):
    import random

    from pipedec_sim.inputs.acceptance import fit_acceptance, load_acceptance, save_acceptance
    greedy = random_trace(random.Random(2), 3, 40, 4, 8)
    trace = _with_sampling(greedy, {"temperature": 0.7})
    model = fit_acceptance([trace])
    assert model.temperature == 0.7
    save_acceptance(model, tmp_path / "m.json")
    assert load_acceptance(tmp_path / "m.json").temperature == 0.7
    assert fit_acceptance([greedy]).temperature == 0.0
    with pytest.raises(InputError, match="different temperatures"):
        fit_acceptance([trace, greedy])


def test_prompt_files_pick_the_acceptance_model_of_their_temperature(capsys):
    from pipedec_sim.inputs.acceptance import acceptance_for_format, bundled_acceptance
    assert acceptance_for_format("mtbench").temperature == 0.0
    for name in ("mtbench", "gsm8k"):
        assert f"{name}-t0.7" in bundled_acceptance()
        assert acceptance_for_format(name, 0.7).temperature == 0.7
    with pytest.raises(InputError, match=r"at temperature 0.5 \(bundled: 0, 0.7\)") as e:
        acceptance_for_format("mtbench", 0.5)
    assert e.value.field == "--temperature"
    args = ["run", "--stages", "2", "--strategies", "ar", "--max-requests", "1",
            "--trace", "traces/samples/mtbench.jsonl"]
    assert sim_main(args + ["--temperature", "0.7"]) == 0
    assert "mtbench-t0.7" in capsys.readouterr().err
    assert sim_main(args + ["--temperature", "0.5"]) == 2
    assert "no bundled acceptance model for mtbench prompts" in capsys.readouterr().err


def test_a_trace_refuses_another_temperature(capsys):
    args = ["run", "--stages", "2", "--strategies", "ar", "--max-requests", "1",
            "--trace", "traces/real-mtbench.jsonl.gz"]
    assert sim_main(args + ["--temperature", "0.7"]) == 2
    assert "sampled at temperature 0, not 0.7" in capsys.readouterr().err
    assert sim_main(args + ["--temperature", "0"]) == 0
