"""FLOPs of DETR / PnP-DETR and ViT / PnP-ViT per image, counted with ``torch.utils.flop_counter``.

Figures are reported in the papers' convention: **one multiply-add = one FLOP** (DETR's
86 GFLOPs for R50), half of what ``torch.utils.flop_counter`` counts. Counted are the
convolutions, matrix products and attention; normalisation, activations, softmax, top-k and
gathers are not (as in the published counts). The fused CPU attention kernel, which the
counter of current torch does not know, is counted with the same formula as the CUDA kernels.
"""
import contextlib
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

CONVENTION = "GFLOPs count one multiply-add as one FLOP (torch.utils.flop_counter counts two)"

aten = torch.ops.aten


def attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                    *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Flop-counter formula (2 per multiply-add) of fused attention: ``Q K^T`` then ``A V``.

    Shapes are ``(B, heads, L, head_dim)``; masks and the softmax are not counted.
    """
    batch, heads, len_q, dim_qk = query_shape
    len_k, dim_v = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * len_q * len_k * (dim_qk + dim_v)


def attention_backward_flops(grad_out_shape: Sequence[int], query_shape: Sequence[int],
                             key_shape: Sequence[int], value_shape: Sequence[int],
                             *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Backward of fused attention: recompute ``Q K^T``, then ``dA``, ``dV``, ``dQ`` and ``dK``."""
    batch, heads, len_q, dim_qk = query_shape
    len_k, dim_v = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * len_q * len_k * (3 * dim_qk + 2 * dim_v)


_FUSED_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the fused CPU attention kernels."""
    missing = {op: formula for op, formula in _FUSED_CPU_ATTENTION.items() if op not in flop_registry}
    return FlopCounterMode(display=False, custom_mapping=missing)


def gflops(torch_flops: int) -> float:
    """``torch.utils.flop_counter`` FLOPs -> GFLOPs in the papers' convention (multiply-adds)."""
    return torch_flops / 2 / 1e9


@contextlib.contextmanager
def _without_grad(model: nn.Module) -> Iterator[None]:
    """No grad, and parameters marked as not requiring it while counting.

    The counter's module tracker cannot handle views of parameters made under ``no_grad``
    (such as the decoder's query embedding), so the flags are lifted and restored after.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class ImageFlops:
    """GFLOPs (multiply-adds) of one image at one ratio.

    total: the whole model; transformer: sampler + encoder + decoder (None for a ViT, which
    has no separate transformer); sampler: the poll-and-pool sampler alone (0 without one).
    """

    total: float
    transformer: Optional[float]
    sampler: float


def count_flops(model: nn.Module, image: Tensor,
                ratios: Sequence[Optional[float]]) -> dict[Optional[float], ImageFlops]:
    """GFLOPs of a ``DETR`` or ``PnPViT`` on one ``(3, H, W)`` image (batch 1, no padding) at each ratio.

    ``extract_features`` (DETR's backbone, the ViT's blocks before the sampler) runs once and is
    shared by every ratio, as in evaluation (``None`` is the ratio of a model without sampler, or
    the sampler's default ratio).
    """
    # Module names are rooted at the called module: DETR's transformer is a root of predict's
    # (its sampler inside it); the ViT's sampler is one itself.
    transformer = getattr(model, "transformer", None)
    name = type(transformer).__name__ if transformer is not None else None
    sampler_name = f"{name}.sampler" if name is not None else "PollAndPoolSampler"
    with _without_grad(model):
        with flop_counter() as counter:
            features = model.extract_features(image[None])
        shared = counter.get_total_flops()
        result = {}
        for ratio in ratios:
            with flop_counter() as counter:
                model.predict(features, ratio)
            counts = counter.get_flop_counts()
            result[ratio] = ImageFlops(total=gflops(shared + counter.get_total_flops()),
                                       transformer=gflops(sum(counts.get(name, {}).values())) if name else None,
                                       sampler=gflops(sum(counts.get(sampler_name, {}).values())))
    return result


def mean_flops(model: nn.Module, images: Iterable[Tensor],
               ratios: Sequence[Optional[float]]) -> dict[Optional[float], ImageFlops]:
    """Mean per-image GFLOPs over ``images`` at each ratio.

    FLOPs depend only on the image size, so each distinct size is counted once.
    """
    by_size: dict[tuple[int, ...], dict[Optional[float], ImageFlops]] = {}
    per_image = []
    for image in images:
        size = tuple(image.shape)
        if size not in by_size:
            by_size[size] = count_flops(model, image, ratios)
        per_image.append(by_size[size])
    if not per_image:
        raise ValueError("mean_flops needs at least one image")
    return {r: ImageFlops(total=fmean(c[r].total for c in per_image),
                          transformer=None if per_image[0][r].transformer is None
                          else fmean(c[r].transformer for c in per_image),
                          sampler=fmean(c[r].sampler for c in per_image))
            for r in ratios}
