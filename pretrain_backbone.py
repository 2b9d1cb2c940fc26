"""Pretrain a ResNet backbone from scratch on the boxes of a detection dataset, for --backbone_weights.

The published recipe starts from an ImageNet backbone; without downloads, a DETR-style detector
trained from a random backbone learns very slowly (the decoder cannot tell objects apart before
the features can). This gives the backbone a dense, fast-learning task first: every cell of its
last feature map is classified as the category of the smallest box that holds the cell's centre,
or as background. The weights are saved as a torchvision ResNet state_dict (stem and the stages
kept), with their BatchNorm statistics, and main.py loads them with --backbone_weights PATH
(frozen BatchNorm, stem and layer1 frozen, as for ImageNet weights).

    python pretrain_backbone.py --config configs/demo.yaml --steps 1500 --output outputs/demo/backbone.pth
    python main.py --config configs/demo.yaml --backbone_weights outputs/demo/backbone.pth

Data, model and run flags (--coco_path, --backbone, --backbone_last_stage, --eval_size, --augment,
--batch_size, --num_workers, --device, --seed, --num_classes) are main.py's.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from datasets import build_dataset
from main import check_args, parse_args as training_args, seed_everything
from models import fast_path
from models.backbone import Backbone
from util.errors import UserError, exit_status
from util.misc import NestedTensor, collate_fn, save_on_master

IGNORE = -100  # cross_entropy's ignore_index: padded cells


def cell_labels(targets: Sequence[dict[str, Tensor]], mask: Tensor, stride: int, background: int) -> Tensor:
    """Class of every feature cell: ``(B, h, w)`` int64.

    ``targets[b]["boxes"]`` are normalised ``cx, cy, w, h`` of the unpadded image of
    ``targets[b]["size"]`` (``H, W``) pixels; ``mask`` ``(B, h, w)`` is True on padding. A cell
    covers ``stride`` pixels from the top-left corner; it takes the label of the smallest box
    holding its centre, ``background`` when none does, and ``IGNORE`` on padding.
    """
    batch, height, width = mask.shape
    centre_y = (torch.arange(height, dtype=torch.float32) + 0.5) * stride
    centre_x = (torch.arange(width, dtype=torch.float32) + 0.5) * stride
    labels = torch.full((batch, height, width), background, dtype=torch.int64)
    for b, target in enumerate(targets):
        size_h, size_w = target["size"].tolist()
        cx, cy, w, h = (target["boxes"].float().cpu() * torch.tensor([size_w, size_h, size_w, size_h])).unbind(-1)
        inside = (((centre_y[None, :, None] >= cy[:, None, None] - h[:, None, None] / 2)
                   & (centre_y[None, :, None] <= cy[:, None, None] + h[:, None, None] / 2))
                  & ((centre_x[None, None, :] >= cx[:, None, None] - w[:, None, None] / 2)
                     & (centre_x[None, None, :] <= cx[:, None, None] + w[:, None, None] / 2)))
        for k in torch.argsort(w * h, descending=True).tolist():  # smaller boxes painted last
            labels[b][inside[k]] = int(target["labels"][k])
    labels[mask.cpu()] = IGNORE
    return labels


class CellClassifier(nn.Module):
    """A backbone with a 1x1 convolution scoring ``num_classes + 1`` classes (the last is
    background) on every cell of its last stage."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.num_channels, num_classes + 1, kernel_size=1)

    def forward(self, samples: NestedTensor) -> tuple[Tensor, Tensor]:
        """Logits ``(B, num_classes + 1, h, w)`` and the padding mask ``(B, h, w)``."""
        feature = list(self.backbone(samples).values())[-1]
        return self.head(feature.tensors), feature.mask


def build_pretraining(train: argparse.Namespace, num_classes: int, lr: float,
                      device: torch.device) -> tuple[CellClassifier, torch.optim.Optimizer]:
    """``train``'s backbone (every layer trained, BatchNorm included) with its cell head, on
    ``device`` in main.py's layout, and its fused AdamW at ``lr``."""
    backbone = Backbone(train.backbone, train_backbone=True, return_interm_layers=False, dilation=train.dilation,
                        frozen_bn=False, last_stage=train.backbone_last_stage)
    model = fast_path(CellClassifier(backbone, num_classes).to(device), channels_last=not train.no_channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=train.weight_decay, fused=True)


def pretraining_loader(dataset: Dataset, train: argparse.Namespace, batch_size: int,
                       device: torch.device) -> DataLoader:
    """Batches of ``batch_size`` training images, shuffled from ``train.seed``, the last partial one
    dropped; page-locked on a GPU."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
                      num_workers=train.num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(train.seed))


def train_step(model: CellClassifier, optimizer: torch.optim.Optimizer, samples: NestedTensor,
               targets: Sequence[dict[str, Tensor]], num_classes: int,
               device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One optimizer step on a batch; its loss, logits ``(B, num_classes + 1, h, w)`` and cell labels."""
    logits, mask = model(samples.to(device, non_blocking=True))
    labels = cell_labels(targets, mask, model.backbone.strides[-1], background=num_classes).to(device)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, logits, labels


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "pretrain_backbone.py", description=__doc__.split("\n\n")[0],
        epilog="Every other flag is main.py's (see python main.py --help), --config included.")
    p.add_argument("--output", "--out", required=True, help="where to write the backbone state_dict (.pth)")
    p.add_argument("--steps", default=1500, type=int, help="optimizer steps (default: 1500)")
    p.add_argument("--pretrain_lr", default=1e-3, type=float, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--print_every", default=100, type=int, help="progress line every this many steps (default: 100)")
    return p


def pretrain(args: argparse.Namespace, train: argparse.Namespace) -> None:
    """Train ``CellClassifier`` for ``args.steps`` steps on ``train``'s training split; save its backbone."""
    if args.steps < 1 or args.print_every < 1:
        raise UserError(f"--steps and --print_every must be at least 1, got {args.steps} and {args.print_every}")
    check_args(train)
    seed_everything(train.seed)
    device = torch.device(train.device)
    dataset = build_dataset("train", train)
    num_classes = train.num_classes or dataset.num_classes
    loader = pretraining_loader(dataset, train, train.batch_size, device)
    if len(loader) == 0:
        raise UserError(f"--batch_size {train.batch_size} is larger than the {len(dataset)} training images")
    model, optimizer = build_pretraining(train, num_classes, args.pretrain_lr, device)
    backbone = model.backbone
    stride = backbone.strides[-1]
    print(f"pretraining {train.backbone} (stages 1-{train.backbone_last_stage}, stride {stride}) on "
          f"{len(dataset)} images, {num_classes} classes + background, {args.steps} steps")
    start, step, seen, correct, objects = time.time(), 0, 0, 0, 0
    while step < args.steps:
        for samples, targets in loader:
            loss, logits, labels = train_step(model, optimizer, samples, targets, num_classes, device)
            step += 1
            seen += len(targets)
            on_object = (labels != IGNORE) & (labels != num_classes)
            correct += int((logits.argmax(1)[on_object] == labels[on_object]).sum())
            objects += int(on_object.sum())
            if step % args.print_every == 0 or step == args.steps:
                elapsed = time.time() - start
                print(f"step {step}/{args.steps}  loss {loss.item():.4f}  object-cell accuracy "
                      f"{correct / max(objects, 1):.3f}  {seen / elapsed:.1f} img/s  {elapsed:.0f}s", flush=True)
                correct = objects = 0
            if step == args.steps:
                break
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Saved in the contiguous layout whatever the one trained in, as torchvision's own weights are.
    save_on_master({name: value.contiguous() for name, value in backbone.body.state_dict().items()}, out)
    print(f"saved {out} ({step} steps, {time.time() - start:.0f}s); train with --backbone_weights {out}")


def run(argv: Optional[list[str]] = None) -> int:
    """Entry point: bad input ends in one line on stderr and exit status 2."""
    def command() -> None:
        args, rest = get_args_parser().parse_known_args(argv)
        pretrain(args, training_args(rest))

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(run())
