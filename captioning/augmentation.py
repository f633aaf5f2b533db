"""Training-image augmentation (--image_augmentation): ``lavis`` is the random resized crop of the BLIP / LAVIS
caption recipes (a box of 50-100 % of the image's area, aspect ratio 3:4 to 4:3, later resized to the model's input
by the image processor). No horizontal flip: captions say "left" and "right".

Crops are taken from the decoded image (full resolution), so the training split is not read from the uint8
preprocessing cache while augmentation is on; evaluation images are never augmented. Draws come from torch's
random generator (seeded by --seed; each DataLoader worker gets its own stream).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

AUGMENTATIONS = ("none", "lavis")
LAVIS_SCALE = (0.5, 1.0)  # LAVIS blip_image_train: RandomResizedCrop(image_size, scale=(0.5, 1.0))
LAVIS_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range, as LAVIS uses it


class RandomResizedCrop:
    """A random box of ``scale`` of the image's area with an aspect ratio in ``ratio`` (log-uniform), as
    torchvision's RandomResizedCrop draws it (after 10 failed draws: the central crop of the nearest ratio)."""

    def __init__(self, scale: tuple[float, float] = LAVIS_SCALE, ratio: tuple[float, float] = LAVIS_RATIO):
        self.scale, self.ratio = scale, ratio

    def box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of the crop."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return left, top, left + w, top + h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.crop(self.box(*image.size))


def build_augmentation(name: str) -> RandomResizedCrop | None:
    """The augmentation ``--image_augmentation name`` applies to each training image, or None."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"--image_augmentation {name!r}: choose one of {', '.join(AUGMENTATIONS)}.")
    return RandomResizedCrop() if name == "lavis" else None
