"""A process or machine lost during training: the processes left stop with a message that names the collective's
error, --ddp_timeout, the last complete checkpoint and how to continue; their own failures stay as they are. The
runs themselves (a node killed, a node hung) are in tests/test_multi_node.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import Seq2SeqTrainer

from captioning.checkpoints import COMPLETE_MARKER
from captioning.distributed import LostProcessesError, lost_contact, lost_contact_message
from captioning.trainer import CaptioningTrainer

# What torch 2.x's gloo raised in tests/test_multi_node.py: a killed peer, a stopped one (after --ddp_timeout 15).
KILLED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
    "[127.0.0.1]:13992. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
    "before reporting an error. GLHF! \U0001f3d6\ufe0f"
)
HUNG = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for "
    "recv operation to complete"
)


@pytest.mark.parametrize(
    "error",
    [RuntimeError(KILLED), RuntimeError(HUNG), torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL")],
    ids=["killed", "hung", "nccl"],
)
def test_a_lost_peer_is_told_from_this_process_failing(error):
    assert lost_contact(error)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("Connection closed by peer"),  # not what a collective raises
        KeyError("pixel_values"),
    ],
)
def test_failures_of_this_process_are_not_blamed_on_others(error):
    assert not lost_contact(error)


def test_the_message_says_who_when_why_and_how_to_continue(tmp_path):
    message = lost_contact_message(
        RuntimeError(KILLED), process=0, processes=16, step=57, timeout_s=600, checkpoint=tmp_path / "checkpoint-40"
    )
    assert message == (
        "Process 0 of 16 lost contact with the others after training step 57 (Connection closed by peer "
        "[127.0.0.1]:13992). Another process or machine of the run failed, or hung for longer than --ddp_timeout "
        "(600 s): its own log holds the cause. The last complete checkpoint is "
        f"{tmp_path / 'checkpoint-40'}. Once the cause is fixed, run the same command with --resume_from_checkpoint "
        "latest to continue from it."
    )


def test_without_a_checkpoint_the_message_says_the_run_starts_over():
    message = lost_contact_message(RuntimeError(HUNG), process=3, processes=4, step=2, timeout_s=1800, checkpoint=None)
    assert "(Timed out waiting 15000ms for recv operation to complete)" in message
    assert "hung for longer than --ddp_timeout (1800 s)" in message
    assert message.endswith("No checkpoint was saved completely yet, so the run starts over when run again.")


def _trainer(tmp_path, world_size: int, error: Exception) -> CaptioningTrainer:
    """A CaptioningTrainer (not built: only what ``train`` reads) whose Trainer loop raises ``error``."""
    trainer = CaptioningTrainer.__new__(CaptioningTrainer)
    trainer.args = SimpleNamespace(
        save_total_limit=2, world_size=world_size, process_index=1, ddp_timeout=30, output_dir=str(tmp_path)
    )
    trainer.state = SimpleNamespace(global_step=12)
    trainer.run_id = "run-a"
    trainer.loop_error = error
    return trainer


@pytest.fixture
def failing_loop(monkeypatch):
    def train(self, *args, **kwargs):
        raise self.loop_error

    monkeypatch.setattr(Seq2SeqTrainer, "train", train)


def test_training_that_loses_a_peer_stops_with_the_message(tmp_path, failing_loop):
    for step, run_id in ((8, "run-a"), (10, "run-a"), (11, None), (20, "run-b")):  # 11: incomplete; 20: another run
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if run_id is not None:
            (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": step, "run_id": run_id}))
    trainer = _trainer(tmp_path, world_size=2, error=RuntimeError(HUNG))
    with pytest.raises(LostProcessesError) as raised:
        trainer.train()
    assert str(raised.value).startswith("Process 1 of 2 lost contact with the others after training step 12 (Timed")
    assert f"The last complete checkpoint is {tmp_path / 'checkpoint-10'}." in str(raised.value)
    assert raised.value.__cause__ is trainer.loop_error  # the collective's own traceback is kept
    assert trainer.args.save_total_limit == 2  # restored as after any training


@pytest.mark.parametrize(
    ("world_size", "error"),
    [(2, RuntimeError("CUDA out of memory")), (1, RuntimeError(KILLED))],
    ids=["own-failure", "one-process"],
)
def test_other_failures_stay_as_they_are(tmp_path, failing_loop, world_size, error):
    trainer = _trainer(tmp_path, world_size=world_size, error=error)
    with pytest.raises(RuntimeError) as raised:
        trainer.train()
    assert raised.value is error
