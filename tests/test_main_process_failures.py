"""Work only the main process does (image scan, image cache, scoring): a failure there reaches every process, which
stops with the same message instead of waiting in a collective until the timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

import run_captioning
from captioning import distributed, scan
from captioning.arguments import parse_args, to_argv
from captioning.distributed import MainProcessError, run_on_main
from captioning.families import BLIP
from captioning.trainer import CaptioningTrainer
from tests.conftest import free_port, make_caption_folder

ROOT = Path(__file__).resolve().parents[1]


class FakeProcesses:
    """Process ``rank`` of two; ``broadcast_object_list`` hands out what the main process sent (``sent``)."""

    def __init__(self, monkeypatch, rank: int, sent=None):
        self.rank, self.sent, self.broadcasts = rank, sent, []
        state = SimpleNamespace(num_processes=2, is_main_process=rank == 0, process_index=rank)
        monkeypatch.setattr(distributed, "PartialState", lambda: state)
        monkeypatch.setattr(distributed, "broadcast_object_list", self.broadcast)
        monkeypatch.setattr(scan, "PartialState", lambda: state)
        monkeypatch.setattr(run_captioning, "PartialState", lambda: state)

    def broadcast(self, objects: list, from_process: int = 0) -> list:
        assert from_process == 0
        if self.rank == 0:
            self.broadcasts.append(list(objects))
        else:
            objects[0] = self.sent
        return objects


def fail(message: str):
    raise OSError(message)


def test_the_main_process_tells_the_others_before_raising(monkeypatch):
    processes = FakeProcesses(monkeypatch, rank=0)
    with pytest.raises(OSError, match="disk full"):
        run_on_main(fail, "disk full", what="Preprocessing the images")
    assert processes.broadcasts == [[(False, "OSError: disk full")]]


def test_the_other_processes_stop_with_the_main_process_message(monkeypatch):
    FakeProcesses(monkeypatch, rank=1, sent=(False, "OSError: disk full"))
    ran = []
    with pytest.raises(
        MainProcessError, match=r"^Preprocessing the images: the main process failed, .*: OSError: disk full$"
    ):
        run_on_main(ran.append, 1, what="Preprocessing the images")
    assert ran == []  # only the main process runs the work


def test_every_process_gets_the_main_process_result(monkeypatch):
    processes = FakeProcesses(monkeypatch, rank=0)
    assert run_on_main(dict, a=1) == {"a": 1}
    (sent,) = processes.broadcasts[0]
    FakeProcesses(monkeypatch, rank=1, sent=sent)
    assert run_on_main(fail, "never called") == {"a": 1}


def test_a_result_that_cannot_be_pickled_is_shared_as_a_failure(monkeypatch):
    processes = FakeProcesses(monkeypatch, rank=0)
    with pytest.raises(Exception, match="pickle"):
        run_on_main(lambda: lambda: None)
    assert processes.broadcasts[0][0][0] is False


def test_one_process_just_calls(monkeypatch):
    monkeypatch.setattr(distributed, "broadcast_object_list", lambda *args, **kwargs: pytest.fail("broadcast"))
    assert run_on_main(sum, [1, 2]) == 3
    with pytest.raises(OSError, match="x"):
        run_on_main(fail, "x")


def test_a_scan_failure_of_the_main_process_stops_the_others(monkeypatch):
    FakeProcesses(monkeypatch, rank=1, sent=(False, "RuntimeError: An image-scan worker died"))
    split = datasets.Dataset.from_dict({"image": ["a.png"], "references": [["x"]], "image_id": ["a"]})
    with pytest.raises(MainProcessError, match="Checking the images: the main process failed.*worker died"):
        scan.scan_splits_once({"train": split}, num_workers=0)


def test_an_image_cache_failure_of_the_main_process_stops_the_others(monkeypatch, caption_folder, tmp_path):
    FakeProcesses(monkeypatch, rank=1, sent=(False, "OSError: Preprocessing 12 train images needs 9.0 GiB"))
    built = []
    monkeypatch.setattr(run_captioning, "build_image_cache", lambda split, *args, **kwargs: built.append(split))
    args = parse_args(to_argv(model_name_or_path="m", dataset_dir=caption_folder, output_dir=tmp_path, do_train=True))
    splits = {"train": datasets.Dataset.from_dict({"image": ["a.png"], "references": [["x"]], "image_id": ["a"]})}
    with pytest.raises(MainProcessError, match="Preprocessing the images: the main process failed.*9.0 GiB"):
        run_captioning.preprocess_images(args, splits, image_processor=None, family=BLIP)
    assert built == []  # no process starts a cache of its own while the main one failed


def test_a_scoring_failure_of_the_main_process_reaches_the_others(monkeypatch):
    def scorer(captions, references):
        raise ValueError("Got 2 predictions but 1 reference lists")

    processes = FakeProcesses(monkeypatch, rank=0)
    trainer = SimpleNamespace(scorer=scorer)
    with pytest.raises(ValueError, match="Got 2 predictions"):
        CaptioningTrainer.score(trainer, ["a", "b"], [["a"]])
    assert processes.broadcasts == [[(False, "ValueError: Got 2 predictions but 1 reference lists")]]


# --------------------------------------------------------------------------------------------------------------
# Two real processes, started one by one as srun or a second machine would (no torchrun agent to end the other)
# --------------------------------------------------------------------------------------------------------------


def run_ranks(command: list[str], timeout: float) -> list[tuple[int, str]]:
    """Start ``command`` as rank 0 and rank 1 of a 2-process job; returns (exit code, output) of each. Fails the
    test, killing both process groups, when they are not all done within ``timeout`` seconds."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = str(port)
        processes.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )  # fmt: skip
        )
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            results.append((process.returncode, output))
    except subprocess.TimeoutExpired:
        outputs = []
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            outputs.append(process.communicate()[0][-3000:])
        pytest.fail(f"Hung: not all processes exited within {timeout:.0f} s (killed).\n" + "\n---\n".join(outputs))
    return results


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_scan_that_fails_on_the_main_process_stops_both_processes_with_its_message(tiny_blip, tmp_path):
    data = make_caption_folder(tmp_path / "data", num_images=12)
    output = tmp_path / "out"
    (output / "data_report.json").mkdir(parents=True)  # only the main process writes it: the scan fails there only
    (output / "data_report.json" / "keep").write_text("")
    flags = to_argv(
        model_name_or_path=tiny_blip,
        dataset_dir=data,
        output_dir=output,
        do_train=True,
        preprocessing_num_workers=0,
        dataloader_num_workers=0,
        compute_meteor=False,
        report_to="none",
    )
    started = time.monotonic()
    (code0, log0), (code1, log1) = run_ranks([sys.executable, "run_captioning.py", *flags], timeout=120)
    assert code0 != 0 and code1 != 0, log0[-3000:] + log1[-3000:]
    assert "IsADirectoryError" in log0
    assert "MainProcessError: Checking the images: the main process failed" in log1, log1[-3000:]
    assert "IsADirectoryError" in log1 and "data_report.json" in log1
    assert time.monotonic() - started < 120
