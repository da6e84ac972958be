"""Real torchrun jobs of ``python -m training.train`` on the CPU, kept to a few steps: ranks stay in step,
two simulated nodes meet on 127.0.0.1, and a crashed rank, a NaN loss or a hung collective fails the
job quickly with the cause named and no process left behind."""
import json
import time

import pytest

from training.launch import JOB_ENV, JobError, Topology, first_failure, free_port, job_processes, run_job

SMALL = [
    "--device",
    "cpu",
    "--train-limit",
    "16",
    "--val-limit",
    "8",
    "--batch-size",
    "2",
    "--eval-every",
    "0",
    "--threads",
    "1",
]


def job(tmp_path, topology, *extra, timeout=240.0):
    lines = []
    out = tmp_path / "out"
    wall = run_job(
        Topology.parse(topology),
        [*SMALL, "--output-dir", str(out), *extra],
        tmp_path / "logs",
        timeout,
        on_line=lines.append,
    )
    return wall, json.loads((out / "result.json").read_text()), lines


def no_job_left():
    import os

    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if JOB_ENV.encode() + b"=" in f.read():
                        return False
            except OSError:
                continue
    return True


def test_two_ranks_train_in_step(tmp_path):
    wall, result, lines = job(tmp_path, "1x2", "--max-steps", "3")
    assert result["world_size"] == 2 and result["steps"] == 3 and result["backend"] == "gloo"
    assert len(result["param_digests"]) == 2 and len(set(result["param_digests"])) == 1
    assert result["samples"] == 3 * 2 * 2
    assert 0 < result["core_time"] <= result["train_time"] < result["e2e_time"] <= wall
    assert len(result["curve"]) == 1 and 0 <= result["curve"][0]["mAP"] <= 1
    assert any(line.startswith("epoch 0 step 1/") for line in lines), lines
    assert no_job_left()


def test_two_simulated_nodes_meet_on_localhost(tmp_path):
    _, result, _ = job(tmp_path, "2x1", "--max-steps", "2")
    assert result["world_size"] == 2 and result["nnodes"] == 2 and len(set(result["param_digests"])) == 1
    assert (tmp_path / "logs" / "node0.log").is_file() and (tmp_path / "logs" / "node1.log").is_file()


def test_a_crashed_rank_fails_the_job_quickly_with_its_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(JobError) as info:
        job(tmp_path, "2x1", "--max-steps", "50", "--fail-at", "1:1:crash")
    assert "injected crash on rank 1 at step 1" in str(info.value)
    assert time.monotonic() - start < 90
    assert no_job_left()


def test_a_nan_loss_stops_the_job_naming_the_step_and_terms(tmp_path):
    with pytest.raises(JobError) as info:
        job(tmp_path, "1x2", "--max-steps", "50", "--fail-at", "0:2:nan")
    assert (
        "NonFiniteLossError" in str(info.value) and "step 2" in str(info.value) and "loss_giou=nan" in str(info.value)
    )
    assert no_job_left()


def test_a_hung_rank_is_bounded_by_the_collective_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(JobError) as info:
        job(tmp_path, "1x2", "--max-steps", "50", "--fail-at", "1:1:hang", "--dist-timeout", "10")
    assert time.monotonic() - start < 120
    assert "rank 1 hung (last in step 1, forward and loss): rank(s) 0 timed out waiting in step 1, backward" \
        in str(info.value), str(info.value)
    assert no_job_left()


def test_ranks_die_with_a_killed_launcher(tmp_path):
    import os
    import signal
    import subprocess
    import uuid

    from training.launch import torchrun_command

    job_id = uuid.uuid4().hex
    out = tmp_path / "out"
    launcher = subprocess.Popen(
        torchrun_command(Topology.parse("1x2"), 0, 29731, [*SMALL, "--output-dir", str(out), "--max-steps", "500"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, JOB_ENV: job_id},
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((out / "ranks" / f"rank{r}.json").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and launcher.poll() is None, "the ranks never started training"
            time.sleep(0.5)
        ranks = [pid for pid in job_processes(job_id) if pid != launcher.pid]
        assert len(ranks) >= 2, ranks
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 15
        while job_processes(job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not job_processes(job_id), "ranks outlived their launcher"
    finally:
        for pid in job_processes(job_id):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def test_a_job_past_its_timeout_is_stopped(tmp_path):
    with pytest.raises(JobError, match="timed out after 20s"):
        job(tmp_path, "1x1", "--max-steps", "50", "--fail-at", "0:0:hang", timeout=20)
    assert no_job_left()


def test_first_failure_prefers_the_root_cause():
    lines = [
        "noise",
        "RuntimeError: secondary",
        "Root Cause (first observed failure):",
        "[0]:",
        "  rank      : 1",
        "  error: boom",
        "=" * 10,
    ]
    text = first_failure(lines)
    assert "rank      : 1" in text and "RuntimeError: secondary" in text


def test_topology_names():
    t = Topology.parse("2x8")
    assert (t.nnodes, t.nproc_per_node, t.world_size, t.local_node_ranks()) == (2, 8, 16, [0, 1])
    assert Topology.parse("2x8", node_rank=1).local_node_ranks() == [1]
    with pytest.raises(ValueError, match="expected <nodes>x<devices per node>"):
        Topology.parse("8")
    assert job_processes("no-such-job") == []


def test_a_node_whose_peers_never_come_fails_within_the_rendezvous_timeout_naming_the_options(tmp_path):
    lonely = Topology.parse("2x1", node_rank=1, master_port=free_port(), rendezvous_timeout=5)
    start = time.monotonic()
    with pytest.raises(JobError) as failed:
        run_job(lonely, [*SMALL, "--output-dir", str(tmp_path / "out"), "--max-steps", "1"], tmp_path / "logs",
                timeout_s=120)
    assert time.monotonic() - start < 90, "the node waited past its rendezvous timeout"
    assert "(--node-rank 1 of --nnodes 2, meeting at --master-addr 127.0.0.1 --master-port" in str(failed.value)
    assert "within 5 s)" in str(failed.value) and no_job_left()
