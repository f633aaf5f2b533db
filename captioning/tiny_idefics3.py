"""A small Idefics3 checkpoint built from configs and a word list, saved like a Hub checkpoint.

It mirrors ``HuggingFaceM4/Idefics3-8B-Llama3`` at toy scale: a SigLIP vision tower (``idefics3_vision``), the
pixel-shuffle ``connector`` (scale factor 2), a Llama language model, a word-level tokenizer built in process with
Idefics3's special tokens (``<|begin_of_text|>``, added in front of plain text as Llama 3's tokenizer does,
``<end_of_utterance>``, ``<image>``, ``<fake_token_around_image>``, ``<global-img>``, ``<row_i_col_j>``) and the real
``Idefics3Processor`` with Idefics3's chat template. The image processor ships with image splitting on, as the Hub's
(images resized to a longest edge of 2 tiles, so up to 2 x 2 tiles; the Hub's allows 4 x 4); the family turns it off
unless --image_splitting is given, so that every image gets one global image of
``(image_size // patch_size) ** 2 / scale_factor ** 2`` ``<image>`` tokens (4 by default).

    >>> path = build_tiny_idefics3(tmp_dir)
    >>> processor = AutoProcessor.from_pretrained(path)
    >>> model = AutoModelForImageTextToText.from_pretrained(path)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)

from captioning.tiny_models import DEFAULT_WORDS
from captioning.tiny_smolvlm import llama_text_config, save_checkpoint, vision_config

# Idefics3's chat template (HuggingFaceM4/Idefics3-8B-Llama3, chat_template.json).
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
BOS = "<|begin_of_text|>"
SPECIALS = (BOS, "<|end_of_text|>", "<|reserved_special_token_0|>", "<unk>", "<end_of_utterance>")
ROW_COL_TOKENS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))
IMAGE_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>", *ROW_COL_TOKENS)
PROMPT_WORDS = ("User", "Assistant", "System", "Describe", "this", "image", "in", "one", "sentence", ":", ".", "\n")


def build_idefics3_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (split on whitespace and punctuation; "\\n" a token of its own) that puts
    ``<|begin_of_text|>`` in front of plain text, as Llama 3's does: a caption tokenizes alike on its own and after
    "Assistant:", so the chat template's ids are the collator's."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIALS, *IMAGE_TOKENS, *PROMPT_WORDS, *words]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token="<end_of_utterance>",
        pad_token="<|reserved_special_token_0|>",
        unk_token="<unk>",
        additional_special_tokens=[*IMAGE_TOKENS, "<|end_of_text|>"],
    )


def build_tiny_idefics3(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
) -> Path:
    """Save a tiny Idefics3 checkpoint with its processor (image splitting on, as shipped) to ``output_dir``."""
    tokenizer = build_idefics3_tokenizer(words)
    scale_factor = 2
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        size={"longest_edge": 2 * image_size},
        max_image_size={"longest_edge": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE
    )
    config = Idefics3Config(
        vision_config=vision_config(hidden, layers, image_size, patch_size, "idefics3_vision"),
        text_config=llama_text_config(tokenizer, hidden, layers),
        image_token_id=processor.image_token_id,
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return save_checkpoint(Idefics3ForConditionalGeneration, config, processor, tokenizer, output_dir, seed)
