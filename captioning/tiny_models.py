"""Small BLIP / BLIP-2 checkpoints built from configs and a word list, saved like Hub checkpoints (model + processor).

They let tests, benchmarks and the offline demo run the real loading code without the Hub.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    GPT2Tokenizer,
    T5Tokenizer,
)

DEFAULT_WORDS = (
    "a an the of on in with and is are at to photo picture image red green blue yellow black white grey dog dogs "
    "cat cats man woman child person people running sitting standing playing ball grass water street field beach "
    "shirt small large big two three background circle square triangle left right top bottom centre center"
).split()

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # BLIP's (CLIP's) normalisation constants
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_image_processor(image_size: int) -> BlipImageProcessor:
    return BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )


def _vision_config(hidden: int, layers: int, image_size: int, patch_size: int) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def build_tiny_blip(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    hidden: int = 64,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> Path:
    """A BlipForConditionalGeneration with a WordPiece vocabulary of ``words`` (plus BERT's specials and [DEC])."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(words), "[DEC]"]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, bos_token="[DEC]")
    text_config = dict(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = BlipConfig(
        text_config=text_config,
        vision_config=_vision_config(hidden, layers, image_size, patch_size),
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(image_processor=tiny_image_processor(image_size), tokenizer=tokenizer)
    return _save(model, processor, output_dir)


def build_tiny_blip2_opt(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    hidden: int = 64,
    num_query_tokens: int = 4,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """A Blip2ForConditionalGeneration with an OPT language model and a whole-word byte-level BPE tokenizer."""
    vocab, merges = _train_byte_level_bpe(list(dict.fromkeys(words)), ["<s>", "<pad>", "</s>", "<unk>"])
    # Like OPT's own tokenizer, it starts every text with </s> as BOS (what Blip2Processor, and so the pipeline, feed).
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    processor = Blip2Processor(
        image_processor=tiny_image_processor(image_size), tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )
    text_config = dict(
        model_type="opt",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=hidden,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = _blip2_config(text_config, hidden, num_query_tokens, image_size, _image_token_id(processor))
    torch.manual_seed(seed)
    return _save(_with_query_tokens(Blip2ForConditionalGeneration(config)), processor, output_dir)


def build_tiny_blip2_t5(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    hidden: int = 64,
    num_query_tokens: int = 4,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """A Blip2ForConditionalGeneration with a T5 language model and a whole-word Unigram tokenizer."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in dict.fromkeys(words)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    processor = Blip2Processor(
        image_processor=tiny_image_processor(image_size), tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )
    text_config = dict(
        model_type="t5",
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=hidden // 2,
        d_ff=2 * hidden,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # T5's 0.1 dropout lands on the 4 query-token embeddings the encoder reads, and in full-batch memorisation
        # runs it kept the model confusing images (eval loss stuck at 0.13-0.20 in 2 of 6 seeds); 0 converges in all.
        dropout_rate=0.0,
    )
    config = _blip2_config(text_config, hidden, num_query_tokens, image_size, _image_token_id(processor))
    torch.manual_seed(seed)
    return _save(_with_query_tokens(Blip2ForConditionalGeneration(config)), processor, output_dir)


def _blip2_config(text_config: dict, hidden: int, num_query_tokens: int, image_size: int, image_token_id: int):
    return Blip2Config(
        vision_config=_vision_config(hidden, 2, image_size, 8),
        qformer_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=hidden,
            vocab_size=64,
            max_position_embeddings=64,
        ),
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )


def _with_query_tokens(model: Blip2ForConditionalGeneration) -> Blip2ForConditionalGeneration:
    """Draw the query tokens as BLIP-2's pretraining did (normal, the Q-Former's initializer_range): transformers
    zeroes them, expecting a checkpoint to overwrite them, and zero queries meet the Q-Former's LayerNorm (eps 1e-12)
    at its zero-input point, where it scales gradients by 1/sqrt(eps) = 1e6 per layer. The query tokens' first
    gradients then reached ~2e19 with the T5 head, whose square overflows float32 (max 3.4e38): the clipped norm is
    inf, so clipping zeroes every gradient and those training steps silently do nothing."""
    std = model.config.qformer_config.initializer_range
    with torch.no_grad():
        model.query_tokens.normal_(mean=0.0, std=std)
    return model


def _image_token_id(processor: Blip2Processor) -> int:
    token = processor.image_token
    return processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token))


def _train_byte_level_bpe(words: list[str], specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (GPT-2 style) trained on the word list, large enough to hold every word whole."""
    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(words)] + words
    bpe.train_from_iterator(
        corpus,
        vocab_size=len(specials) + 256 + 4 * sum(map(len, words)),
        min_frequency=1,
        special_tokens=specials,
        show_progress=False,
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    return model["vocab"], merges


def _save(model, processor, output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
