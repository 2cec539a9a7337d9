"""One source for every knob: the flags of both CLIs, the sweep's grid keys, the tuner's
space, SimConfig and the policies all come from pipedec_sim.protocol.knobs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backends.torch import cli as real_cli
from pipedec_sim.programs import cli as sim_cli
from pipedec_sim.programs import sweep, tune
from pipedec_sim.programs.flags import knob_flag_help
from pipedec_sim.programs.simulate import SimConfig
from pipedec_sim.protocol.knobs import (
    KNOBS,
    STRATEGY_KNOBS,
    Knob,
    PipeDecKnobs,
    PipelineKnobs,
    TreeSDKnobs,
    knobs_of,
    values_of,
)
from pipedec_sim.protocol.pacing import DEFAULT_CANCEL, DEFAULT_PRUNE, PRUNE_MODES
from pipedec_sim.protocol.policies import Eagle2Policy, LayerPolicy
from pipedec_sim.protocol.strategies import make_strategy

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "traces" / "synthetic-llama70b.jsonl"


def options(parser, command: str) -> dict[str, object]:
    """A subcommand's optional arguments by flag (argparse actions)."""
    sub = next(a for a in parser._actions if a.dest == "command")
    return {flag: a for a in sub.choices[command]._actions for flag in a.option_strings}


def knob_flag(k: Knob) -> str:
    return "--no-" + k.flag[2:] if k.kind is bool and k.default else k.flag


SIM_RUN = options(sim_cli.build_parser(), "run")
REAL_RUN = options(real_cli.build_parser(), "run")
TUNE = options(sim_cli.build_parser(), "tune")


# --------------------------------------------------------------------------- the knobs

def test_groups_hold_the_pacing_defaults_and_unique_names():
    assert PipelineKnobs().prune == DEFAULT_PRUNE and PipelineKnobs().cancel == DEFAULT_CANCEL
    assert KNOBS["prune"].choices == PRUNE_MODES and "inband" in PRUNE_MODES
    names = [k.name for g in (PipeDecKnobs, TreeSDKnobs, PipelineKnobs) for k in knobs_of(g)]
    assert names == list(KNOBS) and len(set(names)) == len(names)
    assert [k.name for k in knobs_of(PipeDecKnobs)] == ["width", "topk", "floor", "coverage",
                                                        "window"]
    # chain-SD's gamma lives with tree-SD's knobs (chain-SD is tree-SD with a chain)
    assert {k.name: k.strategy for k in knobs_of(TreeSDKnobs)} == {
        "depth": "tree-sd", "tree_topk": "tree-sd", "total": "tree-sd", "gamma": "chain-sd"}
    assert {k.strategy for k in knobs_of(PipelineKnobs)} == {None}


def test_every_default_passes_its_own_checks_and_help_shows_it():
    for k in KNOBS.values():
        assert k.problem(k.default) is None, k.name
        assert k.help_text().endswith(f"(default {k.show(k.default)})")
    assert KNOBS["coverage"].help_text().endswith("(default off)")
    assert KNOBS["floor"].help_text().endswith("(default 0)")


@pytest.mark.parametrize("name, value, message", [
    ("width", 0, "must be >= 1"), ("width", 2.5, "expected an integer"),
    ("width", True, "expected an integer"), ("floor", 1.0, "must be < 1"),
    ("floor", -0.1, "must be >= 0"), ("coverage", 0.0, "must be > 0"),
    ("coverage", 1.5, "must be <= 1"), ("floor", float("nan"), "expected a number"),
    ("topology", "C", "choose from A, B"), ("prune", "fast", "choose from broadcast"),
    ("cancel", 1, "expected true or false"), ("depth", None, "must be given"),
])
def test_bad_values_name_the_knob(name, value, message):
    with pytest.raises(ValueError, match=f"^{name}: {message}"):
        KNOBS[name].check(value)
    with pytest.raises(ValueError, match=name):
        SimConfig(**{name: value})


def test_policies_take_their_defaults_and_checks_from_the_knobs():
    pd, sd = PipeDecKnobs(), TreeSDKnobs()
    assert LayerPolicy() == LayerPolicy.of(pd)
    assert (LayerPolicy().width, LayerPolicy().topk, LayerPolicy().floor,
            LayerPolicy().coverage) == (pd.width, pd.topk, pd.floor, pd.coverage)
    assert Eagle2Policy() == Eagle2Policy(depth=sd.depth, topk=sd.tree_topk, total=sd.total)
    with pytest.raises(ValueError, match="^topk: must be >= 1, got 0"):
        Eagle2Policy(topk=0)
    with pytest.raises(ValueError, match="^coverage: must be > 0"):
        LayerPolicy(coverage=0.0)


def test_make_strategy_takes_every_strategy_knob_and_refuses_others():
    recorded = {"width": 4, "topk": 3, "floor": 0.0, "coverage": None, "window": 5,
                "depth": 4, "tree_topk": 2, "total": 9, "gamma": 3}   # as the Head records
    assert set(recorded) == set(STRATEGY_KNOBS)
    assert make_strategy("chain-sd", [1], 4, **recorded).policy == Eagle2Policy(3, 1, 3)
    s = make_strategy("pipedec", [1, 2], 4, **recorded)
    assert s.policy == LayerPolicy(width=4, topk=3) and s.window == 5
    assert make_strategy("tree-sd", [1], 4, **recorded).policy == Eagle2Policy(4, 2, 9)
    assert make_strategy("pipedec", [1], 4).policy == LayerPolicy()
    with pytest.raises(TypeError, match="unknown strategy knob.*prune.*known: width"):
        make_strategy("ar", [1], 4, prune="broadcast")
    with pytest.raises(ValueError, match="width"):
        make_strategy("ar", [1], 4, width=0)


def test_sim_config_is_built_from_the_knob_groups():
    cfg = SimConfig(stages=4, width=8, prune="inband", cancel=False)
    assert values_of(SimConfig()) == values_of(PipeDecKnobs(), (PipeDecKnobs,)) | values_of(
        TreeSDKnobs(), (TreeSDKnobs,)) | values_of(PipelineKnobs(), (PipelineKnobs,))
    assert cfg.knobs() == {**values_of(PipeDecKnobs(width=8), (PipeDecKnobs,)), "window": 5,
                           **values_of(TreeSDKnobs(), (TreeSDKnobs,))}
    assert (cfg.prune, cfg.cancel, cfg.topology) == ("inband", False, "A")


def test_knobs_module_imports_only_the_protocol():
    code = ("import sys, pipedec_sim.protocol.knobs; "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
            "('pipedec_sim', 'backends', 'simpy', 'torch', 'pandas', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    assert all(m == "pipedec_sim" or m.startswith("pipedec_sim.protocol") for m in out), out


# --------------------------------------------------------------------------- the CLIs

@pytest.mark.parametrize("name", list(KNOBS))
def test_every_knob_is_the_same_flag_in_both_clis(name):
    k = KNOBS[name]
    flag = knob_flag(k)
    sim, real = SIM_RUN[flag], REAL_RUN[flag]
    for a in (sim, real):
        assert a.dest == k.name and a.default == k.default
        assert a.help == knob_flag_help(k) and "default" in a.help
    assert (sim.choices, sim.type is None) == (real.choices, real.type is None)
    if k.strategy is None:                      # the pipeline's knobs: tune has them too
        assert TUNE[flag].help == sim.help and TUNE[flag].default == sim.default


def test_default_flags_give_the_default_knobs():
    sim = sim_cli.build_parser().parse_args(["run", "--trace", "t"])
    real = real_cli.build_parser().parse_args(["run", "--target", "tiny", "--prompts", "p"])
    assert values_of(sim) == values_of(real) == values_of(SimConfig())
    assert real_cli._knobs(real) == SimConfig(stages=real.stages).knobs()


def test_bad_knob_flags_are_one_line_naming_the_flag(capsys):
    cases = [("--width", "0"), ("--floor", "1"), ("--coverage", "0"), ("--window", "x"),
             ("--tree-topk", "-1"), ("--prune", "fast"), ("--topology", "C")]
    for flag, value in cases:
        for main, base in ((sim_cli.main, ["run", "--trace", str(TRACE)]),
                           (real_cli.main, ["run", "--target", "tiny", "--prompts", "p"])):
            with pytest.raises(SystemExit) as e:
                main(base + [flag, value])
            err = capsys.readouterr().err
            assert e.value.code == 2 and flag in err, (flag, err)
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_prune_and_cancel_reach_the_real_pipeline():
    pytest.importorskip("torch")
    args = real_cli.build_parser().parse_args(["run", "--target", "tiny", "--prompts", "p",
                                               "--prune", "inband", "--no-cancel"])
    cfg = real_cli._stage_config(args)
    assert (cfg.prune, cfg.cancel, cfg.stages, cfg.timeout_s) == ("inband", False, 2, 20.0)


@pytest.mark.parametrize("command", ["run", "profile"])
def test_every_real_flag_has_help_and_shows_its_default(command):
    for flag, a in options(real_cli.build_parser(), command).items():
        if flag in ("-h", "--help"):
            continue
        assert a.help, flag
        assert ("required" if a.required else "default") in a.help, (flag, a.help)


# --------------------------------------------------------------------------- sweep, tune

def test_sweep_grid_keys_are_the_knobs():
    assert set(KNOBS) <= set(sweep.AXES)
    assert sweep.PIPEDEC_KNOBS == tuple(k.name for k in knobs_of(PipeDecKnobs))
    assert sweep.TREE_SD_KNOBS + sweep.CHAIN_SD_KNOBS == tuple(k.name
                                                               for k in knobs_of(TreeSDKnobs))
    assert sweep.KNOBS_OF["chain-sd"] == ("gamma",)
    assert sweep.DEFAULTS == {k.name: k.default for k in KNOBS.values()}
    flags = {flag: (key, help_) for flag, key, _, help_ in sweep.FLAG_AXES}
    for k in KNOBS.values():
        key, help_ = flags[k.flag]
        assert key == k.name and help_.startswith(k.help_text()[:-1])
    grid = sweep.build_grid(None, {"trace": [str(TRACE)], "stages": [2],
                                   "prune": list(PRUNE_MODES), "window": [0, 3]})
    assert grid.axes["prune"] == list(PRUNE_MODES) and grid.axes["window"] == [None, 3]
    assert {c["window"] for c in grid.configs() if c["strategy"] == "pipedec"} == {None, 3}


def test_sweep_refuses_an_unknown_key_naming_the_known_keys(tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text(f'trace = "{TRACE}"\nstages = [2]\nwidht = [4]\n', encoding="utf-8")
    assert sim_cli.main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{grid}:3: field 'widht': unknown key; known keys: " in err
    known = err.split("known keys: ")[1].strip().split(", ")
    assert known == list(sweep.AXES) and set(KNOBS) <= set(known)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("key, value, message", [
    ("window", -1, "must be >= 1"), ("prune", "fast", "choose from broadcast, inband"),
    ("tree_topk", 0, "must be >= 1"), ("coverage", 1.5, "must be <= 1"),
    ("cancel", "yes", "expected true or false"),
])
def test_sweep_checks_values_by_the_knobs(key, value, message):
    from pipedec_sim.errors import InputError
    with pytest.raises(InputError) as e:
        sweep.build_grid(None, {"trace": [str(TRACE)], key: [value]})
    assert e.value.field == KNOBS[key].flag and message in e.value.message


def test_tuner_space_uses_the_knob_bounds(monkeypatch):
    assert set(tune.SPACE) <= {k.name for k in knobs_of(PipeDecKnobs)}
    assert tune.DEFAULT == tuple(getattr(PipeDecKnobs(), k) for k in tune.SPACE)
    assert (tune.MIN_WIDTH, tune.MIN_TOPK) == (KNOBS["width"].lo, KNOBS["topk"].lo)
    tune.check_space()
    for p in [(1, 1, 0.0), (2, 3, 1e-1), (tune.MAX_WIDTH, tune.MAX_TOPK, 1e-3)]:
        for point in tune._neighbours(p, 2.0):
            for name, v in zip(tune.SPACE, point):
                assert KNOBS[name].problem(v) is None, (name, v)
    monkeypatch.setattr(tune, "FLOORS", tune.FLOORS + (1.0,))
    with pytest.raises(ValueError, match="^floor: must be < 1"):
        tune.check_space()
    monkeypatch.setattr(tune, "SPACE", ("width", "topk", "flor"))
    with pytest.raises(ValueError, match="flor are not PipeDec knobs"):
        tune.check_space()
