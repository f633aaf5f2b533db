"""Seq2SeqTrainer for captioning: generation sees only the image and prompt, scores use every reference of an image."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Seq2SeqTrainer
from transformers.integrations import TensorBoardCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.integrations.integration_utils import default_logdir
from transformers.trainer_utils import EvalLoopOutput, seed_worker

from captioning.checkpoints import latest_complete_checkpoint, rotate_run_checkpoints
from captioning.data import CaptionImages, CaptionPairs
from captioning.distributed import LostProcessesError, lost_contact, lost_contact_message, run_on_main
from captioning.families import ModelFamily
from captioning.grouping import ImageGroupedBatchSampler, shared_image_features
from captioning.layout import IGNORE_INDEX, CaptionLayout
from captioning.outputs import write_json, write_text_atomic
from captioning.run_dir import new_run_id, staging_dir, swap_in_final_model

logger = logging.getLogger(__name__)


def build_generation_kwargs(caption_args, family: ModelFamily) -> dict:
    """Generation settings from the flags, with the family's LAVIS defaults where a flag is unset."""
    max_new_tokens = caption_args.max_new_tokens or family.max_new_tokens
    min_new_tokens = caption_args.min_new_tokens
    if min_new_tokens is None:
        min_new_tokens = min(family.min_new_tokens, max_new_tokens)
    return {
        "num_beams": caption_args.num_beams or family.num_beams,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "repetition_penalty": caption_args.repetition_penalty,
        "no_repeat_ngram_size": caption_args.no_repeat_ngram_size,
        "length_penalty": caption_args.length_penalty,
    }


# Batch keys that are the trainer's bookkeeping, not model inputs (captioning/grouping.py, the evaluation order).
NOT_MODEL_INPUTS = ("labels", "image_index", "image_group")


def generation_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``generate`` gets from a generation batch: pixel values and every token-level input of the layout's
    generation row (``input_ids``, ``attention_mask``, and e.g. PaliGemma's ``token_type_ids``)."""
    return {key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}


class CaptioningTrainer(Seq2SeqTrainer):
    """Evaluation datasets are per-image (``CaptionImages``): one generation per image, scored against all of its
    references, plus the teacher-forced loss over all of its (image, caption) pairs.

    Stock ``Seq2SeqTrainer.prediction_step`` hands every batch key to ``generate``; BLIP takes ``input_ids`` as a
    prompt, so a reference caption in the batch would be continued instead of predicted. Here generation batches
    carry only ``pixel_values`` and the prompt, and captioned batches only ever reach the loss.
    """

    def __init__(
        self,
        *args,
        layout: CaptionLayout,
        generation_kwargs: dict,
        scorer,
        image_feature_module: torch.nn.Module | None = None,
        captions_per_image_in_batch: int = 1,
        run_id: str | None = None,
        self_critic=None,
        feature_feed=None,
        frozen_image_side: Sequence[torch.nn.Module] = (),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.run_id = run_id or new_run_id()  # what MarkCompleteCheckpoints records in this run's checkpoints
        self.checkpoint_limit = self.args.save_total_limit
        self.image_feature_module = image_feature_module
        self.captions_per_image_in_batch = captions_per_image_in_batch
        # BLIP's text decoder and T5 take **kwargs but ignore `num_items_in_batch` and return a per-device mean; the
        # Trainer would still multiply that mean by the number of processes (2x the gradient on 2 GPUs, 8x on 8).
        # Per-device means, averaged by DDP, are right for every family.
        self.model_accepts_loss_kwargs = False
        self.layout = layout
        self.generation_kwargs = dict(generation_kwargs)
        self.scorer = scorer
        # captioning/scst.py: with --training_objective scst, training batches are images, the loss self-critical.
        self.self_critic = self_critic
        # captioning/feature_cache.py: batches may carry the image side's cached output (``image_features``), which
        # the FeatureFeed makes the image side return instead of running.
        self.feature_feed = feature_feed
        # captioning/modeling.py frozen_image_side: kept in eval mode in training steps (the Trainer sets train mode).
        self.frozen_image_side = list(frozen_image_side)
        self.tensorboard_into_output_dir()

    def tensorboard_into_output_dir(self) -> None:
        """--report_to tensorboard: event files go to <output_dir>/runs/<time>_<host> from the first log on. The
        callback picks that folder only when training begins; a log before that (the --eval_baseline evaluation, at
        step 0) would open a writer in the working directory's runs/ instead, and the whole run would go there."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(self.args.output_dir, default_logdir())

    # --- image-grouped training: one vision pass per image for all of its captions in the batch ------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            for module in self.frozen_image_side:
                module.eval()
        if self.self_critic is not None and "labels" not in inputs:  # a batch of training images: SCST
            generator = self.accelerator.unwrap_model(model)
            loss = self.self_critic.loss(
                model, generator, inputs, self.shared_image_features, seed=self.args.seed, step=self.state.global_step
            )
            return (loss, None) if return_outputs else loss
        image_group = inputs.pop("image_group", None)
        with self.fed_features(inputs, image_group) as (inputs, image_group):
            if image_group is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with self.shared_image_features(model, inputs, image_group) as inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def fed_features(self, inputs: dict, image_group: torch.Tensor | None = None):
        """(inputs, image_group) of a batch: where it carries cached image features, rewritten so that, while
        active, the image side returns them instead of running (FeatureFeed.fed). Other batches pass through."""
        if "image_features" not in inputs:
            yield inputs, image_group
            return
        with self.feature_feed.fed(inputs, image_group) as fed:
            yield fed

    def shared_image_features(self, model, inputs: dict, image_group: torch.Tensor):
        return shared_image_features(
            self.accelerator.unwrap_model(model), inputs, image_group, self.layout, self.image_feature_module
        )

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training logs of an SCST run also carry the mean sample reward, baseline, advantage spread and sample
        length since the last log."""
        if self.self_critic is not None and "loss" in logs:
            stats = self.self_critic.take_stats()  # this process's images; every process logs together
            if stats and self.args.world_size > 1:
                values = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.args.device)
                stats = dict(zip(stats, self.accelerator.reduce(values, reduction="mean").tolist(), strict=True))
            logs.update({key: round(value, 4) for key, value in stats.items()})
        super().log(logs, *args, **kwargs)

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, datasets.IterableDataset):
            dataloader = super().get_train_dataloader()
            shards = getattr(getattr(dataloader, "dataset", None), "n_shards", None)
            logger.info(
                "Process %d of %d streams %s of %d shards",
                self.args.process_index,
                self.args.world_size,
                shards,
                self.train_dataset.n_shards,
            )
            return dataloader
        if self.captions_per_image_in_batch <= 1 or not isinstance(self.train_dataset, CaptionPairs):
            return super().get_train_dataloader()
        sampler = ImageGroupedBatchSampler(
            self.train_dataset.image_index,
            batch_size=self._train_batch_size,
            captions_per_image=self.captions_per_image_in_batch,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            drop_last=self.args.dataloader_drop_last,
        )
        workers = self.args.dataloader_num_workers
        dataloader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index),
        )
        return self.accelerator.prepare(dataloader)

    # --- outputs a later step trusts are written atomically (a crash never leaves half a file) -----------------

    def save_metrics(self, split, metrics, combined=True):
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        write_json(output_dir / f"{split}_results.json", metrics)
        if combined:
            path = output_dir / "all_results.json"
            all_metrics = json.loads(path.read_text()) if path.is_file() else {}
            all_metrics.update(metrics)
            write_json(path, all_metrics)

    def save_state(self):
        if self.is_world_process_zero():
            state = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
            write_text_atomic(Path(self.args.output_dir) / "trainer_state.json", state)

    def save_model(self, output_dir=None, _internal_call=False):
        """Checkpoints are saved as the Trainer does (MarkCompleteCheckpoints flags finished ones); the final model
        is written into output_dir/.final-<run id>/ and swapped in as a whole set (captioning/run_dir.py states what
        a crash can leave)."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        output_dir = Path(output_dir or self.args.output_dir)
        staging = staging_dir(output_dir, self.run_id)
        if self.is_world_process_zero() and staging.exists():
            shutil.rmtree(staging)  # what an interrupted attempt of this run left
        self.accelerator.wait_for_everyone()
        super().save_model(str(staging), _internal_call)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            swap_in_final_model(staging, output_dir)
        self.accelerator.wait_for_everyone()

    # --- checkpoint rotation: only this run's checkpoints -------------------------------------------------------

    def train(self, *args, **kwargs):
        """The Trainer's rotation deletes any ``checkpoint-*`` folder of output_dir (the oldest by mtime) and, with
        ``save_total_limit`` 1, every checkpoint but the best at the end. Here both touch only this run's checkpoints
        (those whose marker holds ``run_id``): another run's checkpoint is never deleted."""
        self.checkpoint_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            result = super().train(*args, **kwargs)
        except Exception as error:
            if self.args.world_size > 1 and lost_contact(error):
                message = lost_contact_message(
                    error,
                    process=self.args.process_index,
                    processes=self.args.world_size,
                    step=self.state.global_step,
                    timeout_s=self.args.ddp_timeout,
                    checkpoint=latest_complete_checkpoint(self.args.output_dir, self.run_id),
                )
                raise LostProcessesError(message) from error
            raise
        finally:
            self.args.save_total_limit = self.checkpoint_limit
        best = self.state.best_model_checkpoint
        if self.args.should_save and best is not None and self.checkpoint_limit == 1:
            rotate_run_checkpoints(self.args.output_dir, self.run_id, 1, newest=Path(best), best=best)
        return result

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            rotate_run_checkpoints(
                run_dir,
                self.run_id,
                self.checkpoint_limit,
                newest=Path(run_dir) / f"checkpoint-{self.state.global_step}",
                best=self.state.best_model_checkpoint,
            )

    # --- evaluation ---------------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if "image_index" not in inputs:  # captioned rows: the evaluation loss
            return None, self.token_losses(model, self._prepare_inputs(inputs)), None
        inputs = self._prepare_inputs(inputs)
        image_index = inputs.pop("image_index")
        # Cut here, per batch: prompts (left-padded) may differ in length from one batch to the next.
        generated = self.layout.caption_tokens(self.generate_captions(inputs), inputs["input_ids"])
        return None, generated, image_index

    def token_losses(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2): each row's summed cross-entropy over its caption tokens, and their number.

        Summed per row rather than averaged per batch, the evaluation loss is the same whatever the batch size and
        the number of processes (batches padded with duplicates are trimmed by gather_for_metrics).
        """
        inputs = dict(inputs)
        image_group = inputs.pop("image_group", None)
        labels = inputs["labels"]
        with (
            torch.no_grad(),
            self.compute_loss_context_manager(),
            self.fed_features(inputs, image_group) as (inputs, image_group),
        ):
            if image_group is None:
                logits = model(**inputs).logits
            else:
                with self.shared_image_features(model, inputs, image_group) as grouped:
                    logits = model(**grouped).logits
        if self.layout.predicts_next_token:  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        counted = labels != IGNORE_INDEX
        return torch.stack([(losses * counted).sum(dim=1), counted.sum(dim=1).float()], dim=1)

    def generate_captions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``generate`` on pixel_values + prompt, in the run's mixed precision (accelerate autocasts only
        ``forward``, which ``generate`` bypasses); under ZeRO-3/FSDP every process steps together."""
        kwargs = dict(self.generation_kwargs)
        kwargs.setdefault("synced_gpus", is_deepspeed_zero3_enabled() or self.is_fsdp_enabled)
        with torch.no_grad(), self.accelerator.autocast(), self.fed_features(inputs) as (inputs, _):
            return self.model.generate(**generation_inputs(inputs), **kwargs)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ) -> EvalLoopOutput:
        dataset = dataloader.dataset
        if not isinstance(dataset, CaptionImages):
            return super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        # Seq2SeqTrainer.evaluate/predict switch to plain `gather`, which keeps the duplicates that pad the last
        # batch on several processes; gather_for_metrics drops them.
        self.gather_function = self.accelerator.gather_for_metrics
        output = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        captions = self.captions_in_dataset_order(output.predictions, output.label_ids, len(dataset))
        metrics = dict(output.metrics)
        metrics.pop(f"{metric_key_prefix}_loss", None)
        for key, value in self.score(captions, dataset.references).items():
            metrics[f"{metric_key_prefix}_{key}"] = value
        metrics[f"{metric_key_prefix}_loss"] = self.caption_loss(dataset, description, ignore_keys, metric_key_prefix)
        return EvalLoopOutput(
            predictions=captions, label_ids=np.arange(len(dataset)), metrics=metrics, num_samples=len(dataset)
        )

    def captions_in_dataset_order(self, sequences, image_index, num_images: int) -> list[str]:
        """Decode the gathered generations and put them in dataset order: exactly one caption per image."""
        captions: list[str | None] = [None] * num_images
        for caption, index in zip(
            self.layout.decode_captions(sequences, self.processing_class.tokenizer),
            np.asarray(image_index).reshape(-1),
            strict=True,
        ):
            if captions[int(index)] is None:
                captions[int(index)] = caption
        missing = [i for i, caption in enumerate(captions) if caption is None]
        if missing:
            raise RuntimeError(
                f"evaluation produced no caption for {len(missing)} of {num_images} images "
                f"(first missing index: {missing[0]})"
            )
        return captions

    def score(self, captions: list[str], references: list[list[str]]) -> dict[str, float]:
        """Caption metrics, computed once on the main process and shared (every process needs them); a failure
        stops every process with its message."""
        return run_on_main(self.scorer, captions, references, what="Scoring the captions")

    def caption_loss(self, dataset: CaptionImages, description, ignore_keys, metric_key_prefix) -> float:
        """Teacher-forced loss over every (image, reference) pair of the evaluation images: mean cross-entropy per
        caption token (no label smoothing)."""
        pairs = CaptionPairs(dataset.images, cache=dataset.cache, features=dataset.features)
        dataloader = self._get_dataloader(
            pairs,
            description=f"{description} loss",
            batch_size=self.args.eval_batch_size,
            sampler_fn=self._get_eval_sampler,
        )
        self.gather_function = self.accelerator.gather_for_metrics
        output = super().evaluation_loop(dataloader, f"{description} loss", False, ignore_keys, metric_key_prefix)
        sums = np.asarray(output.predictions).reshape(-1, 2)
        return float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))
