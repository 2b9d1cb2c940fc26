"""Detection: DETR / PnP-DETR on COCO-format data, with ``--masks`` panoptic segmentation."""
import argparse
import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.ops import clip_boxes_to_image

from datasets import SPLIT_FLAGS, build_dataset, get_coco_api_from_dataset
from datasets.coco import box_target, read_image
from datasets.coco_eval import STAT_NAMES, to_coco_results
from datasets.panoptic_eval import panoptic_row
from datasets.transforms import make_coco_transforms
from engine import evaluate, ratio_key
from models import build_model
from models.backbone import load_backbone_weights
from models.detr import ImageFeatures
from models.pnp import SampledTokens
from models.segmentation import PostProcessPanoptic, load_frozen_detector
from tasks.base import UNTRAINED_WARNING, Prediction, Task, read_category_names
from util.checkpoint import SAMPLER_PREFIX
from util.draw import PollGrid, draw_detections, poll_maps
from util.errors import UserError
from util.misc import NestedTensor, collate_fn, nested_tensor_from_tensor_list

COMPILE_SIZE_DIVISIBILITY = 32  # the largest backbone stride
BOX_FORMAT = "bbox is [x, y, width, height] in pixels of the original image (COCO), clipped to the image"
CATEGORY_FILES = ("annotations/instances_val2017.json", "annotations/instances_train2017.json")
PANOPTIC_CATEGORY_FILES = ("annotations/panoptic_val2017.json", "annotations/panoptic_train2017.json")


class DetectionTask(Task):
    name = "detection"
    model_name = "DETR"
    metric = "AP"
    table_columns = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    table_format = "{:6.3f}"
    gflops_digits = 2
    own_flags = (
        "masks", "frozen_weights", "backbone", "backbone_weights", "backbone_last_stage", "dilation",
        "position_embedding", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim", "dropout", "nheads",
        "num_queries", "pre_norm", "pos_embed_kproj", "no_aux_loss", "set_cost_class", "set_cost_bbox",
        "set_cost_giou", "mask_loss_coef", "dice_loss_coef", "bbox_loss_coef", "giou_loss_coef", "eos_coef",
        "dataset_file", "coco_path", "coco_panoptic_path", "eval_size", "augment", "compile", "channels_last",
        "lr_backbone", *SPLIT_FLAGS, "query_groups", "mosaic", "dn_groups", "dn_label_noise", "dn_box_noise",
        "encoder_head",
    )
    head_prefix = "class_embed."
    sampler_prefix = SAMPLER_PREFIX
    model_takes_targets = True  # the denoising queries (--dn_groups) are made from the targets

    def check_args(self, args: argparse.Namespace) -> None:
        if args.frozen_weights is not None and not args.masks:
            raise UserError("--frozen_weights is for training the mask head and needs --masks")
        if args.query_groups < 1:
            raise UserError(f"--query_groups must be 1 (off) or more groups of queries, got {args.query_groups}")
        if args.query_groups > 1 and args.frozen_weights is not None:
            raise UserError("--query_groups trains the detector's queries; --frozen_weights freezes the detector: "
                            "drop --query_groups")
        if args.dn_groups < 0:
            raise UserError(f"--dn_groups must be 0 (off) or more groups of denoising queries, got {args.dn_groups}")
        if args.dn_groups > 0 and args.frozen_weights is not None:
            raise UserError("--dn_groups trains the detector's decoder; --frozen_weights freezes the detector: "
                            "drop --dn_groups")
        if args.dn_groups > 0 and args.hidden_dim % 8:
            raise UserError(f"--dn_groups embeds each box coordinate in hidden_dim / 4 sines and cosines: "
                            f"--hidden_dim must be divisible by 8, got {args.hidden_dim}")
        if not 0 <= args.dn_label_noise <= 1:
            raise UserError(f"--dn_label_noise is a probability: expected a value in [0, 1], got {args.dn_label_noise}")
        if args.dn_box_noise < 0:
            raise UserError(f"--dn_box_noise must be at least 0, got {args.dn_box_noise}")
        if args.encoder_head < 0:
            raise UserError(f"--encoder_head weighs the encoder head's loss: expected 0 (off) or more, "
                            f"got {args.encoder_head}")
        if args.encoder_head > 0 and args.frozen_weights is not None:
            raise UserError("--encoder_head trains the detector's encoder; --frozen_weights freezes the detector: "
                            "drop --encoder_head")
        if not 0 <= args.mosaic <= 1:
            raise UserError(f"--mosaic is a probability: expected a value in [0, 1], got {args.mosaic}")
        if args.mosaic > 0 and args.masks:
            raise UserError("--mosaic tiles boxes, not mask targets: drop --mosaic with --masks")

    def complete_args(self, args: argparse.Namespace) -> None:
        """The split flags as absolute paths, so that predict.py finds the category names from
        anywhere."""
        for key in SPLIT_FLAGS:
            if getattr(args, key):
                setattr(args, key, os.path.abspath(getattr(args, key)))

    def build_dataset(self, split: str, args: argparse.Namespace) -> Dataset:
        return build_dataset(split, args)

    def collate_fn(self, args: argparse.Namespace) -> Optional[Callable]:
        # Images are padded into a NestedTensor; compiled, to a multiple of the largest backbone
        # stride: fewer shapes to compile, and exact feature sizes (torch 2.14's compiled
        # backward failed at odd ones).
        return functools.partial(collate_fn, size_divisibility=COMPILE_SIZE_DIVISIBILITY if args.compile else 1)

    def build_model(self, args: argparse.Namespace, dataset_val: Dataset
                    ) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
        model, criterion, postprocessors = build_model(args)
        if args.masks:
            postprocessors["panoptic"] = PostProcessPanoptic(dataset_val.is_thing_map)
        return model, criterion, postprocessors

    def param_groups(self, args: argparse.Namespace, model: nn.Module) -> list[dict[str, Any]]:
        """The transformer, heads and sampler at ``--lr``; the backbone at ``--lr_backbone``."""
        return [
            {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
            {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
             "lr": args.lr_backbone},
        ]

    def load_initial_weights(self, args: argparse.Namespace, model: nn.Module) -> list[str]:
        """``--frozen_weights`` (the detector under a mask head), else ``--backbone_weights`` for
        training; evaluation without either evaluates untrained weights, and says so."""
        if args.frozen_weights is not None:
            load_frozen_detector(model, args.frozen_weights)
        elif args.eval:
            return [UNTRAINED_WARNING]
        else:
            load_backbone_weights(model.backbone[0], args.backbone_weights)
        return []

    def evaluate(self, args: argparse.Namespace, model: nn.Module, criterion: nn.Module,
                 postprocessors: dict[str, nn.Module], loader_val: Any, device: torch.device,
                 ratios: list[Optional[float]]) -> dict[str, Any]:
        ground_truth = get_coco_api_from_dataset(loader_val.dataset)
        return evaluate(model, criterion, postprocessors, loader_val, ground_truth, device, ratios, args.amp)

    def eval_rows(self, stats: dict[str, Any], ratios: list[Optional[float]]) -> list[dict[str, Any]]:
        """The 12 COCO box stats (``AP`` ... ``ARl``), with ``--masks`` the panoptic quality, and img/s."""
        rows = []
        for r in ratios:
            values = stats[f"{ratio_key(r)}coco_eval_bbox"]
            rows.append({"ratio": r, **{name: float(v) for name, v in zip(STAT_NAMES, values)},
                         "images_per_s": stats[f"{ratio_key(r)}images_per_s"]})
            if f"{ratio_key(r)}PQ_all" in stats:
                rows[-1].update(panoptic_row(stats, ratio_key(r)))
        return rows

    def checkpoint_args(self, args: argparse.Namespace, state: dict[str, torch.Tensor], source: str) -> None:
        """The class count from ``class_embed``, the sampler from its keys (official DETR
        checkpoints store no ``no_pnp``); a mask head's detector is in the checkpoint already."""
        prefix = "detr." if args.masks else ""
        bias = state.get(f"{prefix}class_embed.bias")
        if bias is None:
            raise UserError(f"--checkpoint: {source} has no {prefix}class_embed.bias: not a DETR/PnP-DETR "
                            f"checkpoint{' with --masks' if args.masks else ''}")
        args.num_classes = bias.shape[0] - 1
        args.no_pnp = not any(key.startswith(prefix + SAMPLER_PREFIX) for key in state)
        args.frozen_weights = None

    def category_names(self, categories_file: Optional[str], trained: argparse.Namespace
                       ) -> tuple[dict[int, str], Optional[str]]:
        """From ``categories_file``, else the annotation json of the checkpoint's training data."""
        if categories_file is None:
            found = [path for path in annotation_candidates(trained) if os.path.isfile(path)]
            if not found:
                return {}, None
            categories_file = found[0]
        return read_category_names(categories_file), categories_file

    def predict(self, model: Any, postprocess: Optional[nn.Module], paths: list[Path], trained: argparse.Namespace,
                ratio: Optional[float], device: torch.device, options: argparse.Namespace,
                names: dict[int, str]) -> Iterator[Prediction]:
        for path, image, result, grid in detect(model, postprocess, paths, trained.eval_size, ratio, device,
                                                options.batch_size, options.show_poll):
            dets = detections(result, options.threshold, names)
            entry = {"file": str(path), "width": image.width, "height": image.height, "detections": dets}
            yield Prediction(entry, draw_detections(image, dets, options.draw_scale), image, grid)

    def report_header(self, options: argparse.Namespace, ratio: Optional[float],
                      names_from: Optional[str]) -> dict[str, Any]:
        return {"checkpoint": options.checkpoint, "sample_topk_ratio": ratio, "threshold": options.threshold,
                "box_format": BOX_FORMAT, "category_names": names_from}


def annotation_candidates(trained: argparse.Namespace) -> list[str]:
    """The annotation files a run's flags point at, in the order category names are looked for:
    ``--val_annotations`` and ``--train_annotations``, then those under ``--coco_path`` (or
    ``--coco_panoptic_path`` for coco_panoptic), val before train."""
    given = [getattr(trained, key, None) for key in ("val_annotations", "train_annotations")]
    if trained.dataset_file == "coco_panoptic":
        root, names = trained.coco_panoptic_path, PANOPTIC_CATEGORY_FILES
    else:
        root, names = trained.coco_path, CATEGORY_FILES
    return [path for path in given if path] + ([os.path.join(root, name) for name in names] if root else [])


def poll_grids(sampled: SampledTokens, features: ImageFeatures, samples: NestedTensor,
               sizes: list[tuple[tuple[int, int], tuple[int, int]]]) -> list[PollGrid]:
    """Each image's ``PollGrid`` from the sampler's output of its batch.

    ``sizes``: per image ``((height, width) at the network input, (height, width) original)``.
    A feature cell spans ``padded input / feature map`` input pixels (the padding mask is
    resized to the feature map by nearest sampling, so cell ``i`` starts at that multiple).
    """
    batch, _, height, width = features.src.shape
    stride_h = samples.tensors.shape[-2] / height
    stride_w = samples.tensors.shape[-1] / width
    polled, mass = (m.view(batch, height, width) for m in poll_maps(sampled, height * width))
    valid = ~features.mask.cpu()
    grids = []
    for b, ((input_h, input_w), (orig_h, orig_w)) in enumerate(sizes):
        rows, cols = int(valid[b].any(1).sum()), int(valid[b].any(0).sum())
        grids.append(PollGrid(polled=polled[b, :rows, :cols], pool_mass=mass[b, :rows, :cols],
                              cell=(stride_h * orig_h / input_h, stride_w * orig_w / input_w)))
    return grids


@torch.no_grad()
def detect(model: Any, postprocess: nn.Module, paths: list[Path], eval_size: int, ratio: Optional[float],
           device: torch.device, batch_size: int, with_poll: bool
           ) -> Iterator[tuple[Path, Any, dict[str, torch.Tensor], Optional[PollGrid]]]:
    """Per image, in order: its path, the RGB image, the post-processed ``scores``, ``labels`` and
    ``boxes`` (xyxy, original pixels, clipped to the image) of every query, and (``with_poll``) its
    ``PollGrid``. ``model``: a DETR / PnP-DETR or an ``OnnxDetector`` (without ``with_poll``)."""
    transform = make_coco_transforms("val", eval_size)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = [read_image(str(path)) for path in chunk]
        tensors, sizes = [], []
        for image in images:
            tensor, target = transform(image, box_target(0, [], image.height, image.width))
            tensors.append(tensor)
            sizes.append((tuple(target["size"].tolist()), (image.height, image.width)))
        samples = nested_tensor_from_tensor_list(tensors).to(device)
        if with_poll:
            features = model.extract_features(samples)
            outputs = model.predict(features, ratio)
            grids = poll_grids(outputs["sampled"], features, samples, sizes)
        else:
            outputs, grids = model(samples, ratio), [None] * len(chunk)
        results = postprocess(outputs, torch.tensor([orig for _, orig in sizes], device=device))
        for path, image, result, grid in zip(chunk, images, results, grids):
            result["boxes"] = clip_boxes_to_image(result["boxes"], (image.height, image.width))
            yield path, image, {k: v.cpu() for k, v in result.items()}, grid


def detections(result: dict[str, torch.Tensor], threshold: float, names: dict[int, str]) -> list[dict[str, Any]]:
    """The queries scoring above ``threshold``, best first, as the COCO result dicts of evaluation
    plus the category name, without ``image_id``: ``bbox`` xywh in pixels rounded to 0.01,
    ``score`` rounded to 1e-4."""
    keep = result["scores"] > threshold
    dets = to_coco_results(0, {k: v[keep] for k, v in result.items()})
    return [{"category_id": d["category_id"], "category": names.get(d["category_id"], f"class_{d['category_id']}"),
             "score": round(d["score"], 4), "bbox": [round(v, 2) for v in d["bbox"]]}
            for d in sorted(dets, key=lambda d: -d["score"])]
