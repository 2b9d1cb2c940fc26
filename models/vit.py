"""PnP-ViT: a Vision Transformer (ViT / DeiT) with the poll-and-pool sampler after block ``k``.

The layers are timm's (``PatchEmbed``, ``Block``) under timm's ``VisionTransformer`` state_dict
names (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}``, ``norm``, ``head``), so
published ViT / DeiT checkpoints load with strict key matching; the sampler's keys (``sampler.*``)
start fresh. The class token bypasses the sampler: blocks ``k..depth-1`` run on
``[class, N fine, M coarse]`` instead of ``[class, L patches]``.
"""
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import Block, PatchEmbed
from torch import Tensor, nn

from util.checkpoint import load_model_weights
from util.errors import UserError

from .pnp import PollAndPoolSampler, SampledTokens
from .vit_archs import GLOBAL_POOLS, VIT_ARCHS


class PnPViT(nn.Module):
    """Patch embedding + class token + learned position embedding -> blocks -> norm -> head.

    With a ``sampler``, the ``L`` patch tokens leaving block ``pnp_after_block`` (0: straight
    after the embedding) are polled and pooled into ``N + M`` tokens for the remaining blocks;
    without one (``--no_pnp``) this is the plain ViT. Nothing but the sampler stands between the two
    halves (no extra norm, no second position embedding), so with a ``retrofit`` sampler, whose tokens
    stay in the residual stream's space, ratio 1 computes the ViT whose weights were loaded (the blocks
    are permutation-equivariant and the head reads the class token or a mean).

    ``forward(images, ratio=None)`` takes ``(B, 3, H, W)`` images and returns
    ``{"logits": (B, num_classes), "sampled": SampledTokens or None}`` and, with a sampler,
    ``"sample_reg_loss"`` (the sampler's score regulariser). ``extract_features`` (the tokens after
    block ``pnp_after_block``, the same at every ratio) + ``predict`` split that computation, so that
    evaluation at several ratios runs the first blocks once.
    """

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 num_classes: int, pnp_after_block: int, sampler: Optional[PollAndPoolSampler] = None,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, global_pool: str = "token"):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise UserError(f"--global_pool: expected one of {GLOBAL_POOLS}, got {global_pool!r}")
        self.global_pool = global_pool
        if not 0 <= pnp_after_block < depth:
            raise UserError(f"--pnp_after_block must lie in 0..{depth - 1} (the ViT has {depth} blocks), "
                            f"got {pnp_after_block}")
        self.pnp_after_block = pnp_after_block
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth, as in DeiT
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate)
                                      for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()
        self.sampler = sampler  # attached after the init: it keeps PyTorch's default init, as in the detector

    def _init_weights(self) -> None:
        """timm's ViT init: truncated normal (std 0.02) position embedding and linear weights."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @property
    def uses_pnp(self) -> bool:
        return self.sampler is not None

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def extract_features(self, images: Tensor) -> Tensor:
        """``(B, 1 + L, C)``: the class and patch tokens after block ``pnp_after_block``."""
        patches = self.patch_embed(images)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        return self.blocks[:self.pnp_after_block](tokens)

    def predict(self, features: Tensor, ratio: Optional[float] = None) -> dict[str, Any]:
        """The sampler (at ``ratio``, or its default), the remaining blocks and the head."""
        cls, patches = features[:, :1], features[:, 1:]
        sampled: Optional[SampledTokens] = None
        if self.sampler is not None:
            sampled = self.sampler(patches, ratio=ratio)
            patches = sampled.tokens
            if sampled.num_fine == self.num_patches:  # ratio 1: every image's pool is empty, drop its M slots
                patches = patches[:, :sampled.num_fine]
        tokens = self.norm(self.blocks[self.pnp_after_block:](torch.cat([cls, patches], dim=1)))
        pooled = tokens[:, 0] if self.global_pool == "token" else tokens[:, 1:].mean(dim=1)
        out: dict[str, Any] = {"logits": self.head(pooled), "sampled": sampled}
        if sampled is not None:
            out["sample_reg_loss"] = sampled.sample_reg_loss
        return out

    def forward(self, images: Tensor, ratio: Optional[float] = None) -> dict[str, Any]:
        return self.predict(self.extract_features(images), ratio)


class ClassificationCriterion(nn.Module):
    """Cross-entropy of the logits (with label smoothing, or against Mixup / CutMix soft targets)
    plus the sampler's score regulariser, as ``SetCriterion`` for the detector.

    ``forward(outputs, targets)`` takes labels ``(B,)`` or soft targets ``(B, num_classes)`` and
    returns ``loss_ce``, ``class_error`` (100 - top-1 against the targets' argmax, %) and with a
    sampler ``sample_reg_loss``; ``weight_dict`` says how they enter the total loss.
    """

    def __init__(self, weight_dict: dict[str, float], smoothing: float = 0.0):
        super().__init__()
        self.weight_dict = weight_dict
        self.smoothing = LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else None
        self.soft = SoftTargetCrossEntropy()

    def forward(self, outputs: dict[str, Any], targets: Tensor) -> dict[str, Tensor]:
        logits = outputs["logits"].float()
        if targets.dim() == 2:
            loss = self.soft(logits, targets)
        else:
            loss = self.smoothing(logits, targets) if self.smoothing is not None else F.cross_entropy(logits, targets)
        labels = targets.argmax(1) if targets.dim() == 2 else targets
        losses = {"loss_ce": loss, "class_error": 100 * (logits.argmax(1) != labels).float().mean()}
        if "sample_reg_loss" in outputs:
            losses["sample_reg_loss"] = outputs["sample_reg_loss"].float()
        return losses


def build(args: Any) -> tuple[PnPViT, ClassificationCriterion, dict[str, nn.Module]]:
    """Model, training criterion and (no) post-processors, as ``models.detr.build``."""
    model = build_vit(args)
    weight_dict = {"loss_ce": 1.0}
    if model.uses_pnp:
        weight_dict["sample_reg_loss"] = args.sample_reg_loss
    mixing = args.mixup > 0 or args.cutmix > 0  # timm's Mixup then smooths the soft targets itself
    return model, ClassificationCriterion(weight_dict, 0.0 if mixing else args.smoothing), {}


def build_vit(args: Any) -> PnPViT:
    """PnP-ViT (or with ``--no_pnp`` the plain ViT) of ``--vit_arch`` from the parsed flags."""
    if args.vit_arch not in VIT_ARCHS:
        raise UserError(f"--vit_arch: expected one of {list(VIT_ARCHS)}, got {args.vit_arch!r}")
    if args.num_classes is None or args.num_classes < 1:
        raise UserError(f"--num_classes: expected a positive class count, got {args.num_classes}")
    if args.input_size % args.patch_size:
        raise UserError(f"--input_size {args.input_size} must be a multiple of --patch_size {args.patch_size}")
    arch = VIT_ARCHS[args.vit_arch]
    sampler = None
    if not args.no_pnp:
        # auto M: the side of the patch grid (14 at 224 px, patch 16), a few percent of the L patches
        num_coarse = args.unsample_abstract_number or args.input_size // args.patch_size
        sampler = PollAndPoolSampler(arch.embed_dim, num_coarse, default_ratio=args.sample_topk_ratio,
                                     score_pred_net=args.score_pred_net, kproj_net=args.kproj_net,
                                     retrofit=getattr(args, "retrofit", False))  # False: args stored before the flag
    return PnPViT(args.input_size, args.patch_size, arch.embed_dim, arch.depth, arch.num_heads,
                  args.num_classes, args.pnp_after_block, sampler, drop_path=args.drop_path,
                  global_pool=args.global_pool)


def vit_state_dict(source: str, arch_name: str) -> dict[str, Tensor]:
    """The ViT weights ``--vit_weights`` names: ``timm`` (timm's published ImageNet weights of
    ``--vit_arch``, downloaded only here) or a PATH to a timm / DeiT checkpoint (a state_dict, or a
    dict holding it under ``model``)."""
    if source == "timm":
        name = VIT_ARCHS[arch_name].timm_weights
        if name is None:
            raise UserError(f"--vit_weights timm: --vit_arch {arch_name} has no published weights; "
                            "use --vit_weights none")
        import timm
        try:
            return timm.create_model(name, pretrained=True).state_dict()
        except Exception as err:  # offline: hub / urllib / requests raise many types
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--vit_weights timm: downloading {name} failed ({first_line}); "
                            "use --vit_weights none or a local PATH") from None
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--vit_weights: {source} does not exist (expected none, timm or a PATH)") from None
    except Exception as err:  # unpickling raises many exception types
        raise UserError(f"--vit_weights: {source} is not a readable PyTorch checkpoint ({type(err).__name__})") from None
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise UserError(f"--vit_weights: {source} holds no state_dict")
    return state_dict


def load_vit_weights(model: PnPViT, state_dict: dict[str, Tensor], source: str) -> list[str]:
    """Load a timm ``VisionTransformer`` state_dict into ``model`` with strict key matching.

    The sampler starts fresh; a head of another class count starts fresh; a position embedding
    of another grid is resampled (timm's ``resample_abs_pos_embed``). Returns the notes to print.
    """
    state_dict = dict(state_dict)
    notes = []
    own = model.pos_embed
    theirs = state_dict.get("pos_embed")
    if theirs is not None and theirs.shape != own.shape:
        grid = int(math.isqrt(model.num_patches))
        state_dict["pos_embed"] = resample_abs_pos_embed(theirs, [grid, grid], num_prefix_tokens=1)
        notes.append(f"{source}: pos_embed resampled from {theirs.shape[1] - 1} to {model.num_patches} patches")
    return notes + load_model_weights(model, state_dict, source, built_from="--vit_arch/--input_size/--patch_size",
                                      advice="check --vit_arch and --patch_size",
                                      sampler_prefix="sampler.", head_prefix="head.")
