"""A small PaliGemma / PaliGemma 2 checkpoint built from configs and a word list, saved like a Hub checkpoint.

It mirrors ``google/paligemma2-3b-pt-224`` at toy scale: a SigLIP vision tower (no pooling head), the one-layer
``multi_modal_projector``, a Gemma 2 (or Gemma) language model with tied embeddings, a Gemma tokenizer (BPE with
byte fallback, ``<pad>``=0 ``<eos>``=1 ``<bos>``=2 ``<unk>``=3 ``<mask>``=4, ``"\\n"`` a token of its own) built in
process, and the real ``PaliGemmaProcessor`` with a ``SiglipImageProcessor``. The processor adds ``<image>``, the
1024 ``<locNNNN>`` and the 128 ``<segNNN>`` tokens itself (processing_paligemma.py), so the language model's
vocabulary is sized after the processor is built.

    >>> path = build_tiny_paligemma(tmp_dir)
    >>> processor = AutoProcessor.from_pretrained(path)
    >>> model = AutoModelForImageTextToText.from_pretrained(path)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GemmaTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
)

from captioning.tiny_models import DEFAULT_WORDS

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0..4, as in Gemma's real vocabulary
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))  # Gemma's byte-fallback pieces
PROMPT_WORDS = ("caption", "en")  # PaliGemma's captioning prompt is "caption en"
SIGLIP_MEAN = [0.5, 0.5, 0.5]  # PaliGemma's preprocessor_config.json: mean = std = 0.5, bicubic, rescale 1/255
SIGLIP_STD = [0.5, 0.5, 0.5]


def build_gemma_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> GemmaTokenizer:
    """A Gemma tokenizer whose BPE holds every word whole, both at the start of a text (``dog``) and after a space
    (``▁dog``): the processor tokenizes the suffix (caption) on its own, so its first word has no ``▁``."""
    words = list(dict.fromkeys([*PROMPT_WORDS, *words]))
    vocab, merges = _train_gemma_bpe(words)
    # Gemma's Hub tokenizer adds BOS by default; PaliGemmaProcessor turns that off and writes <bos> itself.
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def build_tiny_paligemma(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    gemma2: bool = True,
) -> Path:
    """Save a tiny PaliGemma 2 (``gemma2=True``: Gemma 2 text model) or PaliGemma 1 (Gemma) checkpoint with its
    processor to ``output_dir``; ``(image_size // patch_size) ** 2`` image tokens (16 by default) per image."""
    tokenizer = build_gemma_tokenizer(words)
    num_image_tokens = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        image_seq_length=num_image_tokens,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab_size = len(processor.tokenizer)  # words + <image> + <loc....> + <seg...> added by the processor
    head_dim = hidden // 2
    text_config = dict(
        model_type="gemma2" if gemma2 else "gemma",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=256,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if gemma2:  # Gemma 2 keeps its soft-capping (50 / 30) and alternating sliding / full attention layers
        text_config.update(query_pre_attn_scalar=head_dim)
    vision_config = dict(
        model_type="siglip_vision_model",
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    config = PaliGemmaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        vocab_size=vocab_size,
        projection_dim=hidden,
        hidden_size=hidden,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    # Save the tokenizer as the Hub has it: its tokenizer.json post-processor writes <bos> ("<bos> $A"), so a bare
    # AutoTokenizer adds BOS; loading the processor turns that off again (processing_paligemma.py, __init__).
    processor.tokenizer.add_bos_token = True
    processor.tokenizer.save_pretrained(output_dir)
    processor.tokenizer.add_bos_token = False
    return output_dir


def _train_gemma_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocabulary and merges trained on ``words`` and ``▁words`` with Gemma's normalizer (space -> ``▁``).

    Training splits before each ``▁`` so no merge crosses a word boundary; Gemma's own pre-tokenizer leaves the
    text whole, and with these merges it gives the same pieces.
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    alphabet = sorted({char for word in words for char in word} | {"\u2581", "\n"})
    trainer = trainers.BpeTrainer(
        vocab_size=len(GEMMA_SPECIALS) + len(BYTE_TOKENS) + len(alphabet) + 4 * sum(len(w) + 1 for w in words),
        min_frequency=1,
        special_tokens=[*GEMMA_SPECIALS, *BYTE_TOKENS],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    bpe.train_from_iterator([*words, *(f" {word}" for word in words)], trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    return model["vocab"], merges
