"""A small Florence-2 checkpoint (native ``Florence2ForConditionalGeneration``) built from configs, with a byte-level
BPE (BART-style) tokenizer trained in-process and the real ``Florence2Processor``, saved like a Hub checkpoint.

Layout mirrors ``florence-community/Florence-2-base``: BART special ids ``<s>``=0, ``<pad>``=1, ``</s>``=2,
``<unk>``=3 (decoder_start_token_id = ``</s>`` = 2), a ``<image>`` token registered on the tokenizer as
``image_token`` (the processor reads ``tokenizer.image_token`` / ``tokenizer.image_token_id``), a
``CLIPImageProcessor`` without centre crop that carries ``image_seq_length`` (the number of ``<image>`` placeholders
the processor writes, which must equal the number of projected image features), ImageNet mean/std, bicubic resize.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    BartTokenizer,
    CLIPImageProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    GenerationConfig,
)

from captioning.tiny_models import DEFAULT_WORDS, _save, _train_byte_level_bpe

# The processor rewrites these task tokens into the sentences below before tokenizing them
# (Florence2Processor.task_prompts_without_inputs); the tiny vocabulary holds their words whole.
CAPTION_TASKS = {
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
}
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in BART / Florence-2
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # Florence-2's preprocessor_config.json
IMAGENET_STD = [0.229, 0.224, 0.225]

# Post-processing rules as the real checkpoint's processor_config.json carries them: without a "pure_text" entry
# Florence2Processor.post_process_generation(task="<CAPTION>") raises "Unsupported parse task: pure_text".
POST_PROCESSOR_CONFIG = {
    "ocr": {
        "pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "area_threshold": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


def tiny_florence2_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> BartTokenizer:
    """A BART (RoBERTa-style byte-level BPE) tokenizer whose vocabulary holds ``words`` and the caption task prompts
    whole; ``<mask>`` and ``<image>`` are added after the trained vocabulary (as special tokens)."""
    prompt_words = " ".join(CAPTION_TASKS.values()).replace("?", " ?").replace(".", " .").split()
    # Prompt words first: the trainer sees the words joined by spaces, so every word but the first also gets its
    # space-prefixed form ("Ġa"); "What" only ever starts a prompt.
    vocab_words = list(dict.fromkeys([*prompt_words, *words]))
    vocab, merges = _train_byte_level_bpe(vocab_words, BART_SPECIALS)
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, image_token=IMAGE_TOKEN, model_max_length=1024)
    assert tokenizer.convert_tokens_to_ids(BART_SPECIALS) == [0, 1, 2, 3]
    return tokenizer


def tiny_florence2_image_processor(image_size: int, image_seq_length: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
        image_seq_length=image_seq_length,
    )


def _vision_config(image_size: int, hidden: int) -> tuple[dict, int]:
    """A two-stage DaViT (Florence2VisionBackbone) and the number of image tokens it gives: the final feature map is
    ``image_size / 8`` on a side; the projector adds one spatially pooled token in front (1 + side * side)."""
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    side = image_size // 8  # stride 4, then stride 2
    config = dict(
        depths=[1, 1],
        patch_size=[7, 3],
        patch_stride=[4, 2],
        patch_padding=[3, 1],
        patch_prenorm=[False, True],
        embed_dim=[16, 32],
        num_heads=[1, 2],
        num_groups=[1, 2],
        window_size=side,  # one window over the whole (tiny) map: no padding work
        drop_path_rate=0.0,
        mlp_ratio=2.0,
        projection_dim=hidden,  # must equal the text d_model: projected features replace <image> embeddings
        max_position_embeddings=max(side, 8),
        max_temporal_embeddings=4,
    )
    return config, 1 + side * side


def build_tiny_florence2(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    seed: int = 0,
    image_size: int = 32,
    hidden: int = 32,
    layers: int = 1,
) -> Path:
    """A Florence2ForConditionalGeneration (tiny DaViT + tiny BART) with the real Florence2Processor, saved with
    ``save_pretrained`` so ``AutoProcessor`` / ``AutoModelForImageTextToText`` load it from ``output_dir``."""
    tokenizer = tiny_florence2_tokenizer(words)
    vision_config, image_seq_length = _vision_config(image_size, hidden)
    processor = Florence2Processor(
        image_processor=tiny_florence2_image_processor(image_size, image_seq_length),
        tokenizer=tokenizer,
        post_processor_config=POST_PROCESSOR_CONFIG,
    )
    text_config = dict(
        model_type="bart",
        vocab_size=len(tokenizer),
        d_model=hidden,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * hidden,
        decoder_ffn_dim=2 * hidden,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # BART / Florence-2: the decoder starts from </s>
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    config = Florence2Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    # The ids generate needs, as BartConfig's defaults give them; greedy (beams / no-repeat are the tool's to set).
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,  # what BartConfig's default gives real checkpoints too
    )
    return _save(model, processor, output_dir)
