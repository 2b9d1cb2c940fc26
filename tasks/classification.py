"""Classification: ViT / PnP-ViT on an ImageFolder root, with DeiT's recipe (timm)."""
import argparse
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from PIL import Image
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import Dataset, Sampler

from datasets.classification import (build_classification_dataset, build_transform, class_folders, input_config,
                                     input_image)
from datasets.coco import read_image
from engine import BatchTransform, evaluate_classification, ratio_key
from models import build_model
from models.vit import load_vit_weights, vit_state_dict
from tasks.base import UNTRAINED_WARNING, Prediction, Task, read_category_names
from util.draw import PollGrid, draw_detections, poll_maps
from util.errors import UserError
from util.misc import get_rank, get_world_size

CLASS_FOLDERS = ("train", "val")
TOP_CLASSES = 5


class ClassificationTask(Task):
    name = "classification"
    model_name = "ViT"
    metric = "top1"
    table_columns = ("top1", "top5")
    table_format = "{:6.2f}"
    gflops_digits = 3
    own_flags = (
        "data_path", "vit_arch", "patch_size", "input_size", "pnp_after_block", "vit_weights", "drop_path",
        "global_pool", "smoothing", "mixup", "cutmix", "aa", "reprob", "color_jitter", "train_interpolation",
        "scale", "repeated_aug", "input_mean", "input_std", "crop_pct",
    )
    head_prefix = "head."
    sampler_prefix = "sampler."

    def check_args(self, args: argparse.Namespace) -> None:
        if not args.data_path:
            raise UserError("--task classification needs --data_path (an ImageFolder root with train/ and val/)")
        if not args.eval and (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
            raise UserError(f"--mixup/--cutmix mix pairs of images: --batch_size must be even, got {args.batch_size}")

    def complete_args(self, args: argparse.Namespace) -> None:
        """The input's mean, std and crop from the weights (``input_config``), so that checkpoints
        and predict.py keep them."""
        config = input_config(args)
        args.input_mean, args.input_std, args.crop_pct = list(config["mean"]), list(config["std"]), config["crop_pct"]

    def build_dataset(self, split: str, args: argparse.Namespace) -> Dataset:
        return build_classification_dataset(split, args)

    def train_sampler(self, args: argparse.Namespace, dataset: Dataset) -> Sampler:
        """With ``--repeated_aug`` over several processes, timm's ``RepeatAugSampler`` (each image 3
        times per epoch, in different processes, as DeiT). In one process it would only show a
        third of the images per epoch: the plain sampler is used, with a one-line warning."""
        if args.repeated_aug and get_world_size() > 1:
            return RepeatAugSampler(dataset, num_replicas=get_world_size(), rank=get_rank())
        if args.repeated_aug:
            print("warning: --repeated_aug repeats each image across processes; one process trains without it")
        return super().train_sampler(args, dataset)

    def build_model(self, args: argparse.Namespace, dataset_val: Dataset
                    ) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
        return build_model(args)

    def param_groups(self, args: argparse.Namespace, model: nn.Module) -> list[dict[str, Any]]:
        """DeiT's: no weight decay on biases, norms, the position embedding and the class token."""
        return param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=("pos_embed", "cls_token"))

    def load_weights(self, model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
        """As any task's, and a position embedding of another grid resampled (``load_vit_weights``)."""
        return load_vit_weights(model, state_dict, source)

    def load_initial_weights(self, args: argparse.Namespace, model: nn.Module) -> list[str]:
        """``--vit_weights`` (the sampler starts fresh), for training and for evaluation: with
        ``--eval`` the published model is evaluated as it is (with ``--no_pnp``: the baseline)."""
        if args.vit_weights == "none":
            return [UNTRAINED_WARNING] if args.eval else []
        state_dict = vit_state_dict(args.vit_weights, args.vit_arch)
        return load_vit_weights(model, state_dict, f"--vit_weights {args.vit_weights}")

    def batch_transform(self, args: argparse.Namespace) -> Optional[BatchTransform]:
        """timm's Mixup / CutMix with ``--mixup`` or ``--cutmix``."""
        if args.mixup <= 0 and args.cutmix <= 0:
            return None
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                     num_classes=args.num_classes)

    def evaluate(self, args: argparse.Namespace, model: nn.Module, criterion: nn.Module,
                 postprocessors: dict[str, nn.Module], loader_val: Any, device: torch.device,
                 ratios: list[Optional[float]]) -> dict[str, Any]:
        return evaluate_classification(model, loader_val, device, ratios, args.amp)

    def eval_rows(self, stats: dict[str, Any], ratios: list[Optional[float]]) -> list[dict[str, Any]]:
        """Top-1 and top-5 accuracy in %, and img/s."""
        return [{"ratio": r, "top1": stats[f"{ratio_key(r)}acc1"], "top5": stats[f"{ratio_key(r)}acc5"],
                 "images_per_s": stats[f"{ratio_key(r)}images_per_s"]} for r in ratios]

    def checkpoint_args(self, args: argparse.Namespace, state: dict[str, torch.Tensor], source: str) -> None:
        """The class count from ``head``, the sampler from its keys; its weights replace ``--vit_weights``."""
        bias = state.get("head.bias")
        if bias is None:
            raise UserError(f"--checkpoint: {source} has no head.bias: not a ViT/PnP-ViT checkpoint")
        args.num_classes = bias.shape[0]
        args.no_pnp = not any(key.startswith(self.sampler_prefix) for key in state)
        args.vit_weights = "none"

    def category_names(self, categories_file: Optional[str], trained: argparse.Namespace
                       ) -> tuple[dict[int, str], Optional[str]]:
        """From ``categories_file`` (its ``categories`` name the class indices), else the class
        folders of the checkpoint's ``--data_path`` (``train``, then ``val``; ImageFolder's sorted
        order) when they are as many as its classes."""
        if categories_file is not None:
            return read_category_names(categories_file), categories_file
        for split in CLASS_FOLDERS:
            folder = os.path.join(trained.data_path or "", split)
            try:
                names = class_folders(folder)
            except UserError:  # moved or never here: the names are only a convenience
                continue
            if len(names) == trained.num_classes:
                return dict(enumerate(names)), folder
        return {}, None

    def predict(self, model: Any, postprocess: Optional[nn.Module], paths: list[Path], trained: argparse.Namespace,
                ratio: Optional[float], device: torch.device, options: argparse.Namespace,
                names: dict[int, str]) -> Iterator[Prediction]:
        for path, image, view, probs, grid in classify(model, paths, trained, ratio, device, options.batch_size,
                                                       options.show_poll):
            classes = top_classes(probs, names)
            entry = {"file": str(path), "width": image.width, "height": image.height, "classes": classes}
            yield Prediction(entry, class_panel(view, classes[0], options.draw_scale), view, grid)

    def report_header(self, options: argparse.Namespace, ratio: Optional[float],
                      names_from: Optional[str]) -> dict[str, Any]:
        return {"checkpoint": options.checkpoint, "task": "classification", "sample_topk_ratio": ratio,
                "class_names": names_from}


@torch.no_grad()
def classify(model: nn.Module, paths: list[Path], trained: argparse.Namespace, ratio: Optional[float],
             device: torch.device, batch_size: int, with_poll: bool
             ) -> Iterator[tuple[Path, Image.Image, Image.Image, torch.Tensor, Optional[PollGrid]]]:
    """Per image, in order: its path, the RGB image, the model's input as an RGB image (after the
    evaluation transform's resize and centre crop), the ``(num_classes,)`` class probabilities and
    (``with_poll``) its ``PollGrid`` on the patch grid of that input."""
    transform = build_transform(False, trained)
    side, patch = trained.input_size // trained.patch_size, trained.patch_size
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = [read_image(str(path)) for path in chunk]
        inputs = torch.stack([transform(image) for image in images]).to(device)
        outputs = model(inputs, ratio)
        probabilities = outputs["logits"].float().softmax(-1).cpu()
        grids: list[Optional[PollGrid]] = [None] * len(chunk)
        if with_poll:
            polled, mass = poll_maps(outputs["sampled"], side * side)
            grids = [PollGrid(polled=p.view(side, side), pool_mass=m.view(side, side), cell=(patch, patch))
                     for p, m in zip(polled, mass)]
        for path, image, tensor, probs, grid in zip(chunk, images, inputs.cpu(), probabilities, grids):
            yield path, image, input_image(tensor, trained), probs, grid


def top_classes(probabilities: torch.Tensor, names: dict[int, str]) -> list[dict[str, Any]]:
    """The ``TOP_CLASSES`` most probable classes, best first: ``class_id``, ``class`` (its name) and
    ``score`` (the probability, rounded to 1e-4)."""
    scores, indices = probabilities.topk(min(TOP_CLASSES, len(probabilities)))
    return [{"class_id": i, "class": names.get(i, f"class_{i}"), "score": round(p, 4)}
            for p, i in zip(scores.tolist(), indices.tolist())]


def class_panel(view: Image.Image, best: dict[str, Any], scale: float) -> Image.Image:
    """The model's input, framed and labelled ``"name 0.93"`` in its class's colour (the whole
    input drawn as one detection)."""
    frame = {"bbox": [0, 0, view.width - 1, view.height - 1], "category_id": best["class_id"],
             "category": best["class"], "score": best["score"]}
    return draw_detections(view, [frame], scale)
