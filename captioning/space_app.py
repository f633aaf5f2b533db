"""The Spaces-ready app a push adds with --push_app: an ``app.py`` that captions with the pushed model through the
transformers pipeline (no code of this project needed), and the ``requirements.txt`` it runs with. Copied into a
Gradio Space, or run anywhere with ``pip install -r requirements.txt && python app.py``."""

from __future__ import annotations

from pathlib import Path

from captioning.families import family_by_name
from captioning.model_card import python_literal
from captioning.outputs import read_captioning_config
from captioning.pipeline_usage import PIPELINE_TASK, pipeline_inputs

SPACE_FILES = ("app.py", "requirements.txt")
SPACE_REQUIREMENTS = """\
transformers>=5.24,<6
peft>=0.17
torch
torchvision
pillow
num2words
gradio>=5,<7
"""
_IMAGE = "\x00image\x00"  # stands for the image variable while the pipeline inputs are written as Python

TEMPLATE = '''\
"""Caption images with {repo_id}: drop an image, read its caption, with the prompt and generation settings of
training. Copy this file and requirements.txt into a Gradio Space, or run it: pip install -r requirements.txt &&
python app.py"""

import gradio as gr
from transformers import pipeline

MODEL_ID = {model_id}
GENERATION = {generation}

captioner = pipeline({task}, model=MODEL_ID, processor=MODEL_ID)


def caption(image, num_beams, max_new_tokens):
    if image is None:
        return ""
    settings = {{**GENERATION, "num_beams": int(num_beams), "max_new_tokens": int(max_new_tokens)}}
    settings["min_new_tokens"] = min(settings.get("min_new_tokens") or 0, settings["max_new_tokens"])
    result = captioner({inputs}, return_full_text=False, generate_kwargs=settings)
    return result[0]["generated_text"].strip()


demo = gr.Interface(
    caption,
    [
        gr.Image(type="filepath", label="Image"),
        gr.Slider(1, 10, value=GENERATION["num_beams"], step=1, label="Beams"),
        gr.Slider(1, 256, value=GENERATION["max_new_tokens"], step=1, label="Longest caption (tokens)"),
    ],
    gr.Textbox(label="Caption"),
    title={title},
    flagging_mode="never",
)

if __name__ == "__main__":
    demo.launch()
'''


def space_files(output_dir: str | Path, repo_id: str) -> dict[str, bytes]:
    """``app.py`` and ``requirements.txt`` for ``repo_id``, from the run's captioning_config.json (family, prompt and
    generation settings); a folder without one is refused."""
    settings = read_captioning_config(output_dir)
    if settings is None:
        raise ValueError(
            f"--push_app: {output_dir} has no captioning_config.json (the prompt and generation settings the app "
            "captions with); push a run's output_dir, or leave out --push_app."
        )
    family = family_by_name(settings["family"])
    inputs = pipeline_inputs(family, settings.get("caption_prompt", ""), _IMAGE)
    written = ", ".join(f"{name}={python_literal(value)}" for name, value in inputs.items())
    app = TEMPLATE.format(
        repo_id=repo_id,
        model_id=python_literal(repo_id),
        generation=python_literal(settings["generation"]),
        task=python_literal(PIPELINE_TASK),
        inputs=written.replace(python_literal(_IMAGE), "image"),
        title=python_literal(repo_id.rsplit("/", 1)[-1]),
    )
    return {"app.py": app.encode(), "requirements.txt": SPACE_REQUIREMENTS.encode()}
