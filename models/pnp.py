"""The poll-and-pool (PnP) sampler of PnP-DETR, shared by the detector and PnP-ViT.

It turns ``L`` positions (a projected feature map of ``L = H * W`` positions, or a ViT's ``L``
patch tokens) into ``N`` fine tokens (the positions a score network polls as most informative)
and ``M`` coarse tokens (the rest, pooled by learned attention), so the transformer works on
``N + M`` tokens instead of ``L``.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCORE_PRED_NETS = ("2layer-fc-256", "2layer-fc-16", "1layer-fc")
KPROJ_NETS = ("1layer-fc", "2layer-fc")


@dataclass
class SampledTokens:
    """What the sampler hands to the transformer (``N`` = max_b N_b, ``M`` coarse tokens).

    tokens: ``(B, N + M, C)``, fine tokens first (in descending score order), then coarse; in the
        sampler's input space with ``retrofit`` (the values of ``x``), else LayerNorm'd and scaled.
    pos: ``(B, N + M, C)`` position embeddings of the tokens; None when the sampler got none
        (ViT tokens carry their position embedding in their features).
    key_padding_mask: ``(B, N + M)`` bool, True where a slot is padding (fine slots beyond
        ``N_b``; coarse slots of an image whose pool is empty, i.e. ratio 1).
    poll_index: ``(B, N)`` flattened position (``y * W + x``, or the token index) of each fine slot.
    num_polled: ``(B,)`` N_b, the number of real fine tokens per image.
    pool_weights: ``(B, M, L)`` each coarse token's weights over positions (0 on polled
        and padded positions; every row sums to 1, or to 0 when the pool is empty).
    scores: ``(B, L)`` poll score of every position, in ``(0, 1)``.
    sample_reg_loss: scalar, mean score of the ``B x N`` fine slots.
    """

    tokens: Tensor
    pos: Optional[Tensor]
    key_padding_mask: Tensor
    poll_index: Tensor
    num_polled: Tensor
    pool_weights: Tensor
    scores: Tensor
    sample_reg_loss: Tensor

    @property
    def num_fine(self) -> int:
        return self.poll_index.shape[1]


def poll_counts(num_valid: Tensor, ratio: float) -> Tensor:
    """``N_b = int(valid_b * r)`` computed in float32 and truncated, as the reference does.

    (180 positions at r = 0.65 give 116, not 117.)
    """
    return (num_valid.to(torch.float32) * ratio).to(torch.int64)  # the float32 product: ratio is rounded to float32


def check_ratio(ratio: float, name: str = "sample ratio") -> float:
    """Return ``ratio`` as a float if ``0 < ratio <= 1``, else raise ValueError naming it."""
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {ratio}")
    return ratio


def _score_pred_net(kind: str, dim: int) -> nn.Module:
    if kind == "2layer-fc-256":
        return nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU(inplace=True), nn.Conv2d(dim, 1, 1))
    if kind == "2layer-fc-16":
        return nn.Sequential(nn.Conv2d(dim, 16, 1), nn.ReLU(inplace=True), nn.Conv2d(16, 1, 1))
    if kind == "1layer-fc":
        return nn.Conv2d(dim, 1, 1)
    raise ValueError(f"--score_pred_net: expected one of {SCORE_PRED_NETS}, got {kind!r}")


def _pointwise(net: nn.Module, tokens: Tensor) -> Tensor:
    """Apply a score net of 1x1 convolutions to ``(B, L, C)`` tokens as matrix products.

    The same function as on the ``(B, C, H, W)`` map, without a convolution kernel's layout
    conversions (measured on CPU: part of a 15-25% faster sampler, docs/BENCHMARKS.md).
    """
    for layer in net if isinstance(net, nn.Sequential) else [net]:
        if isinstance(layer, nn.Conv2d):
            tokens = F.linear(tokens, layer.weight.flatten(1), layer.bias)
        else:
            tokens = layer(tokens)
    return tokens


def _k_proj(kind: str, dim: int, num_coarse: int) -> nn.Module:
    if kind == "1layer-fc":
        return nn.Linear(dim, num_coarse)
    if kind == "2layer-fc":
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, num_coarse))
    raise ValueError(f"--kproj_net: expected one of {KPROJ_NETS}, got {kind!r}")


class PollAndPoolSampler(nn.Module):
    """Poll the top ``r`` fraction of positions as fine tokens, pool the rest into ``M`` tokens.

    Per image ``b`` with ``valid_b`` non-padded positions:

    1. ``s = sigmoid(score_pred_net(x))`` scores every position.
    2. ``N_b = int(valid_b * r)`` positions with the highest (detached) score are polled;
       padded positions are never polled. The batch is padded to ``max_b N_b`` slots.
    3. Fine token = ``LN(x) * s`` (LayerNorm without affine); the product is the score
       network's gradient path. It keeps its position embedding.
    4. Coarse token ``m`` = ``sum_p a[m, p] v_proj(LN(x_p))`` over the non-polled, non-padded
       positions ``p``, with ``a[m] = softmax_p(k_proj(LN(x_p))[m])``; its position embedding
       is ``sum_p a[m, p] pos_p``.

    Because every row of ``a`` sums to one, ``v_proj`` is applied after pooling (``M`` rows
    instead of ``L``), which is the same function at a fraction of the cost.

    With ``retrofit`` the token values stay in the input's space, so the sampler can sit on weights
    trained without it (a DETR's encoder, a ViT's later blocks) and ratio 1 computes that model:
    a fine token is ``x + x (s - stopgrad(s))``, equal to ``x`` in value with the gradient ``x``
    with respect to ``s`` that ``x * s`` has, and a coarse token is ``sum_p a[m, p] x_p`` (no
    ``v_proj``; the pool logits still read ``LN(x)``). Not ``+ v_proj(...)`` started at zero: that is
    the same function until fine-tuned, for ``C x C`` more weights (not measured here: no trained DETR).

    Args:
        dim: channels ``C`` of the feature map or tokens.
        num_coarse: ``M``, the number of pooled tokens.
        default_ratio: ``r`` used when ``forward`` gets none.
        score_pred_net: ``2layer-fc-256`` (C->C->1), ``2layer-fc-16`` (C->16->1) or ``1layer-fc``.
        kproj_net: ``1layer-fc`` (C->M) or ``2layer-fc`` (C->C->M).
        pos_embed_kproj: add the position embedding to the features before ``k_proj``.
        retrofit: keep the token values of the input (no LayerNorm, score or ``v_proj`` on them).
    """

    def __init__(self, dim: int, num_coarse: int, default_ratio: float = 1 / 3,
                 score_pred_net: str = "2layer-fc-256", kproj_net: str = "1layer-fc",
                 pos_embed_kproj: bool = False, retrofit: bool = False):
        super().__init__()
        if num_coarse < 1:
            raise ValueError(f"the pool needs at least one coarse token, got num_coarse={num_coarse}")
        self.default_ratio = check_ratio(default_ratio, "--sample_topk_ratio")
        self.num_coarse = num_coarse
        self.pos_embed_kproj = pos_embed_kproj
        self.retrofit = retrofit
        self.score_pred_net = _score_pred_net(score_pred_net, dim)
        self.norm_feature = nn.LayerNorm(dim, elementwise_affine=False)
        self.k_proj = _k_proj(kproj_net, dim, num_coarse)
        self.v_proj = None if retrofit else nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                ratio: Optional[float] = None, num_valid: Optional[Tensor] = None) -> SampledTokens:
        """Sample a feature map or a sequence of tokens; ratio in (0, 1].

        x: ``(B, C, H, W)`` feature map (the detector) or ``(B, L, C)`` tokens (PnP-ViT, the
        class token left out). mask: ``(B, H, W)`` / ``(B, L)`` bool, True on padding, or None
        when no position is padded (every image of the batch has the same size). pos: position
        embeddings in the layout of ``x``, or None (ViT tokens already hold theirs; the returned
        ``pos`` is then None).

        num_valid: ``(B,)`` int64 on the CPU, the unpadded positions of each image
        (``models.backbone.unpadded_positions``). The number of fine tokens sizes the encoder's
        input, so it must be known on the host: without a mask it is ``L``; given these counts, it
        is, without reading ``mask``; without them it is counted from ``mask``, which on a GPU
        waits for the device.
        """
        ratio = self.default_ratio if ratio is None else ratio
        if not torch.compiler.is_compiling():  # compiled, a check on the value would recompile for every ratio
            ratio = check_ratio(ratio)
        if x.dim() == 4:                                                # a (B, C, H, W) map -> (B, L, C)
            tokens = x.flatten(2).transpose(1, 2)
            pos = None if pos is None else pos.flatten(2).transpose(1, 2)
            mask = None if mask is None else mask.flatten(1)
        else:
            tokens = x
        batch, length = tokens.shape[:2]
        if mask is None:  # no padding: every image has L positions, known on the host
            mask = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
            num_valid = torch.full((batch,), length, dtype=torch.int64)
        pad = mask                                                      # (B, L)
        if pos is None and self.pos_embed_kproj:
            raise ValueError("--pos_embed_kproj needs position embeddings, and the sampler got none")
        scores = _pointwise(self.score_pred_net, tokens).sigmoid().flatten(1)  # (B, L)
        features = self.norm_feature(tokens)                            # (B, L, C)

        # Poll: the top N_b positions by detached score; padding ranks last.
        counts = poll_counts((~pad).sum(1) if num_valid is None else num_valid, ratio)
        # Reads the device only without num_valid. .item(), not int(): under torch.export (ONNX) the count
        # stays a symbolic value of the graph instead of failing as a data-dependent Python int.
        num_fine = counts.max().item()
        num_polled = counts.to(x.device, non_blocking=True)            # (B,)
        rank_scores = scores.detach().masked_fill(pad, -1.0)
        poll_index = rank_scores.topk(num_fine, dim=1).indices          # (B, N)
        fine_pad = torch.arange(num_fine, device=x.device)[None] >= num_polled[:, None]
        poll_scores = scores.gather(1, poll_index)                      # (B, N)
        rows = torch.arange(batch, device=x.device)[:, None]
        if self.retrofit:  # value x exactly (s - s is 0), gradient x with respect to s
            polled_values = tokens[rows, poll_index]
            fine = polled_values + polled_values * (poll_scores - poll_scores.detach())[..., None]
        else:
            fine = features[rows, poll_index] * poll_scores[..., None]  # row copies, faster than gather
        fine_pos = None if pos is None else pos[rows, poll_index]

        # Pool: attention of M learned queries over the positions left out of the poll.
        polled = torch.zeros_like(pad).scatter(1, poll_index, ~fine_pad)
        left_out = polled | pad                                         # (B, L)
        empty_pool = left_out.all(dim=1)                                # (B,)
        logits = self.k_proj(features + pos if self.pos_embed_kproj else features)  # (B, L, M)
        logits = logits.transpose(1, 2).contiguous()                    # (B, M, L): softmax over contiguous rows
        # A finite fill keeps an empty pool's softmax (and its gradient) free of NaN.
        logits = logits.masked_fill(left_out[:, None, :], torch.finfo(logits.dtype).min)
        pool_weights = logits.softmax(dim=-1)                           # (B, M, L)
        pool_weights = pool_weights.masked_fill(empty_pool[:, None, None], 0.0)
        if self.retrofit:
            coarse = pool_weights @ tokens.to(pool_weights.dtype)       # (B, M, C)
        else:
            coarse = self.v_proj(pool_weights @ features)               # (B, M, C)
        coarse = coarse.masked_fill(empty_pool[:, None, None], 0.0)
        coarse_pos = None if pos is None else pool_weights @ pos.to(pool_weights.dtype)
        coarse_pad = empty_pool[:, None].expand(-1, self.num_coarse)

        return SampledTokens(
            tokens=torch.cat([fine, coarse.to(fine.dtype)], dim=1),
            pos=None if pos is None else torch.cat([fine_pos, coarse_pos.to(fine_pos.dtype)], dim=1),
            key_padding_mask=torch.cat([fine_pad, coarse_pad], dim=1),
            poll_index=poll_index,
            num_polled=num_polled,
            pool_weights=pool_weights,
            scores=scores,
            sample_reg_loss=poll_scores.mean(),
        )
