import csv
import json

import pytest
import torch
from torch import nn

from gossip.cli import main
from gossip.errors import ConfigError, TopologyError
from gossip.layout import ParamLayout
from gossip.sim import SimConfig, parse_sweep, simulate, sweep
from gossip.sim.engine import initial_models
from gossip.tasks import Task, get_task


def quick(**kw):
    base = dict(task="digits", nodes=8, rounds=40, eval_every=10, threads=1)
    base.update(kw)
    return simulate(SimConfig(**base), progress=False)


def test_digits_gossip_learns_and_beats_no_communication():
    gossip = quick(rounds=80).summary
    alone = quick(rounds=80, averaging="none").summary
    assert gossip["accuracy_mean"] > 0.85
    assert gossip["accuracy_mean"] > alone["accuracy_mean"] + 0.03
    assert alone["bytes_sent_total"] == 0
    assert gossip["consensus_distance"] < alone["consensus_distance"]


def test_bytes_are_counted_per_message():
    s = quick(rounds=3).summary
    # ring of 8: 16 directed messages per round, each a full float32 model
    assert s["bytes_sent_total"] == 3 * 16 * s["parameters"] * 4
    ar = quick(rounds=3, averaging="allreduce").summary
    assert ar["bytes_sent_total"] == 3 * 2 * 7 * s["parameters"] * 4  # ring all-reduce
    assert ar["consensus_distance"] < 1e-5


@pytest.mark.parametrize(
    "averaging,topology",
    [
        ("push_sum", "directed_ring"),
        ("push_sum", "one_peer_exponential"),
        ("variance_corrected", "ring"),
        ("dpsgd", "torus"),
    ],
)
def test_every_rule_trains(averaging, topology):
    s = quick(averaging=averaging, topology=topology, rounds=60).summary
    assert s["accuracy_mean"] > 0.8, s


def test_mixing_only_preserves_the_network_mean():
    # lr tiny: mixing dominates; D-PSGD with doubly stochastic weights keeps the mean of models
    cfg = SimConfig(task="lsq", nodes=8, rounds=1, init="independent", lr=1e-12, threads=1)
    task = get_task("lsq")
    lay = ParamLayout.from_module(task.model_fn())
    start = initial_models(task, lay, cfg)
    out = simulate(cfg, progress=False).models
    assert torch.allclose(out.mean(0), start.mean(0), atol=1e-6)
    assert not torch.allclose(out, start)


def test_independent_init_differs_and_shared_does_not():
    task = get_task("digits")
    lay = ParamLayout.from_module(task.model_fn())
    ind = initial_models(task, lay, SimConfig(nodes=4, init="independent"))
    sh = initial_models(task, lay, SimConfig(nodes=4, init="shared"))
    assert not torch.equal(ind[0], ind[1]) and torch.equal(sh[0], sh[3])


def test_seeded_runs_are_reproducible():
    a = quick(rounds=5, partition="dirichlet", alpha=0.3, seed=3).models
    b = quick(rounds=5, partition="dirichlet", alpha=0.3, seed=3).models
    c = quick(rounds=5, partition="dirichlet", alpha=0.3, seed=4).models
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_user_task_through_the_python_api():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    task = Task(
        name="mine",
        model_fn=lambda: nn.Linear(5, 2),
        train=(x[:300], y[:300]),
        test=(x[300:], y[300:]),
        lr=0.5,
        rounds=30,
    )
    s = simulate(SimConfig(nodes=4, threads=1), task=task, progress=False).summary
    assert s["task"] == "mine" and s["accuracy_mean"] > 0.9


def test_dpsgd_refuses_weights_that_are_not_row_stochastic(tmp_path):
    f = tmp_path / "irregular.json"
    f.write_text(
        json.dumps(
            {"directed": True, "nodes": 4, "edges": [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]]}
        )
    )
    with pytest.raises(TopologyError, match=r"row \d sums to"):
        quick(nodes=4, topology=str(f), weights="push_sum", averaging="dpsgd")
    s = quick(nodes=4, topology=str(f), averaging="push_sum", rounds=30).summary
    assert s["accuracy_mean"] > 0.75


def test_config_validation_names_the_setting():
    with pytest.raises(ConfigError, match="averaging='gossipy'; valid"):
        SimConfig(averaging="gossipy")
    with pytest.raises(ConfigError, match="topology 'ring' has|nodes=0 must be >= 1"):
        SimConfig(nodes=0)


def test_cli_writes_outputs_with_file_env_and_flags(tmp_path, monkeypatch, capsys):
    cfgfile = tmp_path / "exp.yaml"
    cfgfile.write_text("task: digits\nnodes: 6\nrounds: 50\ntopology: complete\n")
    monkeypatch.setenv("GOSSIP_ROUNDS", "4")  # env beats the file ...
    out = tmp_path / "run"
    rc = main(
        [
            "sim",
            "--config",
            str(cfgfile),
            "--nodes",
            "4",
            "--threads",
            "1",  # flags beat env
            "--out",
            str(out),
            "--plot",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "accuracy_mean",
        "accuracy_min",
        "loss_mean",
        "consensus_distance",
        "rounds",
        "bytes_sent_total",
        "wall_seconds",
        "config",
    ):
        assert key in summary
    assert summary["rounds"] == 4 and summary["config"]["nodes"] == 4
    assert summary["config"]["topology"] == "complete"
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    assert (out / "curves.png").stat().st_size > 10_000
    assert json.loads(capsys.readouterr().out)["rounds"] == 4


def test_cli_reports_bad_settings_as_errors(capsys):
    assert main(["sim", "--averaging", "nope"]) == 2
    assert "averaging='nope'" in capsys.readouterr().err


def test_sweep_writes_one_table(tmp_path):
    grid = parse_sweep(["averaging=dpsgd,none", "nodes=4"])
    assert grid == {"averaging": ["dpsgd", "none"], "nodes": [4]}
    rows = sweep(SimConfig(task="digits", rounds=5, threads=1), grid, tmp_path, progress=False)
    assert [r["averaging"] for r in rows] == ["dpsgd", "none"]
    md = (tmp_path / "comparison.md").read_text()
    assert "| averaging | nodes | accuracy_mean" in md
    assert (tmp_path / "comparison.png").exists()
    assert (tmp_path / "averaging=none-nodes=4" / "summary.json").exists()
    with pytest.raises(ConfigError, match="--sweep key 'node' is not a setting"):
        parse_sweep(["node=4"])


def test_sweep_values_with_commas_split_on_semicolons():
    grid = parse_sweep(["feedback=choco:0.1;motef:0.1,0.5", "lr=0.1,0.2"])
    assert grid == {"feedback": ["choco:0.1", "motef:0.1,0.5"], "lr": [0.1, 0.2]}


def test_sweep_csv_quotes_values_with_commas(tmp_path):
    import csv

    from gossip.sim.sweep import write_table

    rows = [{"feedback": "motef:0.1,0.5", "accuracy_mean": 0.5}]
    write_table(rows, ["feedback"], tmp_path)
    with open(tmp_path / "comparison.csv", newline="") as f:
        header, row = list(csv.reader(f))
    assert row[header.index("feedback")] == "motef:0.1,0.5"
    assert row[header.index("accuracy_mean")] == "0.5"


def test_sweep_groups_seeds(tmp_path):
    grid = parse_sweep(["averaging=dpsgd,none", "seed=0,1"])
    sweep(
        SimConfig(task="digits", nodes=4, rounds=3, threads=1, target_accuracy=0.99),
        grid,
        tmp_path,
        progress=False,
    )
    md = (tmp_path / "comparison_by_config.md").read_text().splitlines()
    assert md[0].startswith("| averaging | seeds |")
    assert md[2].startswith("| dpsgd | 2 |") and md[2].endswith("| never | 0/2 |")


def test_compressed_gossip_counts_real_payload_bytes():
    from gossip.algorithms.compression import make_compressor
    from gossip.algorithms.feedback import send

    s = quick(rounds=3, compress="topk:0.01", feedback="choco:0.3").summary
    c = make_compressor("topk:0.01")
    one = send(c, torch.zeros(s["parameters"]).normal_()).nbytes  # one node's message
    assert s["bytes_sent_total"] == 3 * 16 * one  # ring of 8: 16 messages a round
    dense = quick(rounds=3).summary["bytes_sent_total"]
    assert dense / s["bytes_sent_total"] > 50


def test_choco_recovers_what_naive_compression_loses():
    naive = quick(rounds=60, compress="topk:0.01").summary
    choco = quick(rounds=60, compress="topk:0.01", feedback="choco:0.3").summary
    assert naive["accuracy_mean"] < 0.5 < 0.8 < choco["accuracy_mean"]


@pytest.mark.parametrize(
    "compress,feedback,averaging",
    [
        ("quant:4", "choco:0.5", "dpsgd"),
        ("topk:0.05", "motef:0.3,0.9", "dpsgd"),
        ("topk:0.05", "choco-econtrol:0.3,0.0", "dpsgd"),
        ("topk:0.01", "ef14", "allreduce"),
        ("topk:0.01", "econtrol:0.1", "allreduce"),
        ("topk:0.01", "ef21", "allreduce"),
    ],
)
def test_error_controlled_rules_train(compress, feedback, averaging):
    s = quick(rounds=60, compress=compress, feedback=feedback, averaging=averaging).summary
    assert s["accuracy_mean"] > 0.8, s
    if averaging == "allreduce":
        assert s["consensus_distance"] < 1e-5  # one shared model


def test_feedback_settings_are_checked():
    with pytest.raises(ConfigError, match="feedback='choco' is not valid; use none"):
        quick(compress="topk:0.01", feedback="choco")
    with pytest.raises(ConfigError, match="use it with averaging='allreduce'"):
        quick(compress="topk:0.01", feedback="ef14")
    with pytest.raises(ConfigError, match="local_steps=2 must be 1"):
        quick(compress="topk:0.01", feedback="motef:0.3,0.9", local_steps=2)


def test_cosine_schedule_decays_to_zero_and_bad_schedule_is_named():
    from gossip.sim.config import lr_at

    assert lr_at("constant", 0.3, 7, 10) == 0.3
    assert lr_at("cosine", 0.3, 0, 10) == pytest.approx(0.3)
    assert lr_at("cosine", 0.3, 5, 10) == pytest.approx(0.15)
    assert lr_at("cosine", 0.3, 9, 10) < 0.01
    with pytest.raises(ConfigError, match="lr_schedule='linear'; valid"):
        SimConfig(lr_schedule="linear")
