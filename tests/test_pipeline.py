"""What a run writes loads with the transformers pipeline (``pipeline("image-text-to-text", ...)``) and captions as
caption_images.py does, for every family: the card's three-line pipeline snippet run as written, on real-size photos
(an EXIF-rotated JPEG and a PNG among them); the pipeline's model inputs equal the collator's; a merged model too;
and from a Hub repository, where the pipeline would otherwise take the base's processor."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hub_server import TOKEN, USER, HubServer
from huggingface_hub import HfApi, ModelCard, snapshot_download
from packaging.requirements import Requirement
from PIL import Image
from transformers import AutoConfig, pipeline
from transformers.utils.chat_template_utils import Chat

import caption_images
from captioning.families import detect_family
from captioning.images import load_image
from captioning.inference import load_captioner
from captioning.pipeline_usage import EXAMPLE_IMAGE, PIPELINE_TASK, caption_with_pipeline, pipeline_inputs
from captioning.trainer import generation_inputs
from merge_adapter import main as merge_main
from run_captioning import main
from tests.card_snippets import pipeline_snippet
from tests.conftest import FAMILY_FIXTURES, tiny_run_argv
from tests.photos import EXIF_ORIENTATION, write_photo_folder
from tests.test_hub import client_for

pytestmark = [
    pytest.mark.slow,
    # transformers' PaliGemmaProcessor builds its unused `labels` with np.array over a BatchEncoding (their drift).
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"),
]
# Not the family defaults, so that settings that did not reach the pipeline show.
GENERATION = dict(num_beams=2, max_new_tokens=7)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("pipeline-photos"), count=8)


def captioned_photos(folder: Path) -> list[Path]:
    """A landscape JPEG, a JPEG stored sideways with EXIF orientation 6, and a PNG."""
    chosen = [folder / "photo_0000.jpg", folder / "photo_0004.jpg", folder / "photo_0006.png"]
    assert Image.open(chosen[1]).getexif().get(EXIF_ORIENTATION) == 6
    return chosen


def lora_run(model_dir: Path, photos: Path, output: Path, **flags) -> Path:
    main(
        tiny_run_argv(
            model_dir,
            photos,
            output,
            do_eval=False,
            do_predict=False,
            validation_split_percentage=0,
            test_split_percentage=0,
            learning_rate=1e-2,
            **GENERATION,
            **flags,
        )
    )
    return output


def caption_images_captions(model: Path, images: list[Path], output: Path) -> list[str]:
    caption_images.main(["--model", str(model), "--images", *map(str, images), "--output", str(output)])
    return [json.loads(line)["caption"] for line in output.read_text().splitlines()]


def run_pipeline_snippet(code: str, image: Path) -> str:
    """The card's pipeline snippet, as written, on ``image`` (in place of its example image)."""
    assert code.count(json.dumps(EXAMPLE_IMAGE)) == 1
    namespace: dict = {}
    exec(compile(code.replace(json.dumps(EXAMPLE_IMAGE), json.dumps(str(image))), "card pipeline", "exec"), namespace)
    return namespace["caption"]


@pytest.fixture(scope="module", params=FAMILY_FIXTURES)
def run(request, photos, tmp_path_factory) -> SimpleNamespace:
    path = request.getfixturevalue(request.param)
    family = detect_family(AutoConfig.from_pretrained(path))
    root = tmp_path_factory.mktemp(f"pipeline-{family.name}")
    output = lora_run(path, photos, root / "out")
    return SimpleNamespace(family=family, output=output, root=root, images=captioned_photos(photos))


def test_the_cards_pipeline_snippet_captions_as_caption_images_does(run):
    card = (run.output / "README.md").read_text()
    assert ModelCard(card).data.pipeline_tag == PIPELINE_TASK == "image-text-to-text"
    code = pipeline_snippet(card)
    assert len(code.strip().splitlines()) == 3
    settings = json.loads((run.output / "captioning_config.json").read_text())
    assert all(f"{name}={value!r}" in code for name, value in settings["generation"].items())
    expected = caption_images_captions(run.output, run.images, run.root / "captions.jsonl")
    assert [run_pipeline_snippet(code, image) for image in run.images] == expected


def test_the_pipeline_feeds_the_model_what_the_collator_does(run):
    """Same pixels (EXIF-rotated photo upright, PNG on white) and prompt ids as training's generation batches."""
    settings = json.loads((run.output / "captioning_config.json").read_text())
    captioner = load_captioner(run.output, device="cpu")
    pipe = pipeline(PIPELINE_TASK, model=str(run.output), processor=str(run.output))
    for image in run.images:
        row = {"image": load_image(image), "image_index": 0}
        ours = generation_inputs(captioner.collator.collate_generation([row]))
        inputs = pipeline_inputs(run.family, settings["caption_prompt"], str(image))
        theirs = pipe.preprocess(Chat(inputs["text"]) if run.family.chat_template else inputs)  # as __call__ hands it
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"].to(ours["pixel_values"].dtype))
        ids, their_ids = ours["input_ids"], theirs["input_ids"]
        if run.family.name == "blip":  # BLIP's generate writes [DEC] over position 0, whatever the processor put there
            ids, their_ids = ids[:, 1:], their_ids[:, 1:]
        assert torch.equal(ids, their_ids)


def test_a_merged_model_loads_and_captions_the_same(run):
    merged = run.root / "merged"
    merge_main([str(run.output), "--output_dir", str(merged)])
    settings = json.loads((merged / "captioning_config.json").read_text())
    pipe = pipeline(PIPELINE_TASK, model=str(merged), processor=str(merged), **settings["generation"])
    expected = caption_images_captions(run.output, run.images, run.root / "adapter-captions.jsonl")
    got = [caption_with_pipeline(pipe, run.family, settings["caption_prompt"], str(i)) for i in run.images]
    assert got == expected


def test_from_the_hub_the_card_and_the_space_app_caption_as_the_local_run(tiny_idefics3, photos, tmp_path):
    """The base and the adapter pushed with --push_app on a local Hub server: the pushed card's pipeline snippet and
    the pushed Spaces app.py load both by Hub id and caption as caption_images.py does with the local run. Without
    ``processor=`` the pipeline would take the base's processor, which splits images into tiles where the run did
    not."""
    base, repo = f"{USER}/tiny-idefics3", f"{USER}/idefics3-captioner"
    images = captioned_photos(photos)
    with HubServer() as server, client_for(server, tmp_path / "hf-home"):
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo(base)
        api.upload_folder(repo_id=base, folder_path=str(tiny_idefics3))
        output = lora_run(
            tiny_idefics3,
            photos,
            tmp_path / "out",
            push_to_hub=True,
            hub_model_id=repo,
            base_model_id=base,
            push_app=True,
        )
        code = pipeline_snippet(ModelCard.load(repo, token=TOKEN).text)
        assert f'model="{repo}", processor="{repo}"' in code
        snippet_captions = [run_pipeline_snippet(code, image) for image in images]
        space = Path(
            snapshot_download(repo, token=TOKEN, local_dir=tmp_path / "space", allow_patterns=["app.py", "*.txt"])
        )
        app = runpy.run_path(str(space / "app.py"), run_name="space_app")  # what `python app.py` runs, unlaunched
        settings = json.loads((output / "captioning_config.json").read_text())["generation"]
        app_captions = [
            app["caption"](str(image), settings["num_beams"], settings["max_new_tokens"]) for image in images
        ]
        base_processor = pipeline(PIPELINE_TASK, model=repo).processor
    assert server.errors == []
    expected = caption_images_captions(output, images, tmp_path / "captions.jsonl")
    assert snippet_captions == expected and app_captions == expected
    requirements = [Requirement(line).name for line in (space / "requirements.txt").read_text().splitlines()]
    assert {"transformers", "peft", "torch", "gradio"} <= set(requirements)
    assert json.loads((output / "processor_config.json").read_text())["image_processor"]["do_image_splitting"] is False
    assert base_processor.image_processor.do_image_splitting is True
