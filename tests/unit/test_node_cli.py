"""``gossip run`` / ``gossip launch``: flag and environment translation, and the run summary,
without starting any process."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gossip.commands import launch, run
from gossip.errors import ConfigError, GossipError
from gossip.launcher import LocalCluster, summarize
from gossip.runtime.checkpoint import save_checkpoint

pytestmark = pytest.mark.timeout(30)


def parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_run_flags_env_and_defaults_resolve_into_one_config():
    args = parse(run, ["--task", "digits", "--rounds", "7", "--round-deadline-s", "2.5"])
    cfg = run.config_from_args(args, environ={"GOSSIP_TRANSPORT": "gloo", "GOSSIP_MODE": "async"})
    assert (cfg.task, cfg.rounds, cfg.round_deadline_s) == ("digits", 7, 2.5)
    assert (cfg.transport, cfg.mode, cfg.resume) == ("gloo", "async", "no")


def test_world_size_falls_back_to_torchrun_unless_set():
    args = parse(run, [])
    assert run.config_from_args(args, environ={"WORLD_SIZE": "4"}).nodes == 4
    env = {"WORLD_SIZE": "4", "GOSSIP_NODES": "6"}
    assert run.config_from_args(args, environ=env).nodes == 6
    assert run.config_from_args(parse(run, ["--nodes", "3"]), environ=env).nodes == 3


def test_a_bare_resume_means_yes_and_needs_a_directory():
    cfg = run.config_from_args(parse(run, ["--resume", "--checkpoint-dir", "c"]), environ={})
    assert cfg.resume == "yes"
    with pytest.raises(ConfigError, match="resume='auto' needs checkpoint_dir"):
        run.config_from_args(parse(run, ["--resume", "auto"]), environ={})


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--transport", "tcp"], "transport='tcp'; valid: zmq, gloo"),
        (["--mode", "eventually"], "mode='eventually'; valid: sync, async"),
        (["--averaging", "allreduce"], "averaging='allreduce' .* add --transport gloo"),
        (["--resume", "maybe", "--checkpoint-dir", "c"], "resume='maybe'; valid: no, auto, yes"),
        (["--compress", "topk:0.01", "--mode", "async"], "mode='async' with compress='topk"),
        (["--compress", "topk:0.01", "--feedback", "motef:0.1,0.9"], "simulator only"),
        (["--feedback", "choco"], "feedback='choco' is not valid; use none, choco:GAMMA"),
        (["--compress", "top:3"], "compressor spec 'top:3'"),
        (["--compress", "sign", "--averaging", "push_sum"], "averaging='push_sum' with compress"),
    ],
)
def test_bad_run_settings_are_explained(argv, match):
    with pytest.raises(ConfigError, match=match):
        run.config_from_args(parse(run, argv), environ={})


def test_compress_and_feedback_come_from_flags_or_env_and_reach_the_nodes():
    env = {"GOSSIP_COMPRESS": "topk:0.01", "GOSSIP_FEEDBACK": "choco:0.2"}
    cfg = run.config_from_args(parse(run, []), environ=env)
    assert (cfg.compress, cfg.feedback) == ("topk:0.01", "choco:0.2")
    argv = ["--nodes", "4", "--compress", "quant:4", "--feedback", "choco-econtrol:0.3,0.05"]
    cfg, _, child, _ = launch.launch_plan(parse(launch, [*argv, "--out", "o"]), environ={})
    assert (cfg.compress, cfg.feedback) == ("quant:4", "choco-econtrol:0.3,0.05")
    assert child[child.index("--compress") + 1] == "quant:4"
    assert child[child.index("--feedback") + 1] == "choco-econtrol:0.3,0.05"
    # the DDP baseline is the dense reference: it drops them
    cfg, _, child, _ = launch.launch_plan(
        parse(launch, [*argv, "--baseline", "ddp", "--out", "o"]), environ={}
    )
    assert "--compress" not in child and (cfg.averaging, cfg.compress) == ("allreduce", "none")


def test_launch_passes_its_flags_to_every_node():
    args = parse(
        launch,
        [
            "--nodes",
            "8",
            "--task",
            "digits",
            "--transport",
            "gloo",
            "--task-option",
            "hidden=32",
            "--out",
            "o",
        ],
    )
    cfg, nodes, argv, out = launch.launch_plan(args, environ={})
    assert nodes == 8 and cfg.transport == "gloo" and out == "o"
    assert argv == [
        "--task",
        "digits",
        "--nodes",
        "8",
        "--transport",
        "gloo",
        "--task-option",
        "hidden=32",
        "--out",
        "o",
    ]


def test_launch_ddp_baseline_runs_allreduce_over_gloo():
    args = parse(launch, ["--nodes", "2", "--baseline", "ddp", "--out", "o"])
    cfg, _, argv, _ = launch.launch_plan(args, environ={})
    assert (cfg.averaging, cfg.transport) == ("allreduce", "gloo")
    assert argv[-6:] == ["--averaging", "allreduce", "--transport", "gloo", "--out", "o"]


def test_launch_refuses_the_flags_it_sets_itself():
    with pytest.raises(GossipError, match="--rank is set by the launcher"):
        launch.launch_plan(parse(launch, ["--rank", "1"]), environ={})


def test_nodes_get_torchruns_variables_and_not_a_stray_gossip_rank(monkeypatch):
    monkeypatch.setenv("GOSSIP_RANK", "3")
    cluster = LocalCluster(2, [])
    cluster.port = 12345
    env = cluster.node_env(1)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "2", "12345")
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True" and "GOSSIP_RANK" not in env


def test_summary_has_the_simulators_keys_and_skips_dead_nodes(tmp_path):
    for rank, acc in ((0, 0.9), (2, 0.8)):
        node = {
            "rank": rank,
            "world_size": 3,
            "task": "digits",
            "accuracy": acc,
            "loss": 0.3,
            "rounds": 4,
            "seconds_per_round": 0.1,
            "seconds_per_step": 0.02,
            "bytes_sent": 1000,
            "parameters": 2,
            "config": {"topology": "ring"},
            "history": [{"round": 4, "train_loss": 0.4, "accuracy": acc, "loss": 0.3}],
        }
        (tmp_path / f"node-{rank}.json").write_text(json.dumps(node))
        save_checkpoint(
            tmp_path / "models" / f"node-{rank}.pt", {"model": torch.tensor([float(rank), 0.0])}
        )
    s = summarize(tmp_path, exit_codes={0: 0, 1: -9, 2: 0}, wall_seconds=3.0, target_accuracy=0.8)
    for key in (
        "accuracy_mean",
        "accuracy_min",
        "accuracy_max",
        "loss_mean",
        "consensus_distance",
        "rounds",
        "bytes_sent_total",
        "wall_seconds",
        "config",
    ):
        assert key in s, key
    assert s["accuracy_mean"] == pytest.approx(0.85) and s["nodes_failed"] == [1]
    assert s["consensus_distance"] == pytest.approx(1.0)  # models 0 and 2 are 2 apart
    assert s["bytes_sent_total"] == 2000 and s["rounds_to_target"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["nodes_finished"] == [0, 2]
    with pytest.raises(ConfigError, match="no node finished"):
        summarize(tmp_path / "empty")


def test_gossip_run_resumes_from_its_checkpoint(tmp_path, monkeypatch, caplog):
    """One node (a world of one, no peers) in this process: train 3 rounds, then a restart with
    resume=auto continues at round 3 instead of starting over."""
    import logging

    from gossip.runtime.rendezvous import World

    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "reference")
    argv = [
        "--task",
        "digits",
        "--local-steps",
        "2",
        "--eval-samples",
        "50",
        "--log-every",
        "0",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--out",
        str(tmp_path / "out"),
    ]
    first = run.run_node(
        run.config_from_args(parse(run, [*argv, "--rounds", "3"]), environ={}),
        World(rank=0, world_size=1),
    )
    assert (first["rounds"], first["steps"]) == (3, 6)
    assert (tmp_path / "ckpt" / "node-0.pt").exists()
    cfg = run.config_from_args(parse(run, [*argv, "--rounds", "5", "--resume", "auto"]), {})
    with caplog.at_level(logging.INFO, logger="gossip.run"):
        second = run.run_node(cfg, World(rank=0, world_size=1))
    assert "resumed from" in caplog.text and "at round 3" in caplog.text
    assert (second["rounds"], second["steps"]) == (5, 10)
    assert [h["round"] for h in second["history"]] == [4, 5]


def test_gossip_run_follows_the_lr_schedule_by_round(tmp_path, monkeypatch):
    """--lr-schedule reaches the node's optimizer: every round sets lr from the round number."""
    from gossip.runtime.rendezvous import World

    monkeypatch.setenv("GOSSIP_MERGE_BACKEND", "reference")
    seen = []

    def spy(schedule, base, r, rounds):
        seen.append((schedule, r, rounds))
        return base * (rounds - r) / rounds

    monkeypatch.setattr(run, "lr_at", spy)
    argv = ["--task", "digits", "--rounds", "3", "--lr-schedule", "cosine", "--eval-samples",
            "20", "--log-every", "0", "--out", str(tmp_path / "out")]  # fmt: skip
    result = run.run_node(
        run.config_from_args(parse(run, argv), environ={}), World(rank=0, world_size=1)
    )
    assert seen == [("cosine", 0, 3), ("cosine", 1, 3), ("cosine", 2, 3)]
    assert result["rounds"] == 3
