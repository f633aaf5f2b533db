"""Small Qwen2.5-VL and Qwen3-VL checkpoints built from configs and a word list, saved like Hub checkpoints.

They mirror ``Qwen/Qwen2.5-VL-3B-Instruct`` and ``Qwen/Qwen3-VL-2B-Instruct`` at toy scale: the real vision towers
(Qwen2.5-VL: windowed attention, 14-pixel patches, an MLP ``merger``; Qwen3-VL: 16-pixel patches, learnt position
grid, ``merger`` plus DeepStack mergers), 2 x 2 patches merged into one visual token, a Qwen2.5 / Qwen3 language
model with multimodal rotary positions (``mrope_section`` scaled to the small head), a word-level tokenizer built in
process with Qwen's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...)
and the real ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` with the checkpoints' own chat templates. Images keep
their aspect ratio (dynamic resolution): each gets ``prod(image_grid_thw) / 4`` ``<|image_pad|>`` tokens, between
1 and 16 here (the tiny processor's ``min_pixels`` / ``max_pixels``), so images of different shapes get different
numbers of tokens.

    >>> path = build_tiny_qwen2_5_vl(tmp_dir)
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
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from captioning.tiny_models import DEFAULT_WORDS

# Qwen2.5-VL's chat template (Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct, chat_template.json; Qwen2-VL's too): a
# default system turn, the image as <|vision_start|><|image_pad|><|vision_end|> (one <|image_pad|>, which the
# processor repeats for each of the image's visual tokens), every turn closed by <|im_end|> and "\n".
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# Qwen3-VL's chat template (Qwen/Qwen3-VL-*-Instruct, chat_template.json; 5292 bytes): no default system turn,
# tool calls, otherwise the same turns as Qwen2.5-VL's.
QWEN3_VL_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n\
</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

SPECIALS = ("<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PROMPT_WORDS = ("system", "user", "assistant", "You", "are", "helpful", "Describe", "this", "in", "one", "sentence")
PUNCTUATION = (".", ",", ":", "\n")
MERGE_SIZE = 2  # 2 x 2 patches make one visual token, as in every Qwen2.5-VL / Qwen3-VL checkpoint


def build_qwen_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (split on whitespace and punctuation; "\\n" a token of its own) with Qwen's special
    tokens, <|im_end|> the end of a turn and <|endoftext|> the padding as in Qwen's tokenizers: a caption tokenizes
    alike on its own and after "assistant\\n", as with Qwen's byte-level BPE."""
    tokens = [*SPECIALS, *VISION_TOKENS, *PROMPT_WORDS, *PUNCTUATION, *words]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(),
        ]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", *VISION_TOKENS],
    )


def _text_config(tokenizer, hidden: int, layers: int, **rope) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,  # Qwen's tokenizers have none
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", **rope},
    )


def _token_ids(tokenizer) -> dict:
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def _image_processor(patch_size: int, max_tokens: int) -> Qwen2VLImageProcessor:
    """Qwen's image processor (both families use Qwen2VLImageProcessor) at 1 to ``max_tokens`` visual tokens."""
    factor = patch_size * MERGE_SIZE
    return Qwen2VLImageProcessor(
        patch_size=patch_size,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        min_pixels=factor * factor,
        max_pixels=max_tokens * factor * factor,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _save(model, processor, tokenizer, output_dir: str | Path) -> Path:
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # <|im_end|> ends the answer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def build_tiny_qwen2_5_vl(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    max_image_tokens: int = 16,
) -> Path:
    """Save a tiny Qwen2.5-VL checkpoint (14-pixel patches, one windowed and one full-attention vision block) with
    its processor to ``output_dir``."""
    tokenizer = build_qwen_tokenizer(words)
    patch_size = 14
    image_processor = _image_processor(patch_size, max_image_tokens)
    video_processor = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=MERGE_SIZE, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    head_dim = hidden // 2
    # Qwen2.5-VL's [16, 24, 24] (temporal, height, width) of 64 rotary frequencies, scaled to head_dim / 2.
    mrope_section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=patch_size,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        window_size=2 * patch_size * MERGE_SIZE,  # windows of 2 x 2 visual tokens
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, hidden, layers, rope_theta=1000000.0, mrope_section=mrope_section),
        vision_config=vision_config,
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return _save(Qwen2_5_VLForConditionalGeneration(config), processor, tokenizer, output_dir)


def build_tiny_qwen3_vl(
    output_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    max_image_tokens: int = 16,
) -> Path:
    """Save a tiny Qwen3-VL checkpoint (16-pixel patches, an 8 x 8 learnt position grid, one DeepStack merger
    feeding the first text layer) with its processor to ``output_dir``."""
    tokenizer = build_qwen_tokenizer(words)
    patch_size = 16
    image_processor = _image_processor(patch_size, max_image_tokens)
    video_processor = Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=MERGE_SIZE, temporal_patch_size=2)
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    head_dim = hidden // 2
    # Qwen3-VL's interleaved [24, 20, 20] of 64 rotary frequencies, scaled to head_dim / 2.
    mrope_section = [head_dim // 2 - 2 * (5 * head_dim // 32), 5 * head_dim // 32, 5 * head_dim // 32]
    text_config = _text_config(
        tokenizer, hidden, layers, rope_theta=5000000.0, mrope_section=mrope_section, mrope_interleaved=True
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=patch_size,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    config = Qwen3VLConfig(
        text_config={**text_config, "head_dim": head_dim},
        vision_config=vision_config,
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return _save(Qwen3VLForConditionalGeneration(config), processor, tokenizer, output_dir)
