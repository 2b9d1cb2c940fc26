"""ONNX export of a detector at one poll ratio, and the exported file run by ONNX Runtime.

The exported graph takes one unpadded image ``images (1, 3, H, W)`` (normalised as by the
evaluation transform) of any height and width from ``MIN_SIDE`` pixels, and returns
``pred_logits`` and ``pred_boxes`` (and, for a panoptic model, ``pred_masks``) as the model's
forward does. The poll ratio is a constant of the graph; the number of fine tokens,
``int(valid * r)``, is computed in the graph from the feature map's size, so it follows the
image size. What ``predict.py`` needs (the model's flags, the ratio, the output names) is
stored as JSON in the file's metadata under ``METADATA_KEY``.
"""
import argparse
import contextlib
import importlib
import io
import json
import logging
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor, nn

from util.errors import UserError
from util.misc import NestedTensor

METADATA_KEY = "pnp_detr"
INPUT_NAME = "images"
MIN_SIDE = 64  # two cells of a stride-32 feature map: at one cell the exporter specialises the graph
MAX_SIDE = 8192


def require(package: str, purpose: str) -> ModuleType:
    """``import package``, or a one-line ``UserError`` naming it and how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"{purpose} needs the '{package}' package, which is not installed: "
                        f"pip install {package} (it is in requirements-dev.txt)") from None


def output_names(model: nn.Module) -> list[str]:
    """The outputs of the exported graph: the boxes, and the masks of a panoptic model."""
    return ["pred_logits", "pred_boxes"] + (["pred_masks"] if hasattr(model, "mask_head") else [])


class SingleImageDetector(nn.Module):
    """``model`` at poll ratio ``ratio`` (None: DETR) as a function of one unpadded image tensor."""

    def __init__(self, model: nn.Module, ratio: Optional[float]):
        super().__init__()
        self.model = model
        self.ratio = ratio
        self.output_names = output_names(model)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(images, self.ratio)
        return tuple(outputs[name] for name in self.output_names)


def export(model: nn.Module, ratio: Optional[float], path: str, size: tuple[int, int],
           metadata: dict[str, Any]) -> SingleImageDetector:
    """Write ``model`` (eval mode, CPU) at ``ratio`` to ``path`` as one ONNX file, traced on a
    ``size`` image, with dynamic height and width; returns the traced module.

    ``torch.onnx.export``'s default (dynamo) exporter: ``torch.export`` traces the Python code
    with symbolic sizes, so the sampler's ``int(valid * r)`` becomes a graph computation
    instead of the constant of the trace size that the TorchScript tracer would record.
    ``metadata`` is stored as JSON under ``METADATA_KEY``.
    """
    for package in ("onnx", "onnxscript"):
        require(package, "ONNX export")
    detector = SingleImageDetector(model, ratio).eval()
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    example = torch.randn(1, 3, *size)
    optimizer_log = logging.getLogger("onnxscript")  # warns of every multi-output node it leaves unfolded
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(detector, (example,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=detector.output_names,
                                        dynamic_shapes={INPUT_NAME: {2: height, 3: width}}, verbose=False)
    finally:
        optimizer_log.setLevel(level)
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    program.save(path, external_data=False)
    return detector


def session(path: str, threads: Optional[int] = None) -> Any:
    """An ONNX Runtime CPU inference session of ``path`` (``threads``: intra-op threads).

    Its worker threads sleep between runs instead of spinning, so that they leave the cores to
    the next thing that runs (PyTorch's threads in ``tools/benchmark_onnx.py``'s turns).
    """
    ort = require("onnxruntime", "running an ONNX model")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable files
        raise UserError(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0]})") from None


def max_differences(detector: SingleImageDetector, runtime: Any, sizes: list[tuple[int, int]],
                    seed: int = 0) -> list[float]:
    """Per image size, the largest absolute difference between eager PyTorch and ONNX Runtime
    over every output, on a random normalised image."""
    generator = torch.Generator().manual_seed(seed)
    found = []
    for height, width in sizes:
        image = torch.randn(1, 3, height, width, generator=generator)
        with torch.no_grad():
            eager = detector(image)
        exported = runtime.run(None, {INPUT_NAME: image.numpy()})
        found.append(max(float((torch.from_numpy(e) - t).abs().max()) for e, t in zip(exported, eager)))
    return found


class OnnxDetector:
    """A file written by ``tools/export_onnx.py`` run by ONNX Runtime on the CPU, called as the
    model is (``detector(samples, ratio)``) on a batch of one unpadded image.

    ``args``: the flags of the exported model; ``ratio``: the poll ratio fixed at export (None
    for DETR).
    """

    def __init__(self, path: str):
        self.runtime = session(path)
        stored = self.runtime.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if stored is None:
            raise UserError(f"{path}: no '{METADATA_KEY}' metadata: not a file written by tools/export_onnx.py")
        info = json.loads(stored)
        self.args = argparse.Namespace(**info["args"])
        self.ratio: Optional[float] = info["sample_topk_ratio"]
        self.output_names: list[str] = info["outputs"]

    @property
    def uses_pnp(self) -> bool:
        return self.ratio is not None

    def __call__(self, samples: NestedTensor, ratio: Optional[float] = None) -> dict[str, Tensor]:
        if ratio != self.ratio:
            raise ValueError(f"the exported graph polls at r={self.ratio}, asked r={ratio}")
        if samples.tensors.shape[0] != 1 or (samples.mask is not None and bool(samples.mask.any())):
            raise ValueError("an exported graph takes one unpadded image at a time")
        outputs = self.runtime.run(None, {INPUT_NAME: samples.tensors.cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}
