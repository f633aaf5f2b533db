"""Checks shared by the tests of decoder-only families (PaliGemma, SmolVLM): one sequence holds prompt and caption."""

from __future__ import annotations

import torch

from captioning.layout import IGNORE_INDEX
from captioning.trainer import generation_inputs


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale a random model's weight matrices, so that argmaxes are not toss-ups between near-equal logits."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(3.0)
    return model


def check_first_token_is_learnt_where_generate_predicts_it(model, layout, training: dict, prompt: dict):
    """The training rows start with the generation prompt; the first caption token is a label at the position after
    it; generate's first new token and its logits are the teacher-forced prediction from the last prompt position.
    Returns generate's output (with logits) for further checks."""
    length = layout.generated_prefix_length
    with torch.no_grad():
        teacher_forced = model(**training).logits
        generated = model.generate(
            **generation_inputs(prompt),
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(training["input_ids"][:, :length], prompt["input_ids"])
    assert (training["labels"][:, length] != IGNORE_INDEX).all()
    assert torch.equal(generated.sequences[:, :length], prompt["input_ids"])
    assert torch.equal(generated.sequences[:, length], teacher_forced[:, length - 1].argmax(-1))
    torch.testing.assert_close(generated.logits[0], teacher_forced[:, length - 1], atol=1e-4, rtol=0)
    return generated


def check_loss_is_next_token_cross_entropy(model, collator, rows: list[dict]) -> None:
    """The model's loss equals cross-entropy computed by hand, position t predicting label t + 1 (one shift, inside
    the model; the collator's labels are unshifted), and padding changes nothing: each row alone gives the same
    per-token loss."""
    batch = collator(rows)
    with torch.no_grad():
        output = model(**batch)
    logits, labels = output.logits.float(), batch["labels"]
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(output.loss, expected, atol=1e-5, rtol=0)
    per_row = []
    for row in rows:
        single = collator([row])
        with torch.no_grad():
            per_row.append((model(**single).loss, (single["labels"][:, 1:] != IGNORE_INDEX).sum()))
    weighted = sum(loss * count for loss, count in per_row) / sum(count for _, count in per_row)
    torch.testing.assert_close(output.loss, weighted, atol=1e-5, rtol=1e-5)
