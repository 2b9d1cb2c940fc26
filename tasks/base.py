"""The ``Task`` interface: what detection and classification do differently in main.py and predict.py.

main.py (the training loop, checkpoints, logging, distributed set-up, evaluation at several
poll ratios) and predict.py (reading images, writing the JSON and the pictures) are shared;
a task says how to build its data, its optimiser groups and first weights, how to evaluate
and report, and how its checkpoints run on image files.
"""
import argparse
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler

from engine import BatchTransform
from datasets.coco import read_json_object
from util.checkpoint import load_model_weights
from util.draw import PollGrid
from util.errors import UserError

class Prediction(NamedTuple):
    """What predict.py writes for one image: its JSON ``entry``, the ``panel`` picture (boxes or
    class), the ``view`` the poll is drawn on, and the ``grid`` of the poll (None without
    ``--show_poll``)."""

    entry: dict[str, Any]
    panel: Image.Image
    view: Image.Image
    grid: Optional[PollGrid]


class Task(ABC):
    """One ``--task``. Subclasses set the class attributes and implement the abstract methods."""

    name: str  # the --task value
    model_name: str  # the model without sampler ("DETR", "ViT"); with one it is "PnP-" + this
    metric: str  # the eval.json column of the trade-off plot and of --baseline_eval
    table_columns: tuple[str, ...]  # the eval.json columns printed as the evaluation table
    table_format: str  # format of those columns
    gflops_digits: int  # decimals of the table's GFLOPs column
    own_flags: tuple[str, ...]  # flags (argparse dests) that only this task reads
    head_prefix: str  # state_dict prefix of the class logits (replaced when fine-tuning to other classes)
    sampler_prefix: str  # state_dict prefix of the poll-and-pool sampler
    model_takes_targets: bool = False  # training calls model(samples, ratio, targets), not model(samples, ratio)

    def display_name(self, uses_pnp: bool) -> str:
        return f"PnP-{self.model_name}" if uses_pnp else self.model_name

    # ---- flags, data and training ------------------------------------------------------------
    @abstractmethod
    def check_args(self, args: argparse.Namespace) -> None:
        """Reject flags this task cannot follow with a one-line ``UserError`` naming them."""

    def complete_args(self, args: argparse.Namespace) -> None:
        """Fill in (in place) the flags whose value other flags decide, before anything is built,
        so that checkpoints store them."""

    @abstractmethod
    def build_dataset(self, split: str, args: argparse.Namespace) -> Dataset:
        """The ``train`` or ``val`` split; it has ``num_classes``."""

    def collate_fn(self, args: argparse.Namespace) -> Optional[Callable]:
        """How the loaders batch the dataset's items (None: stack them)."""
        return None

    def train_sampler(self, args: argparse.Namespace, dataset: Dataset) -> Sampler:
        """The training sampler: each process its share of a shuffled epoch, or one process all of it."""
        return DistributedSampler(dataset) if args.distributed else RandomSampler(dataset)

    @abstractmethod
    def build_model(self, args: argparse.Namespace, dataset_val: Dataset
                    ) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
        """The model, its criterion and its post-processors."""

    def load_weights(self, model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
        """Load a checkpoint's weights (``--resume``, ``--finetune``) into ``model``: strict key
        matching with the allowed gaps of ``util.checkpoint.load_model_weights``. Returns the notes to print."""
        return load_model_weights(model, state_dict, source, head_prefix=self.head_prefix,
                                  sampler_prefix=self.sampler_prefix)

    @abstractmethod
    def param_groups(self, args: argparse.Namespace, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW's parameter groups (``--lr`` and ``--weight_decay`` unless a group says otherwise)."""

    @abstractmethod
    def load_initial_weights(self, args: argparse.Namespace, model: nn.Module) -> list[str]:
        """Load the weights a run starts from when it resumes nothing; returns the notes to print."""

    def batch_transform(self, args: argparse.Namespace) -> Optional[BatchTransform]:
        """What every training batch goes through before the model (None: nothing)."""
        return None

    # ---- evaluation --------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, args: argparse.Namespace, model: nn.Module, criterion: nn.Module,
                 postprocessors: dict[str, nn.Module], loader_val: Any, device: torch.device,
                 ratios: list[Optional[float]]) -> dict[str, Any]:
        """The log stats of one evaluation of every ratio (``engine``'s ``ratio_<r>_`` keys)."""

    @abstractmethod
    def eval_rows(self, stats: dict[str, Any], ratios: list[Optional[float]]) -> list[dict[str, Any]]:
        """One ``eval.json`` row per ratio (``{"ratio": r, <metrics>, "images_per_s": ...}``)."""

    def format_table(self, rows: list[dict[str, Any]]) -> str:
        """The metric columns, then GFLOPs and img/s where the rows have them; a row of ratio
        None (the model without sampler) is labelled with ``model_name``."""
        extras = [(key, title) for key, title in (("gflops", "GFLOPs"), ("images_per_s", "img/s")) if key in rows[0]]
        lines = ["ratio  " + "  ".join(f"{n:>6}" for n in self.table_columns)
                 + "".join(f"  {title:>7}" for _, title in extras)]
        for row in rows:
            ratio = f"{self.model_name:<5}" if row["ratio"] is None else f"{row['ratio']:<5g}"
            digits = {"gflops": self.gflops_digits, "images_per_s": 2}
            lines.append(f"{ratio}  " + "  ".join(self.table_format.format(row[n]) for n in self.table_columns)
                         + "".join(f"  {row[key]:7.{digits[key]}f}" for key, _ in extras))
        return "\n".join(lines)

    # ---- predict.py --------------------------------------------------------------------------
    @abstractmethod
    def checkpoint_args(self, args: argparse.Namespace, state: dict[str, torch.Tensor], source: str) -> None:
        """Set (in place) what a checkpoint's weights decide over its stored flags: the class
        count, whether it has a sampler, nothing to download."""

    @abstractmethod
    def category_names(self, categories_file: Optional[str], trained: argparse.Namespace
                       ) -> tuple[dict[int, str], Optional[str]]:
        """Class id -> name, and the file or folder it came from (None: none found)."""

    @abstractmethod
    def predict(self, model: Any, postprocess: Optional[nn.Module], paths: list[Path], trained: argparse.Namespace,
                ratio: Optional[float], device: torch.device, options: argparse.Namespace,
                names: dict[int, str]) -> Iterator[Prediction]:
        """predict.py's result for every image of ``paths``, in order (``options``: its flags)."""

    @abstractmethod
    def report_header(self, options: argparse.Namespace, ratio: Optional[float],
                      names_from: Optional[str]) -> dict[str, Any]:
        """The keys predict.py's JSON holds before ``images``."""


def read_category_names(categories_file: str) -> dict[int, str]:
    """Class id -> name from the ``categories`` of a COCO-format json (``predict.py --categories``)."""
    entries = read_json_object(categories_file).get("categories")
    if not isinstance(entries, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str) for c in entries):
        raise UserError(f"{categories_file}: expected a list 'categories' of objects with an int 'id' and a str 'name'")
    return {c["id"]: c["name"] for c in entries}


UNTRAINED_WARNING = ("warning: evaluating a model with untrained weights (no --resume, --finetune or checkpoint in "
                     "--output_dir)")
