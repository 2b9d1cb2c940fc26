"""The detector (DETR, or PnP-DETR with a sampler), its training criterion and post-processing."""
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou, paired_generalized_box_iou
from util.errors import UserError
from util.misc import NestedTensor, get_world_size, is_dist_avail_and_initialized, padded_targets, to_nested_tensor

from .backbone import Joiner, build_backbone, unpadded_positions
from .matcher import HungarianMatcher, build_matcher
from .denoising import Denoising, DenoisingQueries
from .encoder_head import EncoderHead, EncoderPredictions, cell_box_index, decoded_boxes, reference_boxes
from .pnp import SampledTokens
from .transformer import Transformer, build_transformer


@dataclass
class ImageFeatures:
    """The part of the forward pass that does not depend on the poll ratio.

    src: ``(B, d, H, W)`` projected last-stage features; mask: ``(B, H, W)`` True on padding;
    pos: ``(B, d, H, W)`` position encoding; stages: the backbone's returned stages;
    num_valid: ``(B,)`` int64 on the CPU, the unpadded positions of each image in ``src``, for the
    sampler when the input's image sizes are known (it then sizes its tokens without reading ``mask``).
    """

    src: Tensor
    mask: Tensor
    pos: Tensor
    stages: list[NestedTensor]
    num_valid: Optional[Tensor] = None


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DETR(nn.Module):
    """Backbone -> input_proj -> [PnP sampler] -> transformer -> class and box heads.

    ``forward(samples, sample_ratio=None)`` takes a NestedTensor, a ``(B, 3, H, W)`` tensor or
    a list of ``(3, H, W)`` tensors and returns a dict:
    ``pred_logits (B, Q, num_classes + 1)``, ``pred_boxes (B, Q, 4)`` (cx, cy, w, h in [0, 1]),
    ``aux_outputs`` (earlier decoder layers, with aux loss), and with a sampler
    ``sample_reg_loss`` (scalar) and ``sampled`` (``SampledTokens``).

    ``extract_features`` + ``predict`` split the same computation so that evaluation at
    several ratios runs the backbone once.

    With ``query_groups`` G > 1 (Group DETR, ``--query_groups``) the model also holds
    ``extra_query_embed``, G - 1 more groups of ``num_queries`` queries. In training mode the
    decoder runs all G groups (self-attention within each group) and the output also holds
    ``group_outputs``, the G - 1 extra groups' predictions (each a dict of ``pred_logits``,
    ``pred_boxes`` and ``aux_outputs``); in eval mode only ``query_embed`` runs, exactly as in a
    model built without groups.

    With ``denoising`` (DN-DETR, ``--dn_groups``, ``models.denoising``) and ``targets`` given in
    training mode, the decoder also runs denoising queries made from the targets' noised boxes,
    and the output holds ``dn_outputs``: their ``pred_logits``, ``pred_boxes``, ``aux_outputs``
    and the ``Denoising`` they reconstruct. Eval mode and calls without targets run as without.

    With ``encoder_head`` (Co-DETR's dense head on the encoder, ``--encoder_head``,
    ``models.encoder_head``) the output in training mode also holds ``encoder_outputs``, its
    ``EncoderPredictions``.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = False, query_groups: int = 1, denoising: Optional[DenoisingQueries] = None,
                 encoder_head: Optional[EncoderHead] = None):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.query_groups = query_groups
        self.extra_query_embed = (nn.Embedding((query_groups - 1) * num_queries, hidden_dim)
                                  if query_groups > 1 else None)
        self.denoising = denoising
        self.encoder_head = encoder_head

    @property
    def uses_pnp(self) -> bool:
        return self.transformer.sampler is not None

    def extract_features(self, samples: NestedTensor | Tensor | list[Tensor]) -> ImageFeatures:
        samples = to_nested_tensor(samples)
        stages, pos = self.backbone(samples)
        src, mask = stages[-1].decompose()
        num_valid = None
        if self.uses_pnp and samples.image_sizes is not None:
            num_valid = unpadded_positions(samples.image_sizes, samples.tensors.shape[-2:], src.shape[-2:])
        return ImageFeatures(src=self.input_proj(src), mask=mask, pos=pos[-1], stages=stages, num_valid=num_valid)

    def decoder_queries(self) -> tuple[Tensor, int]:
        """The query embeddings the decoder runs and their number of groups: in training mode
        every group (``query_embed`` first, then ``extra_query_embed``), else ``query_embed`` alone."""
        if self.training and self.extra_query_embed is not None:
            return torch.cat([self.query_embed.weight, self.extra_query_embed.weight]), self.query_groups
        return self.query_embed.weight, 1

    def decode(self, features: ImageFeatures, sample_ratio: Optional[float] = None,
               targets: Optional[list[dict[str, Tensor]]] = None
               ) -> tuple[Tensor, Tensor, Optional[SampledTokens], Optional[Denoising]]:
        """The transformer on ``features`` with the queries of this mode: ``(hs, memory, sampled,
        denoising)``, ``denoising`` being the queries made from ``targets`` in training mode with
        ``--dn_groups`` (else None)."""
        queries, groups = self.decoder_queries()
        denoising = None
        if self.training and self.denoising is not None and targets is not None:
            denoising = self.denoising(targets)
        hs, memory, sampled = self.transformer(features.src, features.mask, queries, features.pos, sample_ratio,
                                               features.num_valid, groups, denoising)
        return hs, memory, sampled, denoising

    def predict(self, features: ImageFeatures, sample_ratio: Optional[float] = None,
                targets: Optional[list[dict[str, Tensor]]] = None) -> dict[str, Any]:
        hs, memory, sampled, denoising = self.decode(features, sample_ratio, targets)
        return self.detection_outputs(hs, sampled, denoising, memory, features.mask)

    def _layer_outputs(self, logits: Tensor, boxes: Tensor) -> dict[str, Any]:
        """Predictions of one query group from its ``(layers, B, Q, ...)`` logits and boxes."""
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def detection_outputs(self, hs: Tensor, sampled: Optional[SampledTokens], denoising: Optional[Denoising],
                          memory: Tensor, mask: Tensor) -> dict[str, Any]:
        """The output dict of ``forward`` from the decoder outputs ``hs (layers, B, G * Q [+ D], C)``
        of G query groups (and D denoising queries): group 0's predictions, the others' as
        ``group_outputs`` when G > 1, the denoising queries' as ``dn_outputs``; in training mode the
        encoder head's predictions on ``memory`` (of a feature map padded where ``mask``) as
        ``encoder_outputs``."""
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        num_matching = hs.shape[2] - (0 if denoising is None else denoising.labels.shape[1])
        groups = [self._layer_outputs(group_logits, group_boxes) for group_logits, group_boxes
                  in zip(logits[:, :, :num_matching].split(self.num_queries, dim=2),
                         boxes[:, :, :num_matching].split(self.num_queries, dim=2))]
        out = groups[0]
        if len(groups) > 1:
            out["group_outputs"] = groups[1:]
        if denoising is not None:
            out["dn_outputs"] = {**self._layer_outputs(logits[:, :, num_matching:], boxes[:, :, num_matching:]),
                                 "denoising": denoising}
        if self.training and self.encoder_head is not None:
            out["encoder_outputs"] = self.encoder_head(memory, sampled, mask)
        if sampled is not None:
            out["sample_reg_loss"] = sampled.sample_reg_loss
            out["sampled"] = sampled
        return out

    def forward(self, samples: NestedTensor | Tensor | list[Tensor], sample_ratio: Optional[float] = None,
                targets: Optional[list[dict[str, Tensor]]] = None) -> dict[str, Any]:
        return self.predict(self.extract_features(samples), sample_ratio, targets)


class SetCriterion(nn.Module):
    """DETR's set loss: Hungarian matching, then class, box and (PnP) sampler terms.

    ``losses`` names the ``loss_{name}`` methods to run: ``labels`` (``loss_ce``, logs
    ``class_error``), ``boxes`` (``loss_bbox``, ``loss_giou``) and ``cardinality`` (logs
    ``cardinality_error``); ``models.segmentation`` adds ``masks``. The
    terms are repeated with suffix ``_{i}`` for every auxiliary decoder output, and the
    sampler's ``sample_reg_loss`` is passed through. Each extra query group of
    ``outputs["group_outputs"]`` (Group DETR) is matched one-to-one to the targets on its own and
    adds its weighted terms with suffix ``_group{g}`` (``loss_ce_group1``, ``loss_bbox_0_group1``
    ...), normalised by the same box count. Denoising queries (DN-DETR, ``outputs["dn_outputs"]``)
    add ``loss_denoising``'s terms, the encoder head's (Co-DETR, ``outputs["encoder_outputs"]``)
    ``loss_encoder``'s. ``weight_dict`` says how each term
    enters the total loss. Everything is computed in float32.

    On a GPU the matcher's solver reads the cost matrix on the host; nothing else here waits
    for the device: host values (box counts, the matched indices) are sent to it with
    non-blocking copies.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float, losses: list[str]):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @staticmethod
    def _matched(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx, query_idx

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_boxes: Tensor) -> dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        batch_idx, query_idx = self._matched(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = matched_labels
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if len(matched_labels) > 0:
            correct = (logits[batch_idx, query_idx].argmax(-1) == matched_labels).float().mean()
            losses["class_error"] = 100 * (1 - correct)
        else:
            losses["class_error"] = logits.new_zeros(())
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: list, num_boxes: Tensor) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        actual = torch.tensor([float(len(t["labels"])) for t in targets]).to(logits.device, non_blocking=True)
        return {"cardinality_error": F.l1_loss(predicted, actual)}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: list, num_boxes: Tensor) -> dict[str, Tensor]:
        batch_idx, query_idx = self._matched(indices)
        pred = outputs["pred_boxes"][batch_idx, query_idx].float()
        target = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        loss_bbox = F.l1_loss(pred, target, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    @staticmethod
    def loss_denoising(outputs: dict, denoising: Denoising, num_boxes: Tensor, suffix: str = "") -> dict[str, Tensor]:
        """DN-DETR's reconstruction terms ``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` (with
        ``suffix`` before ``_dn``): each denoising query against the box it was noised from,
        padding slots weighted 0, every term summed and divided by ``num_boxes`` times the number
        of groups (so that, like the others, it averages over processes as over one batch)."""
        valid = denoising.valid.float()
        norm = num_boxes * denoising.groups
        ce = F.cross_entropy(outputs["pred_logits"].float().transpose(1, 2), denoising.labels, reduction="none")
        pred, target = outputs["pred_boxes"].float(), denoising.boxes.float()
        l1 = F.l1_loss(pred, target, reduction="none").sum(-1)
        giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target), reduction="none")
        return {f"loss_ce{suffix}_dn": (ce * valid).sum() / norm, f"loss_bbox{suffix}_dn": (l1 * valid).sum() / norm,
                f"loss_giou{suffix}_dn": (giou * valid).sum() / norm}

    @staticmethod
    def loss_encoder(predictions: EncoderPredictions, targets: list[dict], sync: bool = True) -> dict[str, Tensor]:
        """The encoder head's terms ``loss_ce_enc`` (sigmoid focal loss, alpha 0.25, gamma 2, over
        the classes of every valid token), ``loss_bbox_enc`` and ``loss_giou_enc`` (the tokens with
        a box, ``cell_box_index``), each summed and divided by the number of tokens with a box
        (averaged over processes when ``sync``, as the box count of ``forward``)."""
        logits = predictions.logits.float()
        index = cell_box_index(targets, predictions.mask, predictions.stride).flatten(1)
        assigned = index.gather(1, predictions.cell).masked_fill(~predictions.valid, -1)   # (B, S)
        positive = (assigned >= 0).float()
        num_positives = _process_mean(positive.sum(), sync)
        labels, boxes, _ = padded_targets(targets, logits.device)
        slot = assigned.clamp(min=0)
        classes = F.one_hot(labels.gather(1, slot), logits.shape[-1]).float() * positive[..., None]
        focal = sigmoid_focal_loss(logits, classes, reduction="none").sum(-1)
        image_sizes = torch.stack([t["size"] for t in targets])
        reference = reference_boxes(predictions.cell, predictions.mask.shape[-1], predictions.stride, image_sizes)
        pred = decoded_boxes(predictions.deltas, reference)
        target = boxes.gather(1, slot[..., None].expand(-1, -1, 4))    # a box of the image where none is assigned
        l1 = F.l1_loss(pred, target, reduction="none").sum(-1)
        giou = 1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
        return {"loss_ce_enc": (focal * predictions.valid).sum() / num_positives,
                "loss_bbox_enc": (l1 * positive).sum() / num_positives,
                "loss_giou_enc": (giou * positive).sum() / num_positives}

    def _losses_for(self, outputs: dict, targets: list[dict], num_boxes: Tensor, suffix: str = "") -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        indices = [(src.to(device, non_blocking=True), tgt.to(device, non_blocking=True))
                   for src, tgt in self.matcher(outputs, targets)]
        losses = {}
        for name in self.losses:
            fn = getattr(self, f"loss_{name}")
            losses.update({k + suffix: v for k, v in fn(outputs, targets, indices, num_boxes).items()})
        return losses

    def _set_losses(self, outputs: dict, targets: list[dict], num_boxes: Tensor, suffix: str = "") -> dict[str, Tensor]:
        """The terms of one set of predictions: its final layer's, then its auxiliary outputs'
        weighted terms with ``_{i}`` before ``suffix``."""
        losses = self._losses_for(outputs, targets, num_boxes, suffix)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._losses_for(aux, targets, num_boxes, suffix=f"_{i}{suffix}")
            losses.update({k: v for k, v in aux_losses.items() if k in self.weight_dict})
        return losses

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]],
                sync_num_boxes: bool = True) -> dict[str, Tensor]:
        """Targets per image: ``labels (T,)`` int64 and ``boxes (T, 4)`` cxcywh in [0, 1].

        The box count that normalises the losses is averaged over processes (an all-reduce)
        unless ``sync_num_boxes`` is False, as in evaluation, where ranks may run different
        numbers of batches.
        """
        device = outputs["pred_logits"].device
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets))).to(device, non_blocking=True)
        num_boxes = _process_mean(num_boxes, sync_num_boxes)

        losses = self._set_losses(outputs, targets, num_boxes)
        for g, group in enumerate(outputs.get("group_outputs", []), start=1):
            group_losses = self._set_losses(group, targets, num_boxes, suffix=f"_group{g}")
            losses.update({k: v for k, v in group_losses.items() if k in self.weight_dict})
        if "dn_outputs" in outputs:
            dn_outputs = outputs["dn_outputs"]
            losses.update(self.loss_denoising(dn_outputs, dn_outputs["denoising"], num_boxes))
            for i, aux in enumerate(dn_outputs.get("aux_outputs", [])):
                losses.update(self.loss_denoising(aux, dn_outputs["denoising"], num_boxes, suffix=f"_{i}"))
        if "encoder_outputs" in outputs:
            losses.update(self.loss_encoder(outputs["encoder_outputs"], targets, sync_num_boxes))
        if "sample_reg_loss" in outputs:
            losses["sample_reg_loss"] = outputs["sample_reg_loss"].float()
        return losses


def _process_mean(count: Tensor, sync: bool) -> Tensor:
    """``count`` averaged over processes (an all-reduce) when ``sync`` and distributed, at least 1."""
    if sync and is_dist_avail_and_initialized():
        torch.distributed.all_reduce(count)
        count = count / get_world_size()
    return count.clamp(min=1)


class PostProcess(nn.Module):
    """Model outputs -> per image ``scores``, ``labels``, ``boxes`` (xyxy pixels), in float32."""

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """target_sizes: ``(B, 2)`` image ``(height, width)`` to scale the boxes to."""
        probs = outputs["pred_logits"].float().softmax(-1)
        scores, labels = probs[..., :-1].max(-1)
        boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].float())
        height, width = target_sizes.float().unbind(1)
        boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


def build(args: Any) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """Model, criterion and post-processors from the parsed command-line flags.

    With ``--masks`` this is the detector that ``models.segmentation.build`` wraps (its
    backbone then also returns the earlier stages).
    """
    if args.num_classes is None or args.num_classes < 1:
        raise UserError(f"--num_classes: expected a positive class count, got {args.num_classes}")
    dn_groups = getattr(args, "dn_groups", 0)  # 0: args stored before the flag
    denoising = (DenoisingQueries(args.num_classes, args.hidden_dim, dn_groups, args.dn_label_noise, args.dn_box_noise)
                 if dn_groups > 0 else None)
    backbone = build_backbone(args)
    encoder_weight = getattr(args, "encoder_head", 0.0)  # 0: args stored before the flag
    encoder_head = EncoderHead(args.hidden_dim, args.num_classes, backbone.strides[-1]) if encoder_weight > 0 else None
    model = DETR(backbone, build_transformer(args), num_classes=args.num_classes,
                 num_queries=args.num_queries, aux_loss=not args.no_aux_loss, query_groups=args.query_groups,
                 denoising=denoising, encoder_head=encoder_head)

    weight_dict = {"loss_ce": 1.0, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if not args.no_aux_loss:
        for i in range(args.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in list(weight_dict.items())[:3]})
    one_group = dict(weight_dict)
    for g in range(1, args.query_groups):
        weight_dict.update({f"{k}_group{g}": v for k, v in one_group.items()})
    if denoising is not None:
        weight_dict.update({f"{k}_dn": v for k, v in one_group.items()})
    if encoder_head is not None:  # Co-DETR's weights: 2 for the focal loss, as Deformable DETR's
        weight_dict.update({"loss_ce_enc": 2.0 * encoder_weight, "loss_bbox_enc": args.bbox_loss_coef * encoder_weight,
                            "loss_giou_enc": args.giou_loss_coef * encoder_weight})
    if model.uses_pnp:
        weight_dict["sample_reg_loss"] = args.sample_reg_loss
    criterion = SetCriterion(args.num_classes, build_matcher(args), weight_dict, args.eos_coef,
                             losses=["labels", "boxes", "cardinality"])
    return model, criterion, {"bbox": PostProcess()}
