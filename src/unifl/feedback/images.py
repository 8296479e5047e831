"""Loading stored images as tensors in [0, 1], the input convention of the reward models.

Preference tables name images by paths relative to an images root; reward
training and evaluation read them through `ImageStore`, which resolves paths,
reports unreadable files by name, and keeps decoded images in a bounded cache
as uint8 (a quarter of the memory of float) because training revisits every
image once per epoch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch


class ImageLoadError(ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


def load_image_uint8(path: str | Path) -> torch.Tensor:
    """Decode an image file to an RGB uint8 tensor [3, H, W]."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    try:
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageLoadError(f"{file}: image file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"{file}: cannot decode image: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]."""
    return images.to(torch.float32) / 255.0


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write a float [3, H, W] image in [0, 1] as PNG, atomically."""
    from PIL import Image

    from unifl.io import atomic_path

    array = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()
    with atomic_path(path) as tmp:
        Image.fromarray(array.numpy()).save(tmp, format="PNG")


class ImageStore:
    """Images under `root` by relative path, decoded once and cached.

    The cache holds at most `max_cached_bytes` of decoded uint8 images (least
    recently used leave first): a count would not do, as a 1024 px image takes
    3 MiB and a 32 px one 3 KiB."""

    def __init__(self, root: str | Path, max_cached_bytes: int = 2 * 2**30) -> None:
        self.root = Path(root)
        self.max_cached_bytes = max_cached_bytes
        self.cached_bytes = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def path(self, relative: str) -> Path:
        return self.root / relative

    def missing(self, relative_paths: Iterable[str]) -> list[str]:
        """The paths among `relative_paths` that are not files under the root."""
        return [rel for rel in relative_paths if not self.path(rel).is_file()]

    def get(self, relative: str) -> torch.Tensor:
        """The uint8 image [3, H, W] at `relative`."""
        cached = self._cache.get(relative)
        if cached is not None:
            self._cache.move_to_end(relative)
            return cached
        image = load_image_uint8(self.path(relative))
        if image.nbytes <= self.max_cached_bytes:
            self._cache[relative] = image
            self.cached_bytes += image.nbytes
            while self.cached_bytes > self.max_cached_bytes:
                _, oldest = self._cache.popitem(last=False)
                self.cached_bytes -= oldest.nbytes
        return image

    def batch(self, relative_paths: Sequence[str]) -> torch.Tensor | list[torch.Tensor]:
        """Float images in [0, 1]: one [N, 3, H, W] tensor when sizes agree, else a list."""
        images = [to_unit_float(self.get(rel)) for rel in relative_paths]
        if len({tuple(image.shape) for image in images}) == 1:
            return torch.stack(images)
        return images
