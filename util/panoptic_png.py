"""The COCO panoptic PNG encoding: a pixel's segment id is ``R + 256 G + 256^2 B`` (0: void)."""
import numpy as np


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` int64 segment ids of an ``(H, W, 3)`` RGB array of a panoptic PNG."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 RGB array encoding ``(H, W)`` segment ids in ``[0, 256^3)``."""
    ids = np.asarray(ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3):
        raise ValueError(f"ids_to_rgb: segment ids must be in [0, {256 ** 3}), got {ids.min()} to {ids.max()}")
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)
