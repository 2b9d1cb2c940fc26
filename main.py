"""Train or evaluate DETR / PnP-DETR.

    python main.py --config configs/demo.yaml                # train the CPU demo
    python main.py --config configs/demo.yaml --eval --eval_ratios 0.33 0.5 0.8
    torchrun --nproc_per_node=8 main.py --config configs/pnp_detr_r50.yaml --coco_path /data/coco
"""
import argparse
import datetime
import functools
import json
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import util.misc as utils
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import STAT_NAMES
from datasets.panoptic_eval import panoptic_row
from datasets.samplers import ShardedBatchSampler
from datasets.transforms import AUGMENTATIONS
from engine import NonFiniteLossError, evaluate, ratio_key, train_one_epoch
from models import build_model, fast_path
from models.backbone import load_backbone_weights
from models.pnp import KPROJ_NETS, SCORE_PRED_NETS
from models.segmentation import PostProcessPanoptic, load_frozen_detector
from util.checkpoint import load_model_weights, plain_args, read_checkpoint
from util.errors import UserError, exit_status
from util.flops import CONVENTION, mean_flops
from util.plot_utils import log_scalars, plot_tradeoff

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TRAIN_EVAL_RATIOS = [0.333, 0.5, 0.65, 0.8]
COMPILE_SIZE_DIVISIBILITY = 32  # the largest backbone stride


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PnP-DETR", add_help=True,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML preset whose keys are flag names; the command line overrides it")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", default=1e-4, type=float, help="AdamW lr of the transformer, heads and sampler")
    g.add_argument("--lr_backbone", default=1e-5, type=float, help="0 freezes the backbone")
    g.add_argument("--batch_size", default=2, type=int, help="images per process")
    g.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    g.add_argument("--epochs", default=300, type=int, help="number of training epochs")
    g.add_argument("--lr_drop", default=200, type=int, help="epoch at which the lr drops 10x")
    g.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: off)")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast (loss, matcher, post-processing stay fp32); on a CPU, faster only with "
                        "native bf16 (AMX or AVX512-BF16): elsewhere it warns and runs slower")
    g.add_argument("--channels_last", action="store_true",
                   help="channels-last convolutions: the default now (kept so that old commands and presets work)")
    g.add_argument("--no_channels_last", action="store_true",
                   help="keep the convolutions in the contiguous layout (the default is channels-last: faster "
                        "oneDNN/cuDNN convolutions, same results up to float rounding)")
    g = p.add_argument_group("model")
    g.add_argument("--frozen_weights", type=str, default=None,
                   help="pretrained detector whose weights stay frozen (panoptic mask-head training)")
    g.add_argument("--backbone", default="resnet50", type=str, help="resnet18, resnet34, resnet50 or resnet101")
    g.add_argument("--backbone_weights", default="imagenet", type=str,
                   help="'imagenet' (torchvision weights, downloaded if not cached; FrozenBatchNorm), "
                        "'none' (from scratch: trainable BatchNorm, every stage trained) or a PATH to a ResNet state_dict")
    g.add_argument("--backbone_last_stage", default=4, type=int, choices=(2, 3, 4),
                   help="ResNet stage that feeds the transformer: 4 = C5 (stride 32), 3 = C4 (stride 16), 2 = C3 (stride 8)")
    g.add_argument("--dilation", action="store_true", help="DC5: dilate the last stage (stride 16)")
    g.add_argument("--position_embedding", default="sine", choices=("sine", "learned", "v2", "v3"),
                   help="sine (normalised, DETR v2) or learned (v3) position encoding")
    g.add_argument("--enc_layers", default=6, type=int, help="transformer encoder layers")
    g.add_argument("--dec_layers", default=6, type=int, help="transformer decoder layers")
    g.add_argument("--dim_feedforward", default=2048, type=int, help="hidden size of the transformer FFNs")
    g.add_argument("--hidden_dim", default=256, type=int, help="transformer width d")
    g.add_argument("--dropout", default=0.1, type=float, help="dropout in the transformer")
    g.add_argument("--nheads", default=8, type=int, help="attention heads")
    g.add_argument("--num_queries", default=100, type=int, help="object queries (the most boxes per image)")
    g.add_argument("--pre_norm", action="store_true", help="pre-norm transformer layers (default post-norm)")
    g.add_argument("--masks", action="store_true",
                   help="panoptic segmentation: add the mask head (needs --dataset_file coco_panoptic)")
    g.add_argument("--num_classes", default=None, type=int,
                   help="number of class logits before no-object (default: max category id + 1 of the train annotations)")
    g = p.add_argument_group("poll-and-pool sampler")
    g.add_argument("--no_pnp", action="store_true", help="plain DETR: no sampler")
    g.add_argument("--sample_topk_ratio", default=1 / 3, type=float, help="poll ratio r when none is given (--eval)")
    g.add_argument("--sample_ratio_lower_bound", default=1 / 3, type=float, help="lowest training poll ratio")
    g.add_argument("--sample_ratio_higher_bound", default=0.8, type=float, help="highest training poll ratio")
    g.add_argument("--unsample_abstract_number", default=0, type=int,
                   help="M coarse tokens; 0 = auto (30 at stride 32, 100 at stride 16 or 8)")
    g.add_argument("--score_pred_net", default="2layer-fc-256", choices=SCORE_PRED_NETS,
                   help="poll score network: C->C->1, C->16->1 or C->1 1x1 convs")
    g.add_argument("--kproj_net", default="1layer-fc", choices=KPROJ_NETS,
                   help="pool key projection: C->M or C->C->M")
    g.add_argument("--pos_embed_kproj", action="store_true", help="add position embeddings before k_proj")
    g.add_argument("--sample_reg_loss", default=1e-4, type=float, help="weight of the sampler's score regulariser")
    g = p.add_argument_group("loss")
    g.add_argument("--no_aux_loss", action="store_true", help="no loss on the intermediate decoder layers")
    g.add_argument("--set_cost_class", default=1, type=float, help="matching cost weight of the class probability")
    g.add_argument("--set_cost_bbox", default=5, type=float, help="matching cost weight of the box L1 distance")
    g.add_argument("--set_cost_giou", default=2, type=float, help="matching cost weight of the GIoU")
    g.add_argument("--mask_loss_coef", default=1, type=float, help="focal mask loss weight (--masks)")
    g.add_argument("--dice_loss_coef", default=1, type=float, help="dice mask loss weight (--masks)")
    g.add_argument("--bbox_loss_coef", default=5, type=float, help="box L1 loss weight")
    g.add_argument("--giou_loss_coef", default=2, type=float, help="GIoU loss weight")
    g.add_argument("--eos_coef", default=0.1, type=float, help="weight of the no-object class")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_file", default="coco",
                   help="dataset kind: coco (any COCO-format detection dataset) or coco_panoptic (COCO panoptic)")
    g.add_argument("--coco_path", type=str, default=None, help="COCO-format dataset root")
    g.add_argument("--coco_panoptic_path", type=str, default=None,
                   help="COCO panoptic root with annotations/panoptic_{train,val}2017.json and PNGs "
                        "(--dataset_file coco_panoptic; images come from --coco_path)")
    g.add_argument("--eval_size", default=800, type=int,
                   help="shorter side at evaluation; training scales the published augmentation by eval_size/800")
    g.add_argument("--augment", default="detr", choices=AUGMENTATIONS,
                   help="training augmentation: detr (published: flip, multi-scale resize, random crop) or "
                        "flip (flip and the evaluation resize only; learns faster from scratch)")
    g.add_argument("--num_workers", default=2, type=int, help="data loading processes per training process")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="", help="where to save checkpoints and logs (empty: nothing is saved)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", default=42, type=int, help="random seed (each epoch and process derives its own)")
    g.add_argument("--resume", default="", help="checkpoint path or URL to resume or evaluate")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N",
                   help="first epoch when not resuming (a resumed run continues after its checkpoint)")
    g.add_argument("--eval", action="store_true", help="only evaluate (writes output_dir/eval.json)")
    g.add_argument("--eval_ratios", default=None, type=float, nargs="+",
                   help=f"poll ratios to evaluate (training: {TRAIN_EVAL_RATIOS}; --eval: --sample_topk_ratio)")
    g.add_argument("--eval_every", default=1, type=int,
                   help="evaluate every N epochs during training (the last epoch always)")
    g.add_argument("--flops_images", default=100, type=int,
                   help="--eval: mean GFLOPs over the first N val images, counted one by one (0: not counted)")
    g.add_argument("--baseline_eval", default=None,
                   help="--eval: a DETR run's eval.json, drawn as the reference point of output_dir/tradeoff.png")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone and the transformer (the first batches compile; see docs/BENCHMARKS.md)")
    g.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log the scalars of log.txt to output_dir/tensorboard after every training epoch "
                        "(needs the optional tensorboard package)")
    g.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    g.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    return p


def _convert(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Check and convert one preset value the way argparse would convert the flag."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    convert = action.type or str
    try:
        if action.nargs in ("+", "*"):
            values = value if isinstance(value, list) else [value]
            converted = [convert(v) for v in values]
        else:
            converted = convert(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key} has an invalid value {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{source}: {key} must be one of {list(action.choices)}, got {value!r}")
    return converted


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Flags from the command line over the ``--config`` preset over the defaults."""
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        path = pre.config
        try:
            with open(path) as f:
                preset = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"--config: {path} does not exist") from None
        except yaml.YAMLError as err:
            raise UserError(f"--config: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(preset, dict):
            raise UserError(f"--config: {path} must hold a mapping of flag names to values")
        actions = {a.dest: a for a in parser._actions}
        for key, value in preset.items():
            if key not in actions or key in ("help", "config"):
                raise UserError(f"{path}: unknown flag {key!r} (keys are flag names without '--')")
            preset[key] = _convert(actions[key], key, value, path)
        parser.set_defaults(**preset)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent flags with a one-line message naming them."""
    lower, upper = args.sample_ratio_lower_bound, args.sample_ratio_higher_bound
    if not (0 < lower <= 1 and 0 < upper <= 1):
        raise UserError(f"--sample_ratio_lower_bound/--sample_ratio_higher_bound must lie in (0, 1], got {lower} and {upper}")
    if lower > upper:
        raise UserError(f"--sample_ratio_lower_bound {lower} is above --sample_ratio_higher_bound {upper}")
    if not 0 < args.sample_topk_ratio <= 1:
        raise UserError(f"--sample_topk_ratio must lie in (0, 1], got {args.sample_topk_ratio}")
    for r in args.eval_ratios or []:
        if not 0 < r <= 1:
            raise UserError(f"--eval_ratios: every ratio must lie in (0, 1], got {r}")
    if args.frozen_weights is not None and not args.masks:
        raise UserError("--frozen_weights is for training the mask head and needs --masks")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.flops_images < 0:
        raise UserError(f"--flops_images must be 0 or more, got {args.flops_images}")
    if args.baseline_eval and not args.eval:
        raise UserError("--baseline_eval is only used with --eval")
    if args.channels_last and args.no_channels_last:
        raise UserError("--channels_last and --no_channels_last contradict each other: give one")
    if args.tensorboard and not args.eval and not args.output_dir:
        raise UserError("--tensorboard logs to output_dir/tensorboard: give --output_dir")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(args: argparse.Namespace, epoch: int) -> int:
    """Each epoch's randomness depends only on (seed, epoch, rank): resuming replays it exactly."""
    return args.seed + 1000 * epoch + utils.get_rank()


def eval_rows(stats: dict[str, Any], ratios: list[Optional[float]]) -> list[dict[str, Any]]:
    """One ``{"ratio": r, "AP": ..., ...}`` row per ratio from ``evaluate``'s stats."""
    rows = []
    for r in ratios:
        values = stats[f"{ratio_key(r)}coco_eval_bbox"]
        rows.append({"ratio": r, **{name: float(v) for name, v in zip(STAT_NAMES, values)},
                     "images_per_s": stats[f"{ratio_key(r)}images_per_s"]})
        if f"{ratio_key(r)}PQ_all" in stats:
            rows[-1].update(panoptic_row(stats, ratio_key(r)))
    return rows


def add_flops(rows: list[dict[str, Any]], model: torch.nn.Module, dataset, num_images: int,
              device: torch.device) -> None:
    """Add to each row the mean ``gflops`` (whole model) and ``gflops_transformer`` per image
    over the first ``num_images`` images of ``dataset``, each counted alone (batch 1)."""
    images = (dataset[i][0].to(device) for i in range(min(num_images, len(dataset))))
    flops = mean_flops(model, images, [row["ratio"] for row in rows])
    for row in rows:
        row["gflops"] = flops[row["ratio"]].total
        row["gflops_transformer"] = flops[row["ratio"]].transformer


def read_baseline(path: str) -> list[dict[str, Any]]:
    """The rows of a (DETR) ``eval.json`` for the trade-off plot; each needs ``AP`` and ``gflops``."""
    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--baseline_eval: {path} does not exist") from None
    except json.JSONDecodeError:
        raise UserError(f"--baseline_eval: {path} is not JSON") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"AP", "gflops"} <= set(r) for r in rows):
        raise UserError(f"--baseline_eval: {path} must be an eval.json whose rows have AP and gflops "
                        "(written by --eval with --flops_images > 0)")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The AP columns, then GFLOPs and img/s where the rows have them."""
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    extras = [(key, title) for key, title in (("gflops", "GFLOPs"), ("images_per_s", "img/s")) if key in rows[0]]
    lines = ["ratio  " + "  ".join(f"{n:>6}" for n in names) + "".join(f"  {title:>7}" for _, title in extras)]
    for row in rows:
        ratio = "DETR " if row["ratio"] is None else f"{row['ratio']:<5g}"
        lines.append(f"{ratio}  " + "  ".join(f"{row[n]:6.3f}" for n in names)
                     + "".join(f"  {row[key]:7.2f}" for key, _ in extras))
    return "\n".join(lines)


def tensorboard_writer(args: argparse.Namespace, output_dir: Optional[Path]) -> Optional["SummaryWriter"]:
    """A TensorBoard writer for ``output_dir/tensorboard`` on rank 0 when training with
    ``--tensorboard``, else None (``--eval`` logs no epoch).

    Every rank imports it, so a missing package stops each one with the same one-line error.
    """
    if not args.tensorboard or args.eval:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(output_dir / "tensorboard")) if utils.is_main_process() else None


def build_loaders(args: argparse.Namespace, dataset_train, dataset_val) -> tuple[Optional[DataLoader], DataLoader]:
    # Compiled, batches are padded to a multiple of the largest backbone stride: fewer shapes to
    # compile, and exact feature sizes (torch 2.14's compiled backward failed at odd ones).
    collate_fn = functools.partial(utils.collate_fn, size_divisibility=COMPILE_SIZE_DIVISIBILITY if args.compile else 1)
    batches_val = ShardedBatchSampler(len(dataset_val), args.batch_size, utils.get_rank(), utils.get_world_size())
    loader_val = DataLoader(dataset_val, batch_sampler=batches_val, collate_fn=collate_fn,
                            num_workers=args.num_workers)
    if dataset_train is None:
        return None, loader_val
    sampler_train = DistributedSampler(dataset_train) if args.distributed else RandomSampler(dataset_train)
    batch_sampler = torch.utils.data.BatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler) == 0:
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(dataset_train)} training images")
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                              num_workers=args.num_workers)
    return loader_train, loader_val


def main(args: argparse.Namespace) -> None:
    check_args(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    warning = utils.slow_bf16_warning(device) if args.amp else None
    if warning:
        print(warning)
    seed_everything(args.seed)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
    writer = tensorboard_writer(args, output_dir)

    resume = args.resume
    if not resume and output_dir is not None and (output_dir / "checkpoint.pth").exists():
        resume = str(output_dir / "checkpoint.pth")
        print(f"resuming from {resume}")
    checkpoint = read_checkpoint(resume) if resume else None

    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    if args.num_classes is None:
        saved = checkpoint.get("args") if checkpoint is not None else None
        saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
        if isinstance(saved, dict) and saved.get("num_classes"):
            args.num_classes = saved["num_classes"]
        else:
            args.num_classes = (dataset_val if args.eval else dataset_train).num_classes
    loader_train, loader_val = build_loaders(args, dataset_train, dataset_val)
    base_ds = get_coco_api_from_dataset(dataset_val)

    model, criterion, postprocessors = build_model(args)
    if args.masks:
        postprocessors["panoptic"] = PostProcessPanoptic(dataset_val.is_thing_map)
    fast_path(model.to(device), channels_last=not args.no_channels_last)
    criterion.to(device)
    if args.compile:  # in place: the state_dict keys stay those of the eager model
        model.backbone.compile()
        model.transformer.compile()
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"{'PnP-DETR' if model_without_ddp.uses_pnp else 'DETR'}: {n_parameters:,} trainable parameters")

    param_groups = [
        {"params": [p for n, p in model_without_ddp.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model_without_ddp.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": args.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)

    if checkpoint is not None:
        for note in load_model_weights(model_without_ddp, checkpoint["model"], resume):
            print(note)
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            lr_scheduler.step_size = args.lr_drop
            args.start_epoch = checkpoint["epoch"] + 1
    elif args.frozen_weights is not None:  # a resumed --masks run holds its detector already
        load_frozen_detector(model_without_ddp, args.frozen_weights)
    elif not args.eval:
        load_backbone_weights(model_without_ddp.backbone[0], args.backbone_weights)

    pnp = model_without_ddp.uses_pnp
    if args.eval:
        ratios = (args.eval_ratios or [args.sample_topk_ratio]) if pnp else [None]
        if not resume:
            print("warning: evaluating a model with untrained weights (no --resume and no checkpoint in --output_dir)")
        baseline = read_baseline(args.baseline_eval) if args.baseline_eval else None
        stats = evaluate(model_without_ddp, criterion, postprocessors, loader_val, base_ds, device, ratios, args.amp)
        rows = eval_rows(stats, ratios)
        if utils.is_main_process():
            if args.flops_images > 0:
                add_flops(rows, model_without_ddp, dataset_val, args.flops_images, device)
                print(f"{CONVENTION}; mean over the first {min(args.flops_images, len(dataset_val))} val images")
            print(format_table(rows))
            if output_dir is not None:
                (output_dir / "eval.json").write_text(json.dumps(rows, indent=2) + "\n")
                if args.flops_images > 0:
                    plot_tradeoff(rows, output_dir / "tradeoff.png", baseline)
        return

    ratios = (args.eval_ratios or TRAIN_EVAL_RATIOS) if pnp else [None]
    ratio_bounds = (args.sample_ratio_lower_bound, args.sample_ratio_higher_bound) if pnp else None
    if args.start_epoch >= args.epochs:
        print(f"nothing to train: the checkpoint already holds epoch {args.start_epoch - 1} of --epochs {args.epochs}")
    else:
        print(f"training epochs {args.start_epoch}..{args.epochs - 1}")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        seed_everything(epoch_seed(args, epoch))
        if args.distributed:
            loader_train.batch_sampler.sampler.set_epoch(epoch)
        try:
            train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                          args.clip_max_norm, ratio_bounds, args.amp, args.print_freq,
                                          rng=random.Random(epoch_seed(args, epoch)))
        except NonFiniteLossError as err:
            kept = output_dir / "checkpoint.pth" if output_dir is not None else None
            where = f"; the last good checkpoint is {kept}" if kept is not None and kept.exists() else ""
            raise NonFiniteLossError(f"training stopped: {err}{where}") from None
        lr_scheduler.step()
        if args.distributed:  # each rank's last step updated its own BatchNorm statistics: keep rank 0's
            for buffer in model_without_ddp.buffers():
                torch.distributed.broadcast(buffer, src=0)
        if output_dir is not None:
            checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": plain_args(args)}
            utils.save_on_master(checkpoint, output_dir / "checkpoint.pth")
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
                utils.save_on_master(checkpoint, output_dir / f"checkpoint{epoch:04}.pth")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters}
        last = epoch == args.epochs - 1
        if last or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0):
            test_stats = evaluate(model_without_ddp, criterion, postprocessors, loader_val, base_ds, device,
                                  ratios, args.amp)
            log_stats.update({f"test_{k}": v for k, v in test_stats.items()})
            if utils.is_main_process():
                print(format_table(eval_rows(test_stats, ratios)))
        if output_dir is not None and utils.is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
        if writer is not None:
            for name, value in log_scalars(log_stats).items():
                writer.add_scalar(name, value, epoch)
            writer.flush()
    if writer is not None:
        writer.close()
    print(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def run(argv: Optional[list[str]] = None) -> int:
    """Entry point: bad input ends in one line on stderr and exit status 2."""
    try:
        return exit_status(lambda: main(parse_args(argv)))
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
