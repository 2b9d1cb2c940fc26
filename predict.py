"""Detect objects in (or, with a ViT checkpoint, classify) image files with a trained checkpoint;
draw the boxes or the class, and where the poll looked.

    python predict.py --checkpoint outputs/demo/checkpoint.pth data/synthetic/val2017 \\
        --output predictions.json --draw outputs/demo/pictures --show_poll
    python predict.py --checkpoint model.onnx data/synthetic/val2017    # written by python -m tools.export_onnx
    python predict.py --checkpoint outputs/vit_demo/checkpoint.pth data/synthetic_cls/val/ring \\
        --draw outputs/vit_demo/pictures --show_poll --draw_scale 4
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from models import build_model, fast_path
from models.detr import PostProcess
from tasks import get_task
from tasks.classification import TOP_CLASSES
from tasks.detection import BOX_FORMAT
from util.checkpoint import load_model_weights, read_checkpoint
from util.draw import draw_poll, side_by_side
from util.errors import UserError, exit_status
from util.flags import get_args_parser as training_parser
from util.onnx import OnnxDetector

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "predict.py",
        description="Detections of a DETR / PnP-DETR checkpoint on image files, or the classes a ViT / "
                    "PnP-ViT checkpoint (main.py --task classification) gives them, as JSON, and optionally "
                    "pictures of the boxes or the class, and of the poll. The model is rebuilt from the flags "
                    "stored in the checkpoint (its weights decide the class count and whether it has a "
                    "sampler); images go through the evaluation transform (detection: shorter side "
                    "--eval_size of the checkpoint; classification: resize and centre crop to its --input_size).",
        epilog="Category names come from --categories, else from the annotation json of the checkpoint's "
               "training data (its --val_annotations, then --train_annotations, then those under --coco_path, "
               "or --coco_panoptic_path for coco_panoptic: val2017, then train2017) when that file exists, else "
               "'class_<id>'; for classification, from the class "
               "folders of its --data_path (train, then val) when they are as many as its classes. The JSON "
               "holds one entry per image: file, width, height and its detections (category_id, category, "
               f"score, bbox; {BOX_FORMAT}), or for classification its {TOP_CLASSES} most probable classes "
               "(class_id, class, score: the softmax probability), best first.")
    p.add_argument("images", nargs="+", help="image files and folders (a folder: its image files, not recursive)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint written by main.py (path or URL), or a .onnx file written by "
                        "python -m tools.export_onnx (run by ONNX Runtime on the CPU, one image at a time, at the "
                        "ratio fixed at export)")
    p.add_argument("--threshold", default=0.5, type=float,
                   help="keep detections whose class score is above this (default: 0.5; detection only)")
    p.add_argument("--sample_topk_ratio", default=None, type=float,
                   help="poll ratio r in (0, 1] (default: the checkpoint's --sample_topk_ratio; "
                        "ignored for a checkpoint without sampler)")
    p.add_argument("--output", default=None, help="write the JSON to this file (default: standard output)")
    p.add_argument("--draw", default=None, metavar="DIR",
                   help="write DIR/<image name>.png with the labelled boxes (classification: the model's input "
                        "framed and labelled with its most probable class)")
    p.add_argument("--show_poll", action="store_true",
                   help="--draw: add a panel of the polled feature cells or ViT patches (orange) and the "
                        "pool's weight on the others (blue)")
    p.add_argument("--draw_scale", default=1.0, type=float,
                   help="--draw: enlarge the pictures this many times (default: 1)")
    p.add_argument("--categories", default=None, metavar="JSON",
                   help="COCO-format json whose 'categories' name the class ids (classification: the class "
                        "indices; default: see below)")
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
    """The flags that built the checkpoint's model: main.py's defaults updated by its stored ``args``,
    then what its weights decide (``Task.checkpoint_args``: the class count, the sampler; nothing
    is downloaded). Keys main.py does not know are ignored."""
    saved = checkpoint.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if not isinstance(saved, dict):
        raise UserError(f"--checkpoint: {source} stores no 'args' (the flags that built its model); "
                        "predict.py rebuilds the model from them")
    args = training_parser().parse_args([])
    for key, value in saved.items():
        if hasattr(args, key):
            setattr(args, key, value)
    get_task(args.task).checkpoint_args(args, checkpoint["model"], source)
    return args


def is_onnx(path: str) -> bool:
    return path.lower().endswith(".onnx")


def check_onnx_args(args: argparse.Namespace, detector: OnnxDetector) -> None:
    """Reject flags an exported graph cannot follow (one image at a time, its ratio, no poll)."""
    if args.batch_size != 1:
        raise UserError(f"--batch_size {args.batch_size}: {args.checkpoint} takes one image at a time; use --batch_size 1")
    if args.show_poll:
        raise UserError(f"--show_poll: {args.checkpoint} is an exported graph, which returns no poll; "
                        "draw the poll from the checkpoint")
    if args.sample_topk_ratio is not None and args.sample_topk_ratio != detector.ratio:
        raise UserError(f"--sample_topk_ratio {args.sample_topk_ratio}: {args.checkpoint} was exported at "
                        f"r={detector.ratio}; export it again with python -m tools.export_onnx --ratio {args.sample_topk_ratio}")


def load_model(path: str, device: torch.device) -> tuple[nn.Module, Optional[nn.Module], argparse.Namespace]:
    """The checkpoint's model in eval mode on ``device`` on the fast path (``models.fast_path``), its box
    post-processor (None for a classifier), and its flags."""
    checkpoint = read_checkpoint(path, flag="--checkpoint")
    args = model_args(checkpoint, path)
    try:
        model, _, postprocessors = build_model(args)
    except (UserError, ValueError) as err:
        raise UserError(f"--checkpoint: the args stored in {path} do not build a model ({err})") from None
    for note in load_model_weights(model, checkpoint["model"], path, built_from="its stored args",
                                   advice="the weights are of another architecture"):
        print(note, file=sys.stderr)
    return fast_path(model.to(device).eval()), postprocessors.get("bbox"), args


def main(args: argparse.Namespace) -> None:
    check_args(args)
    device = torch.device(args.device)
    paths = list_images(args.images)
    pictures = picture_paths(paths, args.draw) if args.draw is not None else None
    if is_onnx(args.checkpoint):
        model, postprocess, device = OnnxDetector(args.checkpoint), PostProcess(), torch.device("cpu")
        check_onnx_args(args, model)
        trained, ratio = model.args, model.ratio
    else:
        model, postprocess, trained = load_model(args.checkpoint, device)
        if args.show_poll and not model.uses_pnp:
            raise UserError(f"--show_poll: {args.checkpoint} is a {get_task(trained.task).model_name} checkpoint: "
                            "it has no poll-and-pool sampler")
        ratio = (args.sample_topk_ratio or trained.sample_topk_ratio) if model.uses_pnp else None
    task = get_task(getattr(trained, "task", "detection"))  # flags stored before --task: detection
    names, names_from = task.category_names(args.categories, trained)
    if pictures is not None:
        Path(args.draw).mkdir(parents=True, exist_ok=True)
    entries = []
    for index, prediction in enumerate(task.predict(model, postprocess, paths, trained, ratio, device, args, names)):
        entries.append(prediction.entry)
        if pictures is not None:
            panels = [prediction.panel]
            if prediction.grid is not None:
                panels.append(draw_poll(prediction.view, prediction.grid, args.draw_scale))
            side_by_side(panels).save(pictures[index])
    text = report_json(task.report_header(args, ratio, names_from), entries)
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
