"""Shared pieces of the benchmarks: a BLIP-base-shaped checkpoint with random weights and a real WordPiece tokenizer,
a synthetic JPEG caption set (5 captions per image), the project's LoRA loading, machine facts and the JSON result.

Nothing here downloads anything: models are built from configs, images are drawn from seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the scripts run as `python benchmarks/x.py`; the project modules live above
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor  # noqa: E402

from captioning.arguments import LoraArguments, ModelArguments  # noqa: E402
from captioning.families import BLIP  # noqa: E402
from captioning.modeling import load_config, load_model, load_processor  # noqa: E402
from captioning.sources.core import LOCAL_FEATURES  # noqa: E402
from captioning.tiny_models import tiny_image_processor  # noqa: E402

BLIP_BASE_VOCAB_SIZE = 30524  # bert-base-uncased's 30522 + [DEC] + [ENC], as in Salesforce/blip-image-captioning-base
CAPTIONS_PER_IMAGE = 5  # Flickr8k / COCO
FLICKR8K_IMAGES = 8091  # photos in Flickr8k's image folder (its splits: 6,000 training, 1,000 validation, 1,000 test)
SOURCE_IMAGE_SIZE = (500, 375)  # a typical Flickr8k photo (width, height)

# Caption words; every word is one WordPiece token of the benchmark tokenizer (as most Flickr8k words are in BERT's).
DETERMINERS = "a the one two three some".split()
ADJECTIVES = (
    "red green blue yellow black white grey brown orange pink purple small large big little young old tall short "
    "wet dry sunny snowy muddy grassy rocky sandy busy empty crowded wooden shiny dark bright happy"
).split()
NOUNS = (
    "dog dogs cat man woman boy girl child children person people player team bike bicycle car truck bus horse "
    "ball frisbee stick toy shirt jacket hat helmet dress street road field park beach ocean water lake river pool "
    "grass snow sand hill mountain rock wall fence building bench tree trees crowd camera kite skateboard surfboard"
).split()
VERBS = (
    "running jumping sitting standing walking playing riding climbing swimming holding carrying throwing catching "
    "looking smiling wearing eating drinking lying resting waiting posing"
).split()
PREPOSITIONS = "on in with at near behind under over through across beside along into".split()
CONNECTIVES = "and while is are of".split()
WORDS = tuple(dict.fromkeys(DETERMINERS + ADJECTIVES + NOUNS + VERBS + PREPOSITIONS + CONNECTIVES))


# --------------------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------------------


def build_tokenizer(words=WORDS) -> BertTokenizer:
    """A real BERT WordPiece tokenizer over ``words``, its vocabulary filled with ``[unused*]`` entries to BLIP-base's
    30,524 ids ([DEC] at 30522 as in BLIP), so the LM head and embeddings keep BLIP-base's size."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words)]
    vocab += [f"[unused{i}]" for i in range(BLIP_BASE_VOCAB_SIZE - 2 - len(vocab))]
    vocab += ["[DEC]", "[ENC]"]
    assert len(vocab) == BLIP_BASE_VOCAB_SIZE
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, bos_token="[DEC]")


def blip_config(tokenizer, *, image_size: int = 384, hidden: int = 768, layers: int = 12) -> BlipConfig:
    """BlipConfig's defaults are BLIP-base (ViT-B/16, BERT-base decoder with cross-attention); only the token ids
    (ours), the image size and, for smaller variants, the width/depth are set."""
    text_config = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(image_size=image_size, patch_size=16)
    if hidden != 768 or layers != 12:
        heads = max(1, hidden // 64)
        sizes = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers)
        text_config.update(sizes, num_attention_heads=heads, encoder_hidden_size=hidden)
        vision_config.update(sizes, num_attention_heads=heads)
    return BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=min(hidden, 512))


def blip_feature_shape(config: BlipConfig) -> tuple[int, int]:
    """What --cache_image_features stores per image for BLIP: the vision tower's ``last_hidden_state``, one token
    per patch plus the class token, each ``hidden_size`` wide ((577, 768) for BLIP-base at 384 px)."""
    vision = config.vision_config
    return ((vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size)


def build_checkpoint(
    output_dir: str | Path, *, image_size: int = 384, hidden: int = 768, layers: int = 12, seed: int = 0
) -> Path:
    """Save a random-weight BLIP captioner (BLIP-base dims by default) + processor, loadable like a Hub checkpoint."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    config = blip_config(tokenizer, image_size=image_size, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(output_dir)
    BlipProcessor(image_processor=tiny_image_processor(image_size), tokenizer=tokenizer).save_pretrained(output_dir)
    del model
    return output_dir


def load_lora_model(checkpoint: str | Path, *, lora_r: int = 16, load_in_8bit: bool = False):
    """The project's own loading path: LoRA r 16 / alpha 32 / dropout 0.05 on the text decoder's query/value
    (the seed-004 recipe, BLIP's family default), optionally on 8-bit base weights. Returns (model, processor)."""
    model_args = ModelArguments(model_name_or_path=str(checkpoint))
    lora_args = LoraArguments(
        use_lora=True,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        lora_dropout=0.05,
        lora_target_modules=["query", "value"],
        load_in_8bit=load_in_8bit,
    )
    config = load_config(model_args)
    model = load_model(model_args, lora_args, config, BLIP)
    return model, load_processor(model_args)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def make_caption(rng: np.random.Generator) -> str:
    """A caption of 10-15 words ("a young dog running on the grassy field near two white trees ...")."""
    target = int(rng.integers(10, 16))

    def pick(words):
        return str(words[int(rng.integers(len(words)))])

    words = [pick(DETERMINERS[:2]), pick(ADJECTIVES), pick(NOUNS), pick(VERBS)]
    while len(words) < target:
        phrase = [pick(PREPOSITIONS), pick(DETERMINERS), pick(ADJECTIVES), pick(NOUNS)]
        if rng.random() < 0.3:
            phrase = [pick(CONNECTIVES), pick(DETERMINERS), pick(NOUNS), pick(VERBS)]
        words += phrase
    return " ".join(words[:target])


def make_image(rng: np.random.Generator, size: tuple[int, int] = SOURCE_IMAGE_SIZE) -> Image.Image:
    """A photo-like RGB image: smooth colour field, a few shapes and sensor noise (so JPEG sizes are realistic)."""
    width, height = size
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, size=(height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(
    root: str | Path, num_images: int, captions_per_image: int = CAPTIONS_PER_IMAGE, seed: int = 0
) -> list[dict]:
    """JPEG files (quality 90) + ``metadata.jsonl`` (the project's image-folder layout: ``file_name`` + a list of
    captions). Returns the rows ``{"image": path, "references": [...], "image_id": name}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, lines = [], []
    for i in range(num_images):
        name = f"img_{i:05d}.jpg"
        make_image(rng).save(root / name, quality=90)
        captions = [make_caption(rng) for _ in range(captions_per_image)]
        rows.append({"image": str(root / name), "references": captions, "image_id": name})
        lines.append(json.dumps({"file_name": name, "caption": captions}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return rows


def per_image_dataset(rows: list[dict]) -> datasets.Dataset:
    """The per-image ``datasets.Dataset`` that ``CaptionPairs`` / ``CaptionImages`` view (as load_caption_splits
    returns it for local files)."""
    columns = {key: [row[key] for row in rows] for key in ("image", "references", "image_id")}
    return datasets.Dataset.from_dict(columns, features=LOCAL_FEATURES)


# --------------------------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="Sub-minute smoke run (tiny sizes; figures meaningless).")
    parser.add_argument("--json_out", default=None, help="Also write the result JSON to this file.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: CPU count).")
    parser.add_argument("--workdir", default=None, help="Where to build the checkpoint and images (default: temp).")
    return parser


def set_threads(threads: int | None) -> int:
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def cpu_supports_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls faster than fp32 on this CPU (otherwise autocast bf16 only slows it)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_fast_bf16() else "fp32"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": "cpu",
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def model_description(quick: bool) -> str:
    if quick:
        return "tiny BLIP (hidden 64, 2 layers, 64 px): smoke run, figures meaningless"
    return "BLIP-base dims (ViT-B/16 + BERT-base decoder with cross-attention, vocab 30524), random weights"


def median(values) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: VmHWM from /proc (its own address space only), else ru_maxrss.

    ``ru_maxrss`` of a freshly spawned child can start at the parent's RSS (Linux keeps the high-water mark of the
    address space replaced by exec), so it is only the fallback where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def emit(result: dict, json_out: str | None) -> None:
    """The result as ONE JSON line, the last line of stdout (and into ``json_out`` when given)."""
    line = json.dumps(result, sort_keys=False)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)
