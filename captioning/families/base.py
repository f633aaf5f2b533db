"""What a model family declares, in one place: the ``ModelFamily`` record every module of this package fills in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from captioning.layout import CaptionLayout


@dataclass(frozen=True)
class ModelFamily:
    """One captioner family: how it is detected and loaded, how captions are laid out, and its defaults."""

    name: str
    label: str  # how the model card names it
    examples: str  # the checkpoints it covers, for error messages
    model_class: type[PreTrainedModel]
    detect: Callable[[PretrainedConfig], bool]  # True for a config of this family (may raise for a near miss)
    # (config, tokenizer, prompt) -> the token layout of training rows and generation prompts (captioning/layout.py);
    # the whole processor in place of the tokenizer when layout_from_processor is set
    build_layout: Callable[[PretrainedConfig, PreTrainedTokenizerBase, str], CaptionLayout]
    lora_target_modules: tuple[str, ...]  # default LoRA targets (name suffixes), searched in language_prefix only
    language_prefix: str  # module-name prefix of the text side
    vision_prefix: str  # module-name prefix of the vision tower
    vision_lora_target_modules: tuple[str, ...]  # attention layers adapted by --lora_vision
    image_feature_module: str  # where the image side ends; its output is shared by the captions of an image
    num_beams: int  # generation defaults, after the family's reference caption recipes
    max_new_tokens: int
    min_new_tokens: int
    # The model card's usage snippet, the lines that build `input_ids` for one image from `config`, `prompt_ids` and
    # set `skip` (the generated positions that repeat the input).
    snippet: str
    default_prompt: str = ""  # the caption prompt when --caption_prompt is not given
    # True: build_layout gets the checkpoint's whole processor (image-token count, task prompts), not its tokenizer.
    layout_from_processor: bool = False
    # True: the generation prompt is a conversation in the checkpoint's chat template (the user sends the image and
    # the prompt), which is also how the transformers pipeline takes it (captioning/pipeline_usage.py).
    chat_template: bool = False
    # (config.json as a dict, model path) -> raises for a checkpoint that looks like this family but cannot be loaded
    # (read before AutoConfig, which may fail on it first with a less helpful message).
    check_config_json: Callable[[dict, str], None] | None = None
    # More keyword arguments of the snippet's `generate` call, as Python (e.g. PaliGemma's token_type_ids).
    snippet_generate_kwargs: str = ""
    # (processor, data arguments, from_run=...) -> sets the image processor's options from the family's flags
    # (--image_splitting, --min_pixels / --max_pixels) before the layout, the image cache and the saved processor
    # use them; raises for an unusable value. ``from_run``: the processor is a run's output (continued, e.g. by
    # SCST), whose saved options stand where a flag is not given. Flags of other families: check_image_flags.
    configure_processor: Callable[..., None] | None = None
    image_flags: tuple[str, ...] = ()  # the image-processor flags of DataArguments this family reads
    # False where images keep their own size (Qwen's dynamic resolution): no fixed-size uint8 preprocessing cache.
    fixed_image_size: bool = True
    # --cache_image_features (captioning/feature_cache.py): where the image side ends, "module_output" (the output
    # of image_feature_module, BLIP's vision tower) or "get_image_features" (the model's method of that name, which
    # its forward and generate call); None where the family has no feature cache. ``cached_fields``: the fields of
    # that output the language side reads.
    feature_cache: str | None = "get_image_features"
    cached_fields: tuple[str, ...] = ("pooler_output",)
    # Modules that a path other than get_image_features runs before image_feature_module (BLIP-2's generate calls
    # its vision tower, Q-Former and language projection itself): fed cached features, they return a placeholder
    # and image_feature_module the cached pooler_output.
    feature_path: tuple[str, ...] = ()

    def prompt(self, caption_prompt: str | None) -> str:
        """The caption prompt of a run: ``--caption_prompt`` if given, else the family's default."""
        return self.default_prompt if caption_prompt is None else caption_prompt
