"""Several machines, simulated on this one: two ``accelerate launch`` "nodes" of one process each meet on the
loopback interface (configs/accelerate/multi_node.yaml, c10d rendezvous, gloo on CPU), train with LoRA on real-size
photos, evaluate and predict. Their metrics and predictions.jsonl are those of one process evaluating the same
adapter, and only machine rank 0 writes outputs: node 1 gets an output folder of its own, as on machines without a
shared disk, and it stays empty. configs/accelerate/slurm_multinode.sh runs as sbatch would run it, with a fake
``srun`` that starts its command once per node with the environment Slurm gives each, and a fake ``scontrol``."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.photos import write_photo_folder
from tests.test_distributed import _env, _flags

ROOT = Path(__file__).resolve().parents[1]
MULTI_NODE = ROOT / "configs" / "accelerate" / "multi_node.yaml"
SLURM_SCRIPT = ROOT / "configs" / "accelerate" / "slurm_multinode.sh"
RUN_LIMIT_S = 600
TRAINING = dict(num_train_epochs=8, learning_rate=2e-2, lora_target_modules=["query", "key", "value", "dense"])
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


def run_nodes(commands: list[list[str]], logs: list[Path], port: int) -> list[int]:
    """Start every node, node 0 first: on one machine each launcher takes itself for the rendezvous host, and node 0
    (the host of a real allocation) must claim ``port`` before the others start. Wait for all (RUN_LIMIT_S at most:
    then kill them and fail); their exit codes."""
    processes = []
    for command, log in zip(commands, logs, strict=True):
        if processes:
            deadline = time.monotonic() + 60
            while not listening(port) and processes[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        with open(log, "wb") as output:
            processes.append(subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=output, stderr=subprocess.STDOUT))
    try:
        return [process.wait(timeout=RUN_LIMIT_S) for process in processes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the nodes did not finish within {RUN_LIMIT_S} s:\n" + logs[0].read_text()[-3000:])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def evaluate_alone(model: Path, data: Path, output: Path) -> None:
    flags = _flags(model, data, output, do_eval=True, do_predict=True)
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_captioning.py"), *flags],
        env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=RUN_LIMIT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]


def assert_same_results(many: Path, single: Path) -> None:
    for name, prefix in (("eval_results.json", "eval"), ("predict_results.json", "test")):
        a, b = json.loads((many / name).read_text()), json.loads((single / name).read_text())
        for metric in METRICS:
            assert a[f"{prefix}_{metric}"] == pytest.approx(b[f"{prefix}_{metric}"], rel=1e-6, abs=1e-9), metric
        assert a[f"{prefix}_samples"] == b[f"{prefix}_samples"] == 7
        assert a[f"{prefix}_bleu_1"] > 0  # real captions, not empty strings
    assert (many / "predictions.jsonl").read_text() == (single / "predictions.jsonl").read_text()


def test_two_machines_on_loopback_train_and_score_as_one_process(tiny_blip, tmp_path):
    data = write_photo_folder(tmp_path / "data", count=23)  # real-size JPEGs (and PNGs, EXIF-rotated ones)
    main_node, other_node = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    common = dict(do_train=True, do_eval=True, do_predict=True, eval_strategy="no", save_strategy="no", **TRAINING)
    port = free_port()
    commands = [
        node_command(rank, port, _flags(tiny_blip, data, output, **common))
        for rank, output in enumerate((main_node, other_node))
    ]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    codes = run_nodes(commands, logs, port)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    state = json.loads((main_node / "trainer_state.json").read_text())
    # 9 training images x 3 captions = 27 rows; 2 machines x 4 rows a step = 4 steps an epoch
    assert state["global_step"] == TRAINING["num_train_epochs"] * 4
    assert all((main_node / name).is_file() for name in OUTPUTS)
    assert not other_node.exists() or not any(other_node.iterdir()), sorted(p.name for p in other_node.iterdir())

    alone = tmp_path / "alone"
    evaluate_alone(main_node, data, alone)
    assert_same_results(main_node, alone)


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


def test_the_slurm_script_starts_both_nodes_and_the_run_completes(tiny_blip, tmp_path):
    data = write_photo_folder(tmp_path / "data", count=23)  # real-size JPEGs (and PNGs, EXIF-rotated ones)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    config = tmp_path / "run.yaml"
    config.write_text(
        "\n".join(
            f"{key}: {json.dumps(str(value) if isinstance(value, Path) else value)}"
            for key, value in dict(
                model_name_or_path=tiny_blip,
                dataset_dir=data,
                validation_split_percentage=30,
                test_split_percentage=30,
                do_train=True,
                do_eval=True,
                do_predict=True,
                num_train_epochs=1,
                per_device_train_batch_size=4,
                per_device_eval_batch_size=2,
                max_new_tokens=6,
                dataloader_num_workers=0,
                compute_meteor=False,
                eval_strategy="no",
                save_strategy="no",
                report_to="none",
            ).items()
        )
        + "\n"
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
