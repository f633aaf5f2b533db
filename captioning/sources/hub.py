"""--dataset_name: a dataset on the Hugging Face Hub, its train/validation/test splits turned into per-image splits."""

from __future__ import annotations

import logging

import datasets

from ..arguments import DataArguments
from ..scan import DataReport
from .core import SPLIT_ALIASES, dataset_to_images

logger = logging.getLogger(__name__)


def load_hub_splits(
    data_args: DataArguments, *, cache_dir: str | None = None, report: DataReport | None = None
) -> dict[str, datasets.Dataset]:
    """Load ``--dataset_name`` and turn each train/validation/test split into a per-image dataset."""
    loaded = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    splits: dict[str, datasets.Dataset] = {}
    for split_name, dataset in loaded.items():
        target = SPLIT_ALIASES.get(str(split_name).lower())
        if target is None:
            logger.info("Ignoring split %r of %s (not train, validation or test).", split_name, data_args.dataset_name)
            continue
        if target in splits:
            logger.warning(
                "Ignoring split %r of %s: another split already gave %s.", split_name, data_args.dataset_name, target
            )
            continue
        where = f"--dataset_name {data_args.dataset_name} (split {split_name!r})"
        splits[target] = dataset_to_images(dataset, data_args, where, report=report)
    return splits
