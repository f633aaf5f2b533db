"""Several machines, simulated on this one: two ``accelerate launch`` "nodes" of one process each meet on the
loopback interface (configs/accelerate/multi_node.yaml, c10d rendezvous, gloo on CPU), train with LoRA on real-size
photos, evaluate and predict. Their metrics and predictions.jsonl are those of one process evaluating the same
adapter, and only machine rank 0 writes outputs: node 1 gets an output folder of its own, as on machines without a
shared disk, and it stays empty. configs/accelerate/slurm_multinode.sh runs as sbatch would run it, with a fake
``srun`` that starts its command once per node with the environment Slurm gives each, and a fake ``scontrol``.

A node lost during training: killed (SIGKILL to its launcher and worker), node 0 stops at once with a message naming
the last complete checkpoint, and ``--resume_from_checkpoint latest`` on both nodes ends with the adapter of the
uninterrupted run; hung (SIGSTOP), node 0 stops after ``--ddp_timeout``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.photos import write_photo_folder
from tests.test_distributed import _env, _flags, _settings, evaluate_alone

ROOT = Path(__file__).resolve().parents[1]
MULTI_NODE = ROOT / "configs" / "accelerate" / "multi_node.yaml"
SLURM_SCRIPT = ROOT / "configs" / "accelerate" / "slurm_multinode.sh"
RUN_LIMIT_S = 600
# 24 epochs x 4 steps: long enough that a node can be stopped well before the end (a step takes ~25 ms here)
TRAINING = dict(num_train_epochs=24, learning_rate=2e-2, lora_target_modules=["query", "key", "value", "dense"])
CHECKPOINTS = dict(save_strategy="steps", save_steps=8)
METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "loss")
OUTPUTS = ("README.md", "adapter_model.safetensors", "predictions.jsonl", "eval_results.json", "trainer_state.json")

pytestmark = pytest.mark.slow


def node_command(rank: int, port: int, flags: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(MULTI_NODE),
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        str(ROOT / "run_captioning.py"),
        *flags,
    ]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_nodes(commands: list[list[str]], logs: list[Path], port: int) -> list[subprocess.Popen]:
    """Start every node, node 0 first: on one machine each launcher takes itself for the rendezvous host, and node 0
    (the host of a real allocation) must claim ``port`` before the others start."""
    processes = []
    for command, log in zip(commands, logs, strict=True):
        if processes:
            deadline = time.monotonic() + 60
            while not listening(port) and processes[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        with open(log, "wb") as output:
            processes.append(subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=output, stderr=subprocess.STDOUT))
    return processes


def signal_node(node: subprocess.Popen, signum: int) -> None:
    """``signum`` to a node's launcher and everything it started (torchrun starts its workers in sessions of their
    own, so the launcher's process group is not enough)."""
    if node.poll() is not None:
        return
    launcher = psutil.Process(node.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # ended meanwhile
            process.send_signal(signum)


def wait_nodes(processes: list[subprocess.Popen], logs: list[Path], limit_s: float = RUN_LIMIT_S) -> list[int]:
    """Wait for every node (``limit_s`` at most: then kill them all and fail); their exit codes."""
    try:
        return [process.wait(timeout=limit_s) for process in processes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the nodes did not finish within {limit_s} s:\n" + logs[0].read_text()[-3000:])
    finally:
        for process in processes:
            if process.poll() is None:
                signal_node(process, signal.SIGKILL)
                process.wait()


def run_nodes(commands: list[list[str]], logs: list[Path], port: int) -> list[int]:
    return wait_nodes(start_nodes(commands, logs, port), logs)


def assert_same_results(many: Path, single: Path) -> None:
    for name, prefix in (("eval_results.json", "eval"), ("predict_results.json", "test")):
        a, b = json.loads((many / name).read_text()), json.loads((single / name).read_text())
        for metric in METRICS:
            assert a[f"{prefix}_{metric}"] == pytest.approx(b[f"{prefix}_{metric}"], rel=1e-6, abs=1e-9), metric
        assert a[f"{prefix}_samples"] == b[f"{prefix}_samples"] == 7
        assert a[f"{prefix}_bleu_1"] > 0  # real captions, not empty strings
    assert (many / "predictions.jsonl").read_text() == (single / "predictions.jsonl").read_text()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"), count=23)  # real-size JPEGs, PNGs, EXIF-rotated


@pytest.fixture(scope="module")
def two_machines(tiny_blip, photos, tmp_path_factory) -> Path:
    """The uninterrupted run: two machines on loopback, each with an output folder of its own (no shared disk, no
    checkpoints). Returns the tmp folder; node0/out holds the run."""
    tmp_path = tmp_path_factory.mktemp("two-machines")
    main_node, other_node = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    common = dict(do_train=True, do_eval=True, do_predict=True, eval_strategy="no", save_strategy="no", **TRAINING)
    port = free_port()
    commands = [
        node_command(rank, port, _flags(tiny_blip, photos, output, **common))
        for rank, output in enumerate((main_node, other_node))
    ]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    codes = run_nodes(commands, logs, port)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    return tmp_path


def test_two_machines_on_loopback_train_and_score_as_one_process(two_machines, photos, tmp_path):
    main_node, other_node = two_machines / "node0" / "out", two_machines / "node1" / "out"
    state = json.loads((main_node / "trainer_state.json").read_text())
    # 9 training images x 3 captions = 27 rows; 2 machines x 4 rows a step = 4 steps an epoch
    assert state["global_step"] == TRAINING["num_train_epochs"] * 4
    assert all((main_node / name).is_file() for name in OUTPUTS)
    assert not other_node.exists() or not any(other_node.iterdir()), sorted(p.name for p in other_node.iterdir())

    alone = tmp_path / "alone"
    evaluate_alone(main_node, photos, alone)
    assert_same_results(main_node, alone)


# --------------------------------------------------------------------------------------------------------------
# A node lost during training. Both nodes write to one output folder, as on a cluster's shared disk: each process
# saves its random state into the checkpoint, and resuming needs them all.
# --------------------------------------------------------------------------------------------------------------

KILLED_TIMEOUT_S = 120  # --ddp_timeout of the killed-node run: node 0 must stop well within it
HUNG_TIMEOUT_S = 15  # --ddp_timeout of the hung-node run: node 0 stops once it has passed
LOST_CONTACT = "captioning.distributed.LostProcessesError: Process 0 of 2 lost contact with the others"


def shared_disk_nodes(model: Path, data: Path, output: Path, port: int, **extra) -> list[list[str]]:
    flags = _flags(model, data, output, do_train=True, eval_strategy="no", **TRAINING, **CHECKPOINTS, **extra)
    return [node_command(rank, port, flags) for rank in (0, 1)]


def stop_node_1_after_a_checkpoint(nodes: list[subprocess.Popen], output: Path, signum: int) -> float:
    """Once the first checkpoint is complete (step 8 of 96), send ``signum`` to node 1; returns when (monotonic)."""
    marker = output / "checkpoint-8" / "checkpoint_complete.json"
    deadline = time.monotonic() + RUN_LIMIT_S
    while not marker.is_file():
        assert all(node.poll() is None for node in nodes), "a node ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.005)
    signal_node(nodes[1], signum)
    return time.monotonic()


def lost_contact_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if LOST_CONTACT in line]
    assert lines, "node 0 did not say it lost contact:\n" + log.read_text()[-4000:]
    return lines[-1]


def test_a_killed_node_stops_the_other_and_both_resume_to_the_uninterrupted_adapter(
    two_machines, tiny_blip, photos, tmp_path
):
    output = tmp_path / "shared" / "out"
    port = free_port()
    commands = shared_disk_nodes(tiny_blip, photos, output, port, ddp_timeout=KILLED_TIMEOUT_S)
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = start_nodes(commands, logs, port)
    killed_at = stop_node_1_after_a_checkpoint(nodes, output, signal.SIGKILL)
    codes = wait_nodes(nodes, logs, limit_s=KILLED_TIMEOUT_S)
    stopped_after = time.monotonic() - killed_at
    assert codes == [1, -signal.SIGKILL], logs[0].read_text()[-4000:]
    assert stopped_after < KILLED_TIMEOUT_S / 4  # gloo notices a dead peer at once, not after the timeout
    assert not (output / "adapter_model.safetensors").exists()  # it really stopped mid-training
    message = lost_contact_line(logs[0])
    assert "Connection closed by peer" in message or "Connection reset by peer" in message, message
    assert f"--ddp_timeout ({KILLED_TIMEOUT_S} s)" in message
    checkpoint = message.split("The last complete checkpoint is ")[1].split(". Once the cause is fixed")[0]
    assert Path(checkpoint).parent == output and (Path(checkpoint) / "checkpoint_complete.json").is_file()
    assert message.endswith("run the same command with --resume_from_checkpoint latest to continue from it.")
    resumed_from = load_file(Path(checkpoint) / "adapter_model.safetensors")

    port = free_port()
    commands = shared_disk_nodes(
        tiny_blip, photos, output, port, ddp_timeout=KILLED_TIMEOUT_S, resume_from_checkpoint="latest"
    )
    logs = [tmp_path / "resumed-node0.log", tmp_path / "resumed-node1.log"]
    codes = run_nodes(commands, logs, port)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert f"Resuming from {checkpoint} (run " in logs[0].read_text()
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == TRAINING["num_train_epochs"] * 4
    expected = load_file(two_machines / "node0" / "out" / "adapter_model.safetensors")
    resumed = load_file(output / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(expected[key], resumed_from[key]) for key in expected)  # training went on after it


def test_a_hung_node_stops_the_other_after_the_ddp_timeout(tiny_blip, photos, tmp_path):
    output = tmp_path / "shared" / "out"
    port = free_port()
    commands = shared_disk_nodes(tiny_blip, photos, output, port, ddp_timeout=HUNG_TIMEOUT_S)
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = start_nodes(commands, logs, port)
    try:
        stopped_at = stop_node_1_after_a_checkpoint(nodes, output, signal.SIGSTOP)  # alive, silent: a hung node
        try:
            code = nodes[0].wait(timeout=HUNG_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"node 0 still waits {HUNG_TIMEOUT_S + 60} s after node 1 hung (--ddp_timeout {HUNG_TIMEOUT_S})"
            )
        waited = time.monotonic() - stopped_at
    finally:
        for node in nodes:  # the hung node, and node 0 if it still waits
            signal_node(node, signal.SIGKILL)
            node.wait()
    assert code == 1, logs[0].read_text()[-4000:]
    # node 0 may have begun waiting for node 1's gradients a moment before node 1 was stopped
    assert HUNG_TIMEOUT_S - 2 <= waited < HUNG_TIMEOUT_S + 30, waited
    message = lost_contact_line(logs[0])
    assert f"(Timed out waiting {HUNG_TIMEOUT_S * 1000}ms for recv operation to complete)" in message, message
    assert f"hung for longer than --ddp_timeout ({HUNG_TIMEOUT_S} s)" in message
    assert f"The last complete checkpoint is {output}{os.sep}checkpoint-" in message


FAKE_SRUN = """#!/bin/bash
# srun --kill-on-bad-exit=1 bash -c CMD, as Slurm runs it on a 2-node allocation: CMD once per node, with that node's
# SLURM_NODEID / SLURM_PROCID; the first failure kills the other node (--kill-on-bad-exit).
echo "$@" > "$FAKE_SLURM_LOG"
[ "$1" = "--kill-on-bad-exit=1" ] || { echo "fake srun: expected --kill-on-bad-exit=1" >&2; exit 2; }
shift
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "$FAKE_SLURM_LOG.node$node" 2>&1 &
    pids+=($!)
    # Both "nodes" are this machine, so each launcher takes itself for the rendezvous host: node 0, the host of a
    # real allocation, must claim the port first (up to 60 s).
    for _ in $(seq 120); do (echo > "/dev/tcp/127.0.0.1/$MAIN_PORT") 2>/dev/null && break; sleep 0.5; done
done
status=0
for pid in "${pids[@]}"; do
    if ! wait "$pid"; then status=1; kill "${pids[@]}" 2>/dev/null; fi
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames NODELIST: every node is this machine. It lists as many names as a large allocation does
# (more than a pipe holds), so that a script reading only the first line must still let it finish writing.
[ "$1 $2" = "show hostnames" ] && { for _ in $(seq 20000); do echo 127.0.0.1; done; exit 0; }
exit 2
"""


def test_the_slurm_script_starts_both_nodes_and_the_run_completes(tiny_blip, photos, tmp_path):
    data = photos
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    config = tmp_path / "run.yaml"
    settings = _settings(
        tiny_blip, data, do_train=True, do_eval=True, do_predict=True, num_train_epochs=1, eval_strategy="no",
        save_strategy="no", report_to="none",
    )  # fmt: skip
    config.write_text(
        "".join(f"{key}: {json.dumps(str(v) if isinstance(v, Path) else v)}\n" for key, v in settings.items())
    )
    output = tmp_path / "out"
    log = tmp_path / "srun.log"
    env = {
        **_env(),
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_GPUS_ON_NODE": "1",
        "MAIN_PORT": str(free_port()),
        "FAKE_SLURM_LOG": str(log),
    }
    result = subprocess.run(
        ["bash", str(SLURM_SCRIPT), str(config), str(output)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_LIMIT_S,
    )  # fmt: skip
    nodes = "\n".join(Path(f"{log}.node{n}").read_text()[-2500:] for n in (0, 1) if Path(f"{log}.node{n}").exists())
    assert result.returncode == 0, result.stderr[-2000:] + nodes
    assert "--machine_rank $SLURM_NODEID" in log.read_text()  # each node's shell expands its own rank
    assert all((output / name).is_file() for name in OUTPUTS)
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # 27 rows, 2 nodes x 4 rows a step
