#!/usr/bin/env python
"""A web page that captions your images with a fine-tuned captioner: drop an image, read its caption, with the
prompt and generation settings of training (beams and length adjustable); with ``--compare``, the base model's
caption beside it. Runs offline, on CPU or GPU, for every family this project trains.

    python app.py --model outputs/demo                 # a run's output_dir, a merged model, or a Hub id
    python app.py --model outputs/demo --compare       # and the base model's caption beside it
    python app.py --help

The page is served on http://127.0.0.1:7860 (``--host`` / ``--port``); nothing leaves the machine unless
``--share`` asks Gradio for a public link. The run's test images (those of its predictions.jsonl, when its data
folder is on this machine) are offered as examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from peft import PeftModel

from captioning.inference import Captioner, add_model_arguments, load_captioner, setup_cli_logging

logger = logging.getLogger("app")

MAX_BEAMS = 10
MAX_TOKENS_LIMIT = 256
MAX_EXAMPLES = 12
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline
CSS = "#caption textarea, #base-caption textarea {font-size: 1.15rem; line-height: 1.5}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="Also caption with the base model (same prompt and settings): the adapter switched off, or for a full "
        "model the base_model of its captioning_config.json.",
    )
    parser.add_argument(
        "--examples",
        nargs="*",
        help="Example images offered on the page (default: the run's test images when its data folder is here).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (default: 127.0.0.1, this machine).")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on (default: 7860).")
    parser.add_argument(
        "--share", action="store_true", help="Ask Gradio for a temporary public link (sends traffic via its servers)."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: must be between 1 and 65535.")
    examples = [str(path) for path in args.examples] if args.examples is not None else run_test_images(args.model)
    missing = [path for path in examples if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"--examples: no such image file: {', '.join(missing[:3])}")
    setup_cli_logging("app")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports from a user's machine
    captioner = load_captioner(args.model, base_model=args.base_model, device=args.device, dtype=args.dtype)
    base = base_captions(captioner, args) if args.compare else None
    demo = build_demo(captioner, base, examples, title=model_title(args.model))
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share, show_error=True, theme=theme(), css=CSS
    )


def model_title(model: str) -> str:
    return Path(model).resolve().name if Path(model).exists() else model


def run_test_images(model: str) -> list[str]:
    """The images of a run's predictions.jsonl, found in the local data folder its card_context.json names; none
    when the model is not a local run or its data is elsewhere."""
    folder = Path(model)
    predictions, context = folder / "predictions.jsonl", folder / "card_context.json"
    if not predictions.is_file() or not context.is_file():
        return []
    data_paths = json.loads(context.read_text(encoding="utf-8")).get("data_paths") or []
    images = []
    for line in predictions.read_text(encoding="utf-8").splitlines()[:MAX_EXAMPLES]:
        name = json.loads(line)["image"]
        found = next((Path(root) / name for root in data_paths if (Path(root) / name).is_file()), None)
        if found is not None:
            images.append(str(found))
    return images


def base_captions(captioner: Captioner, args) -> Callable[..., str]:
    """Captions of the base model with the run's prompt and settings: for an adapter, the same model with the
    adapter switched off; for a full model, the base its captioning_config.json names, loaded beside it."""
    if isinstance(captioner.model, PeftModel):
        model = captioner.model

        def caption(path: str, **settings) -> str:
            with model.disable_adapter():
                return captioner.caption([path], **settings)[0]

        return caption
    settings = (
        json.loads((Path(args.model) / "captioning_config.json").read_text()) if Path(args.model).is_dir() else {}
    )
    base_model = args.base_model or settings.get("base_model")
    if not base_model:
        raise ValueError(f"--compare: {args.model} does not name its base model; pass --base_model ID_OR_PATH.")
    base = load_captioner(base_model, device=args.device, dtype=args.dtype, caption_prompt=captioner.caption_prompt)
    base.generation_kwargs = dict(captioner.generation_kwargs)
    return lambda path, **settings: base.caption([path], **settings)[0]


def build_demo(captioner: Captioner, base: Callable[..., str] | None, examples: list[str], title: str):
    """The page: the image on the left (upload, paste, or an example), the captions and settings on the right."""
    import gradio as gr

    settings = captioner.generation_settings()

    def caption(path: str | None, num_beams: float, max_new_tokens: float):
        if path is None:
            return ("", "") if base is not None else ""
        chosen = dict(num_beams=int(num_beams), max_new_tokens=int(max_new_tokens))
        fine_tuned = captioner.caption([path], **chosen)[0]
        return (fine_tuned, base(path, **chosen)) if base is not None else fine_tuned

    with gr.Blocks(title=f"{title} captioner") as demo:
        prompt = f", prompt `{captioner.caption_prompt}`" if captioner.caption_prompt else ""
        gr.Markdown(
            f"# {title}\nDrop or paste an image: it is captioned with the prompt and generation settings of "
            f"training ({captioner.family.label}{prompt})."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                # type="filepath": the uploaded file itself, decoded as caption_images.py decodes files.
                image = gr.Image(
                    type="filepath", label="Image", sources=["upload", "clipboard"], height=380, elem_id="image"
                )
            with gr.Column(scale=1):
                outputs = [gr.Textbox(label="Fine-tuned caption", lines=2, elem_id="caption", interactive=False)]
                if base is not None:
                    outputs.append(
                        gr.Textbox(label="Base model caption", lines=2, elem_id="base-caption", interactive=False)
                    )
                with gr.Accordion("Generation settings", open=False):
                    beams = gr.Slider(1, MAX_BEAMS, value=settings["num_beams"], step=1, label="Beams")
                    length = gr.Slider(
                        1,
                        max(MAX_TOKENS_LIMIT, settings["max_new_tokens"]),
                        value=settings["max_new_tokens"],
                        step=1,
                        label="Longest caption (tokens)",
                    )
                button = gr.Button("Caption again", variant="primary")
        if examples:
            gr.Examples(examples=[[path] for path in examples], inputs=image, label="Test images of the run")
        for event in (image.change, button.click):
            event(caption, inputs=[image, beams, length], outputs=outputs)
    return demo


def theme():
    import gradio as gr

    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])


if __name__ == "__main__":
    main()
