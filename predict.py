"""Detect objects in image files with a trained checkpoint; draw the boxes and where the poll looked.

    python predict.py --checkpoint outputs/demo/checkpoint.pth data/synthetic/val2017 \\
        --output predictions.json --draw outputs/demo/pictures --show_poll
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from PIL import Image
from torch import nn
from torchvision.ops import clip_boxes_to_image

from datasets.coco import box_target, read_image, read_json_object
from datasets.coco_eval import to_coco_results
from datasets.transforms import make_coco_transforms
from main import get_args_parser as training_parser
from models import build_model, fast_path
from models.detr import ImageFeatures
from models.pnp import SampledTokens
from util.checkpoint import SAMPLER_PREFIX, load_model_weights, read_checkpoint
from util.draw import PollGrid, draw_detections, draw_poll, side_by_side
from util.errors import UserError, exit_status
from util.misc import NestedTensor, nested_tensor_from_tensor_list

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
BOX_FORMAT = "bbox is [x, y, width, height] in pixels of the original image (COCO), clipped to the image"
CATEGORY_FILES = ("annotations/instances_val2017.json", "annotations/instances_train2017.json")
PANOPTIC_CATEGORY_FILES = ("annotations/panoptic_val2017.json", "annotations/panoptic_train2017.json")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "predict.py",
        description="Detections of a DETR / PnP-DETR checkpoint on image files, as JSON, and optionally "
                    "pictures of the boxes and of the poll. The model is rebuilt from the flags stored in "
                    "the checkpoint (its weights decide the class count and whether it has a sampler); "
                    "images go through the evaluation transform (shorter side --eval_size of the checkpoint).",
        epilog="Category names come from --categories, else from the annotation json of the checkpoint's "
               "training data (--coco_path, or --coco_panoptic_path for coco_panoptic; val2017, then "
               "train2017) when that file exists, else 'class_<id>'. The JSON holds one entry per image: "
               f"file, width, height and its detections (category_id, category, score, bbox); {BOX_FORMAT}.")
    p.add_argument("images", nargs="+", help="image files and folders (a folder: its image files, not recursive)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by main.py (path or URL)")
    p.add_argument("--threshold", default=0.5, type=float,
                   help="keep detections whose class score is above this (default: 0.5)")
    p.add_argument("--sample_topk_ratio", default=None, type=float,
                   help="poll ratio r in (0, 1] (default: the checkpoint's --sample_topk_ratio; "
                        "ignored for a DETR checkpoint)")
    p.add_argument("--output", default=None, help="write the JSON to this file (default: standard output)")
    p.add_argument("--draw", default=None, metavar="DIR", help="write DIR/<image name>.png with the labelled boxes")
    p.add_argument("--show_poll", action="store_true",
                   help="--draw: add a panel of the polled feature cells (orange) and the pool's weight "
                        "on the others (blue)")
    p.add_argument("--draw_scale", default=1.0, type=float,
                   help="--draw: enlarge the pictures this many times (default: 1)")
    p.add_argument("--categories", default=None, metavar="JSON",
                   help="COCO-format json whose 'categories' name the class ids (default: see below)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch_size", default=1, type=int,
                   help="images per forward pass, padded to the largest as in evaluation (default: 1)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flags out of range with a one-line message naming them."""
    if args.sample_topk_ratio is not None and not 0 < args.sample_topk_ratio <= 1:
        raise UserError(f"--sample_topk_ratio must lie in (0, 1], got {args.sample_topk_ratio}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.draw_scale <= 0:
        raise UserError(f"--draw_scale must be positive, got {args.draw_scale}")
    if args.show_poll and args.draw is None:
        raise UserError("--show_poll draws into the pictures of --draw DIR: give --draw")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")


def list_images(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders as their image files (sorted)."""
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path}: the folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{path} does not exist")
    return paths


def picture_paths(images: list[Path], folder: str) -> list[Path]:
    """``folder/<image stem>.png`` for every image; two images of the same stem are an error."""
    pictures: dict[Path, Path] = {}
    for image in images:
        picture = Path(folder) / f"{image.stem}.png"
        if picture in pictures:
            raise UserError(f"--draw: {pictures[picture]} and {image} would both be drawn to {picture}")
        pictures[picture] = image
    return list(pictures)


def model_args(checkpoint: dict[str, Any], source: str) -> argparse.Namespace:
    """The flags that built the checkpoint's model: main.py's defaults updated by its stored ``args``.

    The weights decide the class count (``class_embed``) and whether the model has a sampler
    (official DETR checkpoints store no ``no_pnp``); keys main.py does not know are ignored.
    """
    saved = checkpoint.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if not isinstance(saved, dict):
        raise UserError(f"--checkpoint: {source} stores no 'args' (the flags that built its model); "
                        "predict.py rebuilds the model from them")
    args = training_parser().parse_args([])
    for key, value in saved.items():
        if hasattr(args, key):
            setattr(args, key, value)
    state = checkpoint["model"]
    prefix = "detr." if args.masks else ""
    bias = state.get(f"{prefix}class_embed.bias")
    if bias is None:
        raise UserError(f"--checkpoint: {source} has no {prefix}class_embed.bias: not a DETR/PnP-DETR "
                        f"checkpoint{' with --masks' if args.masks else ''}")
    args.num_classes = bias.shape[0] - 1
    args.no_pnp = not any(key.startswith(prefix + SAMPLER_PREFIX) for key in state)
    args.frozen_weights = None
    return args


def load_model(path: str, device: torch.device) -> tuple[nn.Module, nn.Module, argparse.Namespace]:
    """The checkpoint's model in eval mode on ``device`` on the fast path (``models.fast_path``), its box
    post-processor, and its flags."""
    checkpoint = read_checkpoint(path, flag="--checkpoint")
    args = model_args(checkpoint, path)
    try:
        model, _, postprocessors = build_model(args)
    except (UserError, ValueError) as err:
        raise UserError(f"--checkpoint: the args stored in {path} do not build a model ({err})") from None
    for note in load_model_weights(model, checkpoint["model"], path, built_from="its stored args",
                                   advice="the weights are of another architecture"):
        print(note, file=sys.stderr)
    return fast_path(model.to(device).eval()), postprocessors["bbox"], args


def category_names(categories_file: Optional[str], args: argparse.Namespace) -> tuple[dict[int, str], Optional[str]]:
    """Class id -> name, and the file it came from (see the ``--help`` epilog for the order)."""
    if categories_file is None:
        root, candidates = ((args.coco_panoptic_path, PANOPTIC_CATEGORY_FILES) if args.dataset_file == "coco_panoptic"
                            else (args.coco_path, CATEGORY_FILES))
        paths = [os.path.join(root, name) for name in candidates] if root else []
        found = [path for path in paths if os.path.isfile(path)]
        if not found:
            return {}, None
        categories_file = found[0]
    entries = read_json_object(categories_file).get("categories")
    if not isinstance(entries, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str) for c in entries):
        raise UserError(f"{categories_file}: expected a list 'categories' of objects with an int 'id' and a str 'name'")
    return {c["id"]: c["name"] for c in entries}, categories_file


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
    polled = torch.zeros(batch, height * width, dtype=torch.bool, device=sampled.poll_index.device)
    fine_pad = torch.arange(sampled.num_fine, device=polled.device)[None] >= sampled.num_polled[:, None]
    polled.scatter_(1, sampled.poll_index, ~fine_pad)
    polled = polled.view(batch, height, width).cpu()
    mass = (sampled.pool_weights.float().sum(1) / sampled.pool_weights.shape[1]).view(batch, height, width).cpu()
    valid = ~features.mask.cpu()
    grids = []
    for b, ((input_h, input_w), (orig_h, orig_w)) in enumerate(sizes):
        rows, cols = int(valid[b].any(1).sum()), int(valid[b].any(0).sum())
        grids.append(PollGrid(polled=polled[b, :rows, :cols], pool_mass=mass[b, :rows, :cols],
                              cell=(stride_h * orig_h / input_h, stride_w * orig_w / input_w)))
    return grids


@torch.no_grad()
def predict(model: nn.Module, postprocess: nn.Module, paths: list[Path], eval_size: int, ratio: Optional[float],
            device: torch.device, batch_size: int, with_poll: bool
            ) -> Iterator[tuple[Path, Image.Image, dict[str, torch.Tensor], Optional[PollGrid]]]:
    """Per image, in order: its path, the RGB image, the post-processed ``scores``, ``labels`` and
    ``boxes`` (xyxy, original pixels, clipped to the image) of every query, and (``with_poll``) its
    ``PollGrid``."""
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
        features = model.extract_features(samples)
        outputs = model.predict(features, ratio)
        results = postprocess(outputs, torch.tensor([orig for _, orig in sizes], device=device))
        grids = poll_grids(outputs["sampled"], features, samples, sizes) if with_poll else [None] * len(chunk)
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


def main(args: argparse.Namespace) -> None:
    check_args(args)
    device = torch.device(args.device)
    paths = list_images(args.images)
    pictures = picture_paths(paths, args.draw) if args.draw is not None else None
    model, postprocess, trained = load_model(args.checkpoint, device)
    if args.show_poll and not model.uses_pnp:
        raise UserError(f"--show_poll: {args.checkpoint} is a DETR checkpoint: it has no poll-and-pool sampler")
    ratio = (args.sample_topk_ratio or trained.sample_topk_ratio) if model.uses_pnp else None
    names, names_from = category_names(args.categories, trained)
    if pictures is not None:
        Path(args.draw).mkdir(parents=True, exist_ok=True)

    entries = []
    for index, (path, image, result, grid) in enumerate(predict(model, postprocess, paths, trained.eval_size, ratio,
                                                                device, args.batch_size, args.show_poll)):
        dets = detections(result, args.threshold, names)
        entries.append({"file": str(path), "width": image.width, "height": image.height, "detections": dets})
        if pictures is not None:
            panels = [draw_detections(image, dets, args.draw_scale)]
            if grid is not None:
                panels.append(draw_poll(image, grid, args.draw_scale))
            side_by_side(panels).save(pictures[index])
    header = {"checkpoint": args.checkpoint, "sample_topk_ratio": ratio, "threshold": args.threshold,
              "box_format": BOX_FORMAT, "category_names": names_from}
    text = report_json(header, entries)
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)


def report_json(header: dict[str, Any], entries: list[dict[str, Any]]) -> str:
    """``{**header, "images": entries}`` as JSON text: a header line per key, then one line per image."""
    lines = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in header.items()]
    images = ",\n".join(f"  {json.dumps(entry)}" for entry in entries)
    return "{\n" + "\n".join(lines) + '\n "images": [\n' + images + "\n ]\n}\n"


def run(argv: Optional[list[str]] = None) -> int:
    """Entry point: bad input ends in one line on stderr and exit status 2."""
    return exit_status(lambda: main(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run())
