"""Florence-2 (florence-community/Florence-2-*, transformers' native ``Florence2ForConditionalGeneration``): a DaViT
vision tower whose projected tokens fill ``<image>`` placeholders in a BART encoder's input, after which a task token's
sentence (``<CAPTION>`` -> "What does the image describe?") tells the model what to write; the BART decoder writes.

Layout (Q = the image processor's ``image_seq_length``, 577 for the real 768x768 checkpoints):
    encoder input_ids   <image>*Q <s> task sentence </s>       (the processor's own encoding of the task token)
    labels              <s> caption </s>  [-100 padding]        (the tokenizer's own encoding of the caption)
    decoder input       </s> <s> caption                        (the model shifts the labels right from </s>)
    generate output     </s> <s> caption </s>                   (</s> cut, special tokens skipped when decoding)
The labels keep BART's ``<s>``: the pretrained model writes it first ([2, 0, ...]), and a generation config that
forces it (``forced_bos_token_id=0``) then shows the decoder the prefix it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from transformers import Florence2ForConditionalGeneration, PretrainedConfig

from captioning.families.base import ModelFamily
from captioning.layout import ENCODER_DECODER, CaptionLayout

NATIVE_CHECKPOINTS = "florence-community/Florence-2-base, -large (and their -ft versions)"


@dataclass(frozen=True)
class Florence2Layout(CaptionLayout):
    """The encoder reads the image placeholders and the task prompt (the same for every row); the labels are the
    decoder's own targets, ``<s> caption </s>``, aligned with its logits (no shift: ``predicts_next_token`` is
    False, as for every encoder-decoder layout). ``generate``'s output holds no input, so nothing is cut before
    decoding; decoding skips ``</s>``, ``<s>`` and ``<pad>`` as the processor's caption post-processing does."""

    encoder_ids: tuple[int, ...] = ()  # what Florence2Processor writes for the task prompt and one image

    def generation_prompt(self) -> list[int]:
        return list(self.encoder_ids)

    def training_sequence(self, caption_ids) -> tuple[list[int], list[int]]:
        return self.generation_prompt(), [self.bos_id, *caption_ids, self.eos_id]

    @property
    def forced_first_token(self) -> int:
        return self.bos_id


def build_layout(config: PretrainedConfig, processor, prompt: str = "<CAPTION>") -> Florence2Layout:
    """Encoder ids from the checkpoint's own processor (its task-token sentences, BOS/EOS framing and number of
    image tokens), for a blank image; label framing from the config (the ids ``generate`` uses)."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise TypeError("Florence-2's caption layout is built from its processor (Florence2Processor), not a tokenizer")
    try:
        encoded = processor(images=Image.new("RGB", (8, 8)), text=prompt)
    except ValueError as error:  # e.g. a task token with more text around it
        raise ValueError(
            f"--caption_prompt {prompt!r}: Florence-2 takes a task token alone (<CAPTION>, <DETAILED_CAPTION>, "
            f"<MORE_DETAILED_CAPTION>) or plain text ({error})"
        ) from error
    encoder_ids = tuple(encoded["input_ids"][0])
    num_image_tokens = encoder_ids.count(config.image_token_id)
    text = config.text_config
    return Florence2Layout(
        kind=ENCODER_DECODER,
        bos_id=text.bos_token_id,
        eos_id=text.eos_token_id,
        pad_id=text.pad_token_id,
        prompt_ids=encoder_ids[num_image_tokens:],
        image_token_id=config.image_token_id,
        num_image_tokens=num_image_tokens,
        encoder_ids=encoder_ids,
    )


def remote_code_release(config: dict) -> bool:
    """True for the config.json of Microsoft's remote-code release (microsoft/Florence-2-*): it names its own code
    (``auto_map``) and a ``florence2_language`` text model; the native conversion has neither."""
    if config.get("model_type") != "florence2":
        return False
    text_type = (config.get("text_config") or {}).get("model_type")
    vision_type = (config.get("vision_config") or {}).get("model_type")
    return "auto_map" in config or text_type == "florence2_language" or vision_type in ("", "davit")


def check_config_json(config: dict, source: str = "") -> None:
    """An error naming the native checkpoints for a remote-code Florence-2 config (read as JSON: AutoConfig fails on
    it first, with a list of every model type it knows)."""
    if not remote_code_release(config):
        return
    name = Path(str(source)).name
    suggestion = (
        f"florence-community/{name}" if name.startswith("Florence-2-") else "florence-community/Florence-2-base"
    )
    raise ValueError(
        f"--model_name_or_path {source}: this is Microsoft's remote-code release of Florence-2 (its config.json "
        "names its own code: auto_map, a florence2_language text model), which transformers' native "
        f"Florence2ForConditionalGeneration cannot load. Use the native conversion of the same weights: {suggestion} "
        f"(native checkpoints: {NATIVE_CHECKPOINTS})."
    )


def detect(config: PretrainedConfig) -> bool:
    if getattr(config, "model_type", None) != "florence2":
        return False
    # With --trust_remote_code AutoConfig loads the remote-code config: refuse it here as well.
    check_config_json(config.to_dict(), getattr(config, "_name_or_path", ""))
    return True


SNIPPET = """\
# As in training: the processor turns the task token into its sentence, <image> * Q + <s> sentence </s>.
input_ids = processor(images=image, text=PROMPT).input_ids[0]
skip = 0  # the decoder output holds the caption only"""

FLORENCE2 = ModelFamily(
    name="florence2",
    label="Florence-2",
    examples=NATIVE_CHECKPOINTS,
    model_class=Florence2ForConditionalGeneration,
    detect=detect,
    build_layout=build_layout,
    # BART's attention and MLP; the vision tower's ffn also has fc1/fc2, so defaults look in the language model only.
    lora_target_modules=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    language_prefix="model.language_model.",
    vision_prefix="model.vision_tower.",
    vision_lora_target_modules=("attn.qkv", "attn.proj"),  # DaViT's window and channel attention
    # The projected image tokens: shared by the captions of an image. The BART encoder's output is a function of the
    # image alone too (one task prompt), but its input has one row per caption, so it cannot be computed per image.
    image_feature_module="model.multi_modal_projector",
    num_beams=3,  # Microsoft's examples: 3 beams; <CAPTION> gives one sentence, <s> being the first new token
    max_new_tokens=30,
    min_new_tokens=0,
    snippet=SNIPPET,
    default_prompt="<CAPTION>",
    layout_from_processor=True,
    check_config_json=check_config_json,
)
