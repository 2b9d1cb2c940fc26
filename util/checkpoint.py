"""Reading and writing training checkpoints.

A checkpoint is ``{'model': state_dict, 'optimizer', 'lr_scheduler', 'epoch', 'args'}`` as in
DETR and PnP-DETR; ours store ``args`` as a plain dict so ``torch.load(weights_only=True)``
reads them. Official checkpoints pickle an ``argparse.Namespace``, which is allowed too.
Trained with ``--ema_decay``, ``model`` holds the moving average of the weights, the model that
evaluates, and ``trained_model`` the weights the optimiser updates, from which a resumed run goes on.
"""
import argparse
import os
from typing import Any

import torch
from torch import nn

from util.errors import UserError

# Official DETR / PnP-DETR checkpoints store their flags as an argparse.Namespace.
torch.serialization.add_safe_globals([argparse.Namespace])

TRAINED_MODEL_KEY = "trained_model"  # the optimiser's weights beside their average in "model" (--ema_decay)
SAMPLER_PREFIX = "transformer.sampler."
# The PnP mask head's unpooling of the sampled memory (models.segmentation.GridMemory): there only with a
# sampler, so a mask head trained without one has none, and it starts fresh with the sampler.
GRID_MEMORY_PREFIX = "grid_memory."
# The detector's training-only parts (TRAINING_ONLY): state_dict keys that start with the prefix,
# or hold it after a module prefix such as the segmentation model's "detr.".
EXTRA_QUERIES_KEY = "extra_query_embed.weight"  # Group DETR's query groups (--query_groups)
DENOISING_PREFIX = "denoising."  # DN-DETR's denoising queries (--dn_groups)
ENCODER_HEAD_PREFIX = "encoder_head."  # Co-DETR's dense head on the encoder (--encoder_head)
TRAINING_ONLY = {EXTRA_QUERIES_KEY: ("extra query groups of Group DETR", "--query_groups"),
                 DENOISING_PREFIX: ("denoising queries of DN-DETR", "--dn_groups"),
                 ENCODER_HEAD_PREFIX: ("weights of the encoder head of Co-DETR", "--encoder_head")}

# The published DETR checkpoints, by name: ``--finetune detr_r50`` (or ``--resume``, ``predict.py
# --checkpoint``) downloads the file because the command names it.
PUBLISHED_CHECKPOINTS = {
    "detr_r50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_r50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_r101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_r101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
}


def read_checkpoint(source: str, flag: str = "--resume") -> dict[str, Any]:
    """Load a checkpoint from a path, a URL or the name of a published one (``PUBLISHED_CHECKPOINTS``;
    a URL or name is downloaded only because it was asked for).

    ``flag`` names the command-line flag that gave ``source`` in error messages.
    """
    source = PUBLISHED_CHECKPOINTS.get(source, source)
    if source.startswith(("http://", "https://")):
        try:
            checkpoint = torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=False,
                                                            weights_only=True)
        except OSError as err:
            raise UserError(f"{flag} {source}: download failed ({err}); give a local file instead") from None
    else:
        if not os.path.isfile(source):
            raise UserError(f"{flag}: {source} does not exist")
        try:
            checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling raises many exception types
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{flag}: {source} is not a readable PyTorch checkpoint ({first_line})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"{flag}: {source} is not a DETR/PnP-DETR checkpoint (expected a dict with a 'model' state_dict)")
    return checkpoint


def _preview(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


DEFAULT_ADVICE = "check --backbone, --hidden_dim, --enc_layers/--dec_layers, --num_queries, --no_pnp and --backbone_weights"


def _is_part(key: str, part: str) -> bool:
    """Whether a state_dict key belongs to the training-only ``part`` of ``TRAINING_ONLY``."""
    return key.startswith(part) or f".{part}" in key


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                       built_from: str = "the flags", advice: str = DEFAULT_ADVICE,
                       sampler_prefix: str = SAMPLER_PREFIX, head_prefix: str = "class_embed.") -> list[str]:
    """Load ``state_dict`` into ``model`` with strict key matching, up to three allowed gaps.

    * ``transformer.sampler.*`` (``sampler_prefix``, also under a module prefix such as the mask
      head's ``detr.``) and the PnP mask head's ``grid_memory.*`` absent from the checkpoint (a DETR
      checkpoint loaded into a PnP-DETR, a ViT's into a PnP-ViT): they keep their fresh initialisation.
    * ``class_embed.*`` (``head_prefix``: the class logits) of another shape (fine-tuning on
      another class set): not loaded.
    * ``extra_query_embed.weight`` (Group DETR's extra query groups), ``denoising.*`` (DN-DETR's
      denoising queries) and ``encoder_head.*`` (Co-DETR's encoder head), which only training runs
      (``TRAINING_ONLY``): dropped when the model has none, kept fresh when the checkpoint has none
      or has them of another shape (another number of groups, another class set).

    Returns the notes to print about those gaps. Anything else that does not fit raises a
    ``UserError`` naming the checkpoint and the keys, in one line, saying what the model was
    ``built_from`` and ending in ``advice``.
    """
    own = model.state_dict()
    notes = []
    state_dict = dict(state_dict)
    resized = [k for k in state_dict if k.startswith(head_prefix) and k in own
               and state_dict[k].shape != own[k].shape]
    if resized:
        head, bias = head_prefix.rstrip("."), f"{head_prefix}bias"
        notes.append(f"{source}: {head} has {state_dict[bias].shape[0]} logits, "
                     f"the model {own[bias].shape[0]}: {head} starts fresh")
        for k in resized:
            del state_dict[k]
    fresh_parts = []
    for part, (what, flag) in TRAINING_ONLY.items():
        dropped = [k for k in state_dict if _is_part(k, part) and (k not in own or state_dict[k].shape != own[k].shape)]
        if any(k not in own for k in dropped):
            notes.append(f"{source}: the {what} (training only) are not in the model: dropped")
        for k in dropped:
            del state_dict[k]
        fresh = [k for k in own if _is_part(k, part) and k not in state_dict]
        if any(k in own for k in dropped):  # another --query_groups, or another class set
            notes.append(f"{source}: its {what} are of another shape than the model's: they start fresh")
        elif fresh:
            notes.append(f"{source}: has no {what} for the model's {flag}: they start fresh")
        fresh_parts += fresh
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
    # BatchNorm2d and FrozenBatchNorm2d hold the same statistics but for this counter.
    unexpected = sorted(k for k in state_dict if k not in own and not k.endswith("num_batches_tracked"))
    missing = sorted(k for k in own if k not in state_dict and k not in resized and k not in fresh_parts
                     and not k.endswith("num_batches_tracked"))
    sampler_missing = [k for k in missing if _is_part(k, sampler_prefix) or _is_part(k, GRID_MEMORY_PREFIX)]
    missing = [k for k in missing if k not in sampler_missing]
    problems = []
    if missing:
        problems.append(f"missing {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_preview(mismatched)}")
    if problems:
        raise UserError(f"{source}: checkpoint does not fit the model built from {built_from} "
                        f"({'; '.join(problems)}); {advice}")
    if sampler_missing:
        notes.append(f"{source}: no {sampler_prefix.rstrip('.')} weights (a model without sampler): the sampler starts fresh")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return notes


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as a plain dict of str/int/float/bool/None/lists, safe for weights_only loading."""
    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value)

    return {k: plain(v) for k, v in vars(args).items()}
