"""DETR's panoptic segmentation model (``--masks``), its mask losses and post-processing.

``DETRsegm`` wraps a detector (``self.detr``, keys ``detr.*``) and adds, with DETR's key names:

- ``bbox_attention``: each decoder output's multi-head attention map over the encoder memory
  laid out on the ``H x W`` feature grid;
- ``mask_head``: a small FPN-style convolution stack that turns those maps, the projected
  features and the backbone's stages 3, 2, 1 (2, 1 for a backbone ending at stage 2) into one
  mask logit map per query (stride 4);
- with the PnP sampler, ``grid_memory``: the encoder memory of the ``N + M`` sampled tokens put
  back on the grid (``GridMemory``, keys ``grid_memory.unpool_proj.{weight,bias}``).

With ``--frozen_weights`` the detector is frozen (no gradient, kept in eval mode) and only
``bbox_attention``, ``mask_head`` and ``grid_memory`` train: DETR's two-stage recipe.
"""
import io
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from util.checkpoint import load_model_weights, read_checkpoint
from util.errors import UserError
from util.panoptic_png import ids_to_rgb

from .detr import DETR, ImageFeatures, SetCriterion, build as build_detector
from .pnp import PollAndPoolSampler, SampledTokens

MASK_STRIDE = 4  # the mask head's output is at the resolution of backbone stage 1


class GridMemory(nn.Module):
    """The encoder memory of the sampler's tokens back on the ``H x W`` grid.

    Every polled position gets exactly the memory of its fine token. Every other position
    ``p`` gets the convex combination ``sum_m w[p, m] coarse_m`` of the ``M`` coarse memories,
    with ``w[p] = softmax_m(unpool_proj(LN(x_p)))``: a second learned projection ``C -> M``
    (the pool's ``k_proj`` is the first) of the position's own feature, normalised as the
    sampler normalises it (LayerNorm without affine parameters). Padded positions get zeros.
    In the two-stage recipe ``unpool_proj`` starts from the sampler's ``k_proj``
    (``start_from_pool``), so a position first goes back to the coarse tokens that pooled it.
    """

    def __init__(self, dim: int, num_coarse: int):
        super().__init__()
        self.norm_feature = nn.LayerNorm(dim, elementwise_affine=False)
        self.unpool_proj = nn.Linear(dim, num_coarse)

    def forward(self, memory: Tensor, sampled: SampledTokens, x: Tensor, mask: Tensor) -> Tensor:
        """memory: ``(B, N + M, C)``; x: ``(B, C, H, W)`` the sampler's input; mask: ``(B, H, W)``.

        Returns the memory grid ``(B, C, H, W)``.
        """
        batch, dim, height, width = x.shape
        length, num_fine = height * width, sampled.num_fine
        features = self.norm_feature(x.flatten(2).transpose(1, 2))           # (B, L, C)
        weights = self.unpool_proj(features).softmax(dim=-1)                 # (B, L, M)
        coarse = memory[:, num_fine:].to(weights.dtype)                      # (B, M, C)
        grid = weights @ coarse                                              # (B, L, C)
        # Fine slots beyond N_b are padding: send them to an extra row that is then dropped.
        fine_pad = torch.arange(num_fine, device=x.device)[None] >= sampled.num_polled[:, None]
        index = sampled.poll_index.masked_fill(fine_pad, length)[..., None].expand(-1, -1, dim)
        grid = torch.cat([grid, grid.new_zeros(batch, 1, dim)], dim=1)
        grid = grid.scatter(1, index, memory[:, :num_fine].to(grid.dtype))[:, :length]
        grid = grid.masked_fill(mask.flatten(1)[..., None], 0.0)
        return grid.transpose(1, 2).reshape(batch, dim, height, width)

    def start_from_pool(self, sampler: PollAndPoolSampler) -> None:
        """Copy the sampler's one-layer ``k_proj`` into ``unpool_proj``: each position then starts
        out assigned to the coarse tokens whose pool scores it highest (a two-layer ``k_proj``
        cannot be copied; ``unpool_proj`` keeps its own initialisation)."""
        if isinstance(sampler.k_proj, nn.Linear):
            with torch.no_grad():
                self.unpool_proj.weight.copy_(sampler.k_proj.weight)
                self.unpool_proj.bias.copy_(sampler.k_proj.bias)


class MHAttentionMap(nn.Module):
    """Attention weights (no values) of queries over a feature map, DETR's ``bbox_attention``.

    ``forward(q (B, Q, C), k (B, C, H, W), mask (B, H, W))`` returns ``(B, Q, heads, H, W)``;
    the softmax runs jointly over heads and positions, as in DETR; padding gets weight 0.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden dim {hidden_dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        for layer in (self.q_linear, self.k_linear):
            nn.init.zeros_(layer.bias)
            nn.init.xavier_uniform_(layer.weight)
        self.scale = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        heads, head_dim = self.num_heads, self.hidden_dim // self.num_heads
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight[..., None, None], self.k_linear.bias)
        q = q.view(q.shape[0], q.shape[1], heads, head_dim)
        k = k.view(k.shape[0], heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", q * self.scale, k)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        weights = weights.flatten(2).softmax(dim=-1).view(weights.shape)
        return self.dropout(weights)


def _group_norm(channels: int) -> nn.GroupNorm:
    """DETR's GroupNorm(8, C); narrower widths (tiny test models) take ``gcd(8, C)`` groups."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _expand(x: Tensor, num_queries: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B * Q, C, H, W)``, each image repeated for its ``Q`` queries."""
    return x[:, None].expand(-1, num_queries, -1, -1, -1).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """DETR's FPN-style mask head: 5 conv + GroupNorm + ReLU layers, up to 3 FPN adapters.

    Widths: ``dim`` (= d + heads), then ``context_dim / 2, / 4, / 8, / 16``, then 1 logit.
    ``forward(x (B, d, H, W), bbox_mask (B, Q, heads, H, W), fpns)`` with ``fpns`` the
    backbone stages, coarse to fine, at strides no coarser than ``x``'s (``fpn_dims``
    channels, one adapter each: ``adapter1`` before ``lay3``, ``adapter2`` before ``lay4``,
    ``adapter3`` before ``lay5``); returns ``(B, Q, H_1, W_1)`` mask logits at the resolution of
    the last FPN level. DETR's head has three levels (stages 3, 2, 1); with two (a backbone
    ending at stage 2) ``lay5`` runs on the finest level without an adapter.
    """

    def __init__(self, dim: int, fpn_dims: list[int], context_dim: int):
        super().__init__()
        widths = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = _group_norm(dim)
        self.lay2 = nn.Conv2d(dim, widths[1], 3, padding=1)
        self.gn2 = _group_norm(widths[1])
        self.lay3 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.gn3 = _group_norm(widths[2])
        self.lay4 = nn.Conv2d(widths[2], widths[3], 3, padding=1)
        self.gn4 = _group_norm(widths[3])
        self.lay5 = nn.Conv2d(widths[3], widths[4], 3, padding=1)
        self.gn5 = _group_norm(widths[4])
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        if not 1 <= len(fpn_dims) <= 3:
            raise ValueError(f"the mask head takes 1 to 3 FPN levels, got {len(fpn_dims)}")
        for level, channels in enumerate(fpn_dims, start=1):
            setattr(self, f"adapter{level}", nn.Conv2d(channels, widths[level], 1))
        self.num_levels = len(fpn_dims)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: list[Tensor]) -> Tensor:
        batch, num_queries = bbox_mask.shape[:2]
        x = torch.cat([_expand(x, num_queries), bbox_mask.flatten(0, 1)], dim=1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        if len(fpns) != self.num_levels:
            raise ValueError(f"the mask head was built for {self.num_levels} FPN levels, got {len(fpns)}")
        for level, (layer, norm) in enumerate([(self.lay3, self.gn3), (self.lay4, self.gn4),
                                               (self.lay5, self.gn5)], start=1):
            if level <= self.num_levels:
                fpn = _expand(getattr(self, f"adapter{level}")(fpns[level - 1]), num_queries)
                x = fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
            x = F.relu(norm(layer(x)))
        return self.out_lay(x).view(batch, num_queries, *x.shape[-2:])


class DETRsegm(nn.Module):
    """A detector plus ``bbox_attention`` and ``mask_head``: adds ``pred_masks (B, Q, H/4, W/4)``.

    The masks are those of the detector's query group 0: with ``--query_groups`` the extra
    groups of training, and with ``--dn_groups`` the denoising queries, get box and class losses only.

    The mask head reads backbone stages 3, 2, 1 (C4, C3, C2), or 2, 1 when the backbone ends
    at stage 2, so the backbone must return its intermediate stages (built with ``--masks``).
    ``freeze_detr`` stops every detector gradient and keeps the detector in eval mode
    (BatchNorm statistics, dropout) whatever ``train()`` is asked.
    """

    def __init__(self, detr: DETR, freeze_detr: bool = False):
        super().__init__()
        self.detr = detr
        self.freeze_detr = freeze_detr
        if freeze_detr:
            detr.requires_grad_(False)
        hidden_dim, num_heads = detr.transformer.d_model, detr.transformer.nhead
        stage_channels = detr.backbone[0].stage_channels
        self.fpn_stages = list(range(min(len(stage_channels), 3), 0, -1))    # 3, 2, 1 or 2, 1
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, num_heads, dropout=0.0)
        self.mask_head = MaskHeadSmallConv(hidden_dim + num_heads,
                                           [stage_channels[stage - 1] for stage in self.fpn_stages], hidden_dim)
        sampler = detr.transformer.sampler
        self.grid_memory = GridMemory(hidden_dim, sampler.num_coarse) if sampler is not None else None

    @property
    def uses_pnp(self) -> bool:
        return self.detr.uses_pnp

    @property
    def backbone(self) -> nn.Module:
        return self.detr.backbone

    @property
    def transformer(self) -> nn.Module:
        return self.detr.transformer

    def train(self, mode: bool = True) -> "DETRsegm":
        super().train(mode)
        if self.freeze_detr:
            self.detr.eval()
        return self

    def extract_features(self, samples: Any) -> ImageFeatures:
        return self.detr.extract_features(samples)

    def memory_grid(self, memory: Tensor, sampled: Optional[SampledTokens], features: ImageFeatures) -> Tensor:
        """Encoder memory ``(B, T, C)`` as a ``(B, C, H, W)`` grid (as is without a sampler)."""
        if sampled is None:
            batch, channels, height, width = features.src.shape
            return memory.transpose(1, 2).reshape(batch, channels, height, width)
        return self.grid_memory(memory, sampled, features.src, features.mask)

    def predict(self, features: ImageFeatures, sample_ratio: Optional[float] = None,
                targets: Optional[list[dict[str, Tensor]]] = None) -> dict[str, Any]:
        detr = self.detr
        hs, memory, sampled, denoising = detr.decode(features, sample_ratio, targets)
        out = detr.detection_outputs(hs, sampled, denoising, memory, features.mask)
        grid = self.memory_grid(memory, sampled, features)
        bbox_mask = self.bbox_attention(hs[-1, :, :detr.num_queries], grid, features.mask)
        fpns = [features.stages[stage - 1].tensors for stage in self.fpn_stages]
        out["pred_masks"] = self.mask_head(features.src, bbox_mask, fpns)
        return out

    def forward(self, samples: Any, sample_ratio: Optional[float] = None,
                targets: Optional[list[dict[str, Tensor]]] = None) -> dict[str, Any]:
        return self.predict(self.extract_features(samples), sample_ratio, targets)


def upsample_masks(masks: Tensor, height: int, width: int) -> Tensor:
    """Stride-4 mask logits ``(K, h, w)`` -> ``(K, height, width)`` image pixels.

    Bilinear upsampling by exactly 4 keeps each logit over the 4x4 pixels it was computed
    from; the result is then cropped to the image (the batch is padded bottom/right).
    """
    up = F.interpolate(masks[:, None].float(), scale_factor=MASK_STRIDE, mode="bilinear", align_corners=False)
    return up[:, 0, :height, :width]


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: Tensor | float) -> Tensor:
    """``sum_k 1 - (2 |p_k t_k| + 1) / (|p_k| + |t_k| + 1)`` over masks, divided by ``num_boxes``.

    inputs: ``(K, P)`` logits; targets: ``(K, P)`` in ``{0, 1}``; ``p = sigmoid(inputs)``.
    """
    probs = inputs.sigmoid()
    numerator = 2 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: Tensor | float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss (RetinaNet) per pixel, averaged over pixels, summed over masks / ``num_boxes``.

    ``alpha_t (1 - p_t)^gamma BCE(inputs, targets)``; inputs: ``(K, P)`` logits, targets ``(K, P)``.
    """
    probs = inputs.sigmoid()
    bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * bce).mean(1).sum() / num_boxes


class SegmentationCriterion(SetCriterion):
    """``SetCriterion`` plus ``masks``: ``loss_mask`` (sigmoid focal) and ``loss_dice``.

    Computed on the final decoder output only (auxiliary outputs have no masks), between each
    matched query's mask upsampled to the padded batch and its target ``masks (K, H, W)``.
    """

    def loss_masks(self, outputs: dict, targets: list[dict], indices: list, num_boxes: Tensor) -> dict[str, Tensor]:
        if "pred_masks" not in outputs:
            return {}
        batch_idx, query_idx = self._matched(indices)
        pred = outputs["pred_masks"][batch_idx, query_idx]                 # (K, h, w)
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        matched = []
        for t, (_, j) in zip(targets, indices):
            masks = t["masks"][j].float()
            matched.append(F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2])))
        target = torch.cat(matched).to(pred.device).flatten(1)            # (K, H * W)
        pred = upsample_masks(pred, height, width).flatten(1)
        return {"loss_mask": sigmoid_focal_loss(pred, target, num_boxes),
                "loss_dice": dice_loss(pred, target, num_boxes)}


class PostProcessSegm(nn.Module):
    """Adds binary ``masks (K, H, W)`` at the original image size to ``PostProcess`` results."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, results: list[dict[str, Tensor]], outputs: dict[str, Any], processed_sizes: Tensor,
                target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """processed_sizes: ``(B, 2)`` network input ``(h, w)``; target_sizes: ``(B, 2)`` original."""
        for result, masks, size, target in zip(results, outputs["pred_masks"], processed_sizes, target_sizes):
            logits = upsample_masks(masks, *size.tolist())
            logits = F.interpolate(logits[:, None], size=tuple(target.tolist()), mode="bilinear",
                                   align_corners=False)[:, 0]
            result["masks"] = logits.sigmoid() > self.threshold
        return results


class PostProcessPanoptic(nn.Module):
    """Model outputs -> per image a panoptic PNG (``png_string``) and its ``segments_info``.

    Queries whose most likely class is a category of ``is_thing_map`` (not no-object) with
    probability above ``threshold`` are kept. Each kept thing query is a segment; the kept
    queries of one stuff class form one segment whose mask logit is their maximum. Segments
    compete for every pixel (argmax of the mask logits at the network input size, then
    nearest resizing to the original size); segments of 4 pixels or fewer are dropped and the
    rest compete again, until none is that small (DETR's rule; DETR drops the extra queries of
    a stuff class instead of merging their masks). Segment ids are 1, 2, ...; 0 (void) marks
    an image with no segment. PNG colours encode ids as ``R + 256 G + 256^2 B``.
    """

    def __init__(self, is_thing_map: dict[int, bool], threshold: float = 0.85):
        super().__init__()
        self.is_thing_map = dict(is_thing_map)
        self.threshold = threshold

    def _merge_stuff(self, logits: Tensor, labels: list[int]) -> tuple[Tensor, list[int]]:
        """``(K, H, W)`` query logits -> ``(S, H, W)`` segment logits, one per thing query or stuff class."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault((label, i if self.is_thing_map[label] else -1), []).append(i)
        if not groups:
            return logits, []
        merged = torch.stack([logits[members].amax(0) for members in groups.values()])
        return merged, [label for label, _ in groups]

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], processed_sizes: Tensor, target_sizes: Tensor) -> list[dict[str, Any]]:
        """processed_sizes: ``(B, 2)`` network input ``(h, w)``; target_sizes: ``(B, 2)`` original."""
        results = []
        probs = outputs["pred_logits"].float().softmax(-1)
        for prob, masks, size, target in zip(probs, outputs["pred_masks"], processed_sizes, target_sizes):
            scores, labels = prob.max(-1)
            known = torch.tensor([label in self.is_thing_map for label in labels.tolist()], device=labels.device)
            keep = (labels != prob.shape[-1] - 1) & (scores > self.threshold) & known
            logits, labels = self._merge_stuff(upsample_masks(masks[keep], *size.tolist()), labels[keep].tolist())
            target_size = tuple(target.tolist())
            ids = torch.zeros(target_size, dtype=torch.long)
            segments: list[dict[str, Any]] = []
            while labels:
                owner = logits.argmax(0)[None, None].float()
                owner = F.interpolate(owner, size=target_size, mode="nearest")[0, 0].long().cpu()
                area = torch.bincount(owner.flatten(), minlength=len(labels))
                small = area <= 4
                if not small.any():
                    ids = owner + 1
                    segments = [{"id": i + 1, "category_id": label, "isthing": self.is_thing_map[label],
                                 "area": int(a)} for i, (label, a) in enumerate(zip(labels, area.tolist()))]
                    break
                logits, labels = logits[~small.to(logits.device)], [c for c, s in zip(labels, small.tolist()) if not s]
            buffer = io.BytesIO()
            Image.fromarray(ids_to_rgb(ids.numpy())).save(buffer, format="PNG")
            results.append({"png_string": buffer.getvalue(), "segments_info": segments})
        return results


def load_frozen_detector(model: DETRsegm, path: str) -> None:
    """Load ``--frozen_weights`` (a detector checkpoint) into ``model.detr``, every key required."""
    checkpoint = read_checkpoint(path, flag="--frozen_weights")
    notes = load_model_weights(model.detr, checkpoint["model"], path)
    if notes:
        raise UserError(f"--frozen_weights: {notes[0]}; a frozen detector must be complete "
                        "(train it with the same --num_classes and --no_pnp)")
    if model.grid_memory is not None:
        model.grid_memory.start_from_pool(model.detr.transformer.sampler)


def build(args: Any) -> tuple[DETRsegm, SegmentationCriterion, dict[str, nn.Module]]:
    """The segmentation model (``--masks``), its criterion and the ``bbox``/``segm`` post-processors.

    The panoptic post-processor needs the dataset's categories: see ``PostProcessPanoptic``.
    """
    detr, detr_criterion, postprocessors = build_detector(args)
    model = DETRsegm(detr, freeze_detr=args.frozen_weights is not None)
    weight_dict = {**detr_criterion.weight_dict, "loss_mask": args.mask_loss_coef,
                   "loss_dice": args.dice_loss_coef}
    criterion = SegmentationCriterion(args.num_classes, detr_criterion.matcher, weight_dict, args.eos_coef,
                                      losses=[*detr_criterion.losses, "masks"])
    return model, criterion, {**postprocessors, "segm": PostProcessSegm()}
