"""A small SmolVLM2 checkpoint built from configs and a word list, saved like a Hub checkpoint.

It mirrors ``HuggingFaceTB/SmolVLM2-500M-Video-Instruct`` at toy scale: a SigLIP-style vision tower
(``smolvlm_vision``), the pixel-shuffle ``connector`` (scale factor 2), a Llama language model, a word-level tokenizer
built in process with SmolVLM's special tokens (``<|im_start|>``, ``<end_of_utterance>``, ``<image>``,
``<fake_token_around_image>``, ``<global-img>``, ...) and the real ``SmolVLMProcessor`` with SmolVLM2's chat template.
Image splitting is off (one global image per picture), so every image gets the same
``(image_size // patch_size) ** 2 / scale_factor ** 2`` ``<image>`` tokens (4 by default).

    >>> path = build_tiny_smolvlm(tmp_dir)
    >>> processor = AutoProcessor.from_pretrained(path)
    >>> model = AutoModelForImageTextToText.from_pretrained(path)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)

from captioning.tiny_models import DEFAULT_WORDS

# SmolVLM2's chat template (HuggingFaceTB/SmolVLM2-*-Instruct, chat_template.json), videos left out.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>")
IMAGE_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>", "<video>")
PROMPT_WORDS = ("User", "Assistant", "System", "Describe", "this", "image", "in", "one", "sentence", ":", ".", "\n")


def build_smolvlm_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (split on whitespace and punctuation; "\\n" a token of its own): a caption tokenizes
    alike on its own and after "Assistant:", so the chat template's ids are the collator's."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIALS, *IMAGE_TOKENS, *PROMPT_WORDS, *words]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(),
        ]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=[*IMAGE_TOKENS, "<|im_end|>"],
    )
    return tokenizer


def build_tiny_smolvlm(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
) -> Path:
    """Save a tiny SmolVLM2 checkpoint with its processor (image splitting off) to ``output_dir``."""
    tokenizer = build_smolvlm_tokenizer(words)
    scale_factor = 2
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    image_processor = SmolVLMImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = SmolVLMVideoProcessor(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    config = SmolVLMConfig(
        vision_config=vision_config(hidden, layers, image_size, patch_size, "smolvlm_vision"),
        text_config=llama_text_config(tokenizer, hidden, layers),
        image_token_id=processor.image_token_id,
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return save_checkpoint(SmolVLMForConditionalGeneration, config, processor, tokenizer, output_dir, seed)


def llama_text_config(tokenizer, hidden: int, layers: int) -> dict:
    """The tiny Llama text model of the SmolVLM-like checkpoints (SmolVLM, Idefics3)."""
    return dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def vision_config(hidden: int, layers: int, image_size: int, patch_size: int, model_type: str) -> dict:
    """The tiny SigLIP-style vision tower of the SmolVLM-like checkpoints."""
    return dict(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def save_checkpoint(model_class, config, processor, tokenizer, output_dir: str | Path, seed: int) -> Path:
    """Build the model from ``config`` (seeded), let generate end answers at the tokenizer's end of turn, and save
    it with its processor like a Hub checkpoint."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # <end_of_utterance> ends the answer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
