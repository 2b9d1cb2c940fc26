"""Export a DETR / PnP-DETR checkpoint to ONNX at one poll ratio, checked against ONNX Runtime.

    python -m tools.export_onnx --checkpoint outputs/demo/checkpoint.pth --ratio 0.33 --output model.onnx
    python predict.py --checkpoint model.onnx data/synthetic/val2017

The model is rebuilt from the flags stored in the checkpoint (as predict.py does). The graph
takes one unpadded, normalised image ``images (1, 3, H, W)`` of any height and width (from
64 pixels) and returns ``pred_logits``, ``pred_boxes`` (and ``pred_masks`` for a panoptic
checkpoint). Before reporting success the file is run by ONNX Runtime on two image sizes and
compared with eager PyTorch; the export fails when an output differs by more than
``--tolerance``.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from predict import load_model
from util.checkpoint import plain_args
from util.errors import UserError, exit_status
from util.onnx import MIN_SIDE, export, max_differences, output_names, require, session


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m tools.export_onnx",
        description="Export a checkpoint written by main.py to one ONNX file (dynamic image height and "
                    "width, the poll ratio fixed), then check it against eager PyTorch with ONNX Runtime "
                    "on two image sizes.")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by main.py (path or URL)")
    p.add_argument("--output", "--out", required=True, help="the ONNX file to write (.onnx)")
    p.add_argument("--ratio", default=None, type=float,
                   help="poll ratio r in (0, 1] fixed in the graph (default: the checkpoint's "
                        "--sample_topk_ratio; a DETR checkpoint has none)")
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="image size the graph is traced on, and the first checked size "
                        "(default: the checkpoint's --eval_size by 4/3 of it)")
    p.add_argument("--check_size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="second checked image size (default: 3/4 of --size's height by its height)")
    p.add_argument("--tolerance", default=1e-4, type=float,
                   help="largest absolute difference to eager PyTorch accepted on any output (default: 1e-4)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flags out of range with a one-line message naming them."""
    if args.ratio is not None and not 0 < args.ratio <= 1:
        raise UserError(f"--ratio must lie in (0, 1], got {args.ratio}")
    for flag in ("size", "check_size"):
        size = getattr(args, flag)
        if size is not None and min(size) < MIN_SIDE:
            raise UserError(f"--{flag}: both sides must be at least {MIN_SIDE} pixels, got {size[0]} {size[1]}")
    if args.tolerance <= 0:
        raise UserError(f"--tolerance must be positive, got {args.tolerance}")
    if not args.output.endswith(".onnx"):
        raise UserError(f"--output: expected a file name ending in .onnx, got {args.output}")


def second_size(first: tuple[int, int]) -> tuple[int, int]:
    """A smaller image of another aspect than ``first``: 3/4 of its height by its height."""
    return max(first[0] * 3 // 4, MIN_SIDE), max(first[0], MIN_SIDE)


def main(args: argparse.Namespace) -> None:
    check_args(args)
    for package in ("onnx", "onnxscript", "onnxruntime"):
        require(package, "python -m tools.export_onnx")
    model, _, trained = load_model(args.checkpoint, torch.device("cpu"))
    ratio: Optional[float] = None
    if model.uses_pnp:
        ratio = args.ratio if args.ratio is not None else trained.sample_topk_ratio
    elif args.ratio is not None:
        print(f"note: {args.checkpoint} is a DETR checkpoint (no sampler): --ratio is ignored")
    eval_size = max(trained.eval_size, MIN_SIDE)
    first = tuple(args.size) if args.size else (eval_size, eval_size * 4 // 3)
    second = tuple(args.check_size) if args.check_size else second_size(first)
    metadata = {"args": plain_args(trained), "sample_topk_ratio": ratio, "outputs": output_names(model),
                "checkpoint": args.checkpoint, "traced_size": list(first), "torch": torch.__version__}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    partial = args.output + ".partial"
    try:
        try:
            detector = export(model, ratio, partial, first, metadata)
            differences = max_differences(detector, session(partial), [first, second])
        except UserError:
            raise
        except Exception as err:  # the exporter's errors run to many lines: keep the first
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise UserError(f"--checkpoint: torch.onnx.export could not export {args.checkpoint} "
                            f"({type(err).__name__}: {first_line})") from None
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    report = ", ".join(f"{h}x{w}: {d:.2e}" for (h, w), d in zip((first, second), differences))
    print(f"ONNX Runtime against eager PyTorch, largest absolute difference over {metadata['outputs']}: {report}")
    if max(differences) > args.tolerance:
        Path(partial).unlink()
        raise UserError(f"the exported graph differs from eager PyTorch by {max(differences):.2e} (over "
                        f"--tolerance {args.tolerance:g}); {args.output} was not written")
    os.replace(partial, args.output)
    what = f"r={ratio:g}" if ratio is not None else "DETR, no sampler"
    print(f"wrote {args.output} ({what}; input 'images' (1, 3, H, W), H and W >= {MIN_SIDE})")


def run(argv: Optional[list[str]] = None) -> int:
    """Entry point: bad input ends in one line on stderr and exit status 2."""
    return exit_status(lambda: main(get_args_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run())
