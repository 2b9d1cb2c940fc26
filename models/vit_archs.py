"""The ViT architectures PnP-ViT builds (``--vit_arch``, ``--global_pool``), kept apart from ``models.vit`` so that the
flags (``util/flags.py``, which ``hubconf.py`` imports) can name them without importing timm."""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class VitArch:
    """Width, depth and heads of a ViT, and timm's name of its published ImageNet weights."""

    embed_dim: int
    depth: int
    num_heads: int
    timm_weights: Optional[str] = None


# What the head reads: the class token (ViT, DeiT) or the mean of the other tokens (the fine and
# coarse ones after the sampler), which learns faster from scratch on small data.
GLOBAL_POOLS = ("token", "avg")

VIT_ARCHS = {
    "demo": VitArch(embed_dim=128, depth=6, num_heads=4),
    "deit_tiny": VitArch(192, 12, 3, "deit_tiny_patch16_224.fb_in1k"),
    "deit_small": VitArch(384, 12, 6, "deit_small_patch16_224.fb_in1k"),
    "vit_base": VitArch(768, 12, 12, "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
}
