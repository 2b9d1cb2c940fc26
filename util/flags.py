"""main.py's flags: the parser and the ``--config`` YAML presets.

Importing this module imports torch and the model definitions only (no dataset, evaluation or
YAML package), so ``hubconf.py`` builds models from the same defaults with torch and
torchvision alone.
"""
import argparse
from typing import Any, Optional

import torch

from models.pnp import KPROJ_NETS, SCORE_PRED_NETS
from models.vit_archs import GLOBAL_POOLS, VIT_ARCHS
from util.errors import UserError

TRAIN_EVAL_RATIOS = [0.333, 0.5, 0.65, 0.8]
TASKS = ("detection", "classification")
DEFAULT_PNP_AFTER_BLOCK = 2  # of 12 blocks; docs/pnp_vit.md says why
AUGMENTATIONS = ("detr", "flip")  # --augment: datasets.transforms.make_coco_transforms


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PnP-DETR", add_help=True,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="YAML preset whose keys are flag names; the command line overrides it")
    p.add_argument("--task", default="detection", choices=TASKS,
                   help="detection (DETR / PnP-DETR on COCO-format data) or classification "
                        "(ViT / PnP-ViT on an ImageFolder root, see the classification flags)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", default=1e-4, type=float,
                   help="AdamW lr of the transformer, heads and sampler (DeiT: 5e-4 x total batch / 512)")
    g.add_argument("--lr_base_batch", default=0, type=int,
                   help="when > 0, --lr and --lr_backbone are the lrs of this total batch, scaled linearly to the "
                        "run's (--batch_size x processes), as DeiT's 5e-4 x batch / 512; 0: used as given")
    g.add_argument("--lr_backbone", default=1e-5, type=float, help="0 freezes the backbone")
    g.add_argument("--batch_size", default=2, type=int, help="images per process")
    g.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    g.add_argument("--epochs", default=300, type=int, help="number of training epochs")
    g.add_argument("--lr_drop", default=200, type=int, help="epoch at which the lr drops 10x")
    g.add_argument("--trainable", default=None, nargs="+", metavar="PREFIX",
                   help="train only the parameters whose names start with these prefixes (e.g. transformer.sampler "
                        "to fit a retrofitted sampler to a frozen DETR; sampler for PnP-ViT); default: all")
    g.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: off)")
    g.add_argument("--lr_schedule", default="step", choices=("step", "cosine"),
                   help="step: lr x0.1 at --lr_drop; cosine: timm's cosine decay to --min_lr after "
                        "--warmup_epochs of linear warm-up from --warmup_lr (DeiT)")
    g.add_argument("--warmup_epochs", default=5, type=int, help="--lr_schedule cosine: warm-up epochs")
    g.add_argument("--warmup_lr", default=1e-6, type=float, help="--lr_schedule cosine: lr of the first warm-up epoch")
    g.add_argument("--min_lr", default=1e-5, type=float, help="--lr_schedule cosine: lr at the end")
    g.add_argument("--ema_decay", default=0.0, type=float,
                   help="0: off; else keep a moving average of the weights (timm's ModelEmaV3) whose decay warms up as "
                        "1 - n^(-2/3) at the n-th optimiser step to at most this (0.99 at n = 1,000): the average is what the run "
                        "evaluates and saves as the checkpoint's model, the trained weights as its trained_model")
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
    g.add_argument("--sample_ratio_upper_prob", default=0.0, type=float,
                   help="probability that a training iteration polls at --sample_ratio_higher_bound itself (with "
                        "the bound at 1: trains r = 1, which a uniform draw never gives); 0: the paper's "
                        "Uniform(lower, higher) draw only")
    g.add_argument("--unsample_abstract_number", default=0, type=int,
                   help="M coarse tokens; 0 = auto (30 at stride 32, 100 at stride 16 or 8; ViT: the patch grid's side)")
    g.add_argument("--score_pred_net", default="2layer-fc-256", choices=SCORE_PRED_NETS,
                   help="poll score network: C->C->1, C->16->1 or C->1 1x1 convs")
    g.add_argument("--kproj_net", default="1layer-fc", choices=KPROJ_NETS,
                   help="pool key projection: C->M or C->C->M")
    g.add_argument("--pos_embed_kproj", action="store_true", help="add position embeddings before k_proj (detection)")
    g.add_argument("--sample_reg_loss", default=1e-4, type=float, help="weight of the sampler's score regulariser")
    g.add_argument("--retrofit", action="store_true",
                   help="the sampler passes token values through unchanged, so PnP built on a DETR or ViT "
                        "checkpoint computes that model at r = 1 (default: the paper's sampler)")
    g = p.add_argument_group("classification (--task classification: ViT / PnP-ViT; defaults: DeiT's recipe)")
    g.add_argument("--data_path", default=None, help="ImageFolder root with train/<class>/... and val/<class>/...")
    g.add_argument("--vit_arch", default="deit_small", choices=list(VIT_ARCHS),
                   help="ViT width/depth/heads: demo 128/6/4, deit_tiny 192/12/3, deit_small 384/12/6, vit_base 768/12/12")
    g.add_argument("--patch_size", default=16, type=int, help="ViT patch size in pixels")
    g.add_argument("--input_size", default=224, type=int, help="ViT image size (square) in pixels")
    g.add_argument("--pnp_after_block", default=DEFAULT_PNP_AFTER_BLOCK, type=int,
                   help="the sampler runs after this many ViT blocks (0: on the patch embeddings)")
    g.add_argument("--vit_weights", default="none",
                   help="ViT weights to start from: none, timm (timm's published ImageNet weights of --vit_arch, "
                        "downloaded if not cached) or a PATH to a timm/DeiT checkpoint; the sampler starts fresh")
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate of the last block")
    g.add_argument("--global_pool", default="token", choices=GLOBAL_POOLS,
                   help="what the head reads: token (the class token, as ViT/DeiT) or avg (the mean of the other "
                        "tokens; with the sampler a mean over more background as r rises, see docs/pnp_vit.md)")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--mixup", default=0.8, type=float, help="Mixup alpha (0: off; timm's Mixup)")
    g.add_argument("--cutmix", default=1.0, type=float, help="CutMix alpha (0: off)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy (timm's string; none: off)")
    g.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    g.add_argument("--color_jitter", default=0.3, type=float, help="colour jitter strength (used without --aa)")
    g.add_argument("--train_interpolation", default="bicubic", help="resize interpolation in training (timm's names)")
    g.add_argument("--scale", default=[0.08, 1.0], type=float, nargs=2,
                   help="area range of the training random resized crop (fractions of the image)")
    g.add_argument("--input_mean", default=None, type=float, nargs=3,
                   help="per-channel mean the images are normalised with (default: that of the --vit_weights "
                        "timm config, else ImageNet's as DeiT)")
    g.add_argument("--input_std", default=None, type=float, nargs=3,
                   help="per-channel std (default: as --input_mean)")
    g.add_argument("--crop_pct", default=None, type=float,
                   help="evaluation: resize to --input_size / crop_pct, then centre crop (default: that of the "
                        "--vit_weights timm config, else 0.875)")
    g.add_argument("--repeated_aug", action="store_true",
                   help="repeated augmentation: each image 3 times per epoch, in different processes (timm's RepeatAugSampler)")
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
    g = p.add_argument_group("training accelerators (detection; training only: evaluation, predict.py and "
                             "exported models run the model as without them)")
    g.add_argument("--query_groups", default=1, type=int,
                   help="Group DETR: training runs K groups of --num_queries queries, each matched one-to-one to "
                        "the targets on its own, attending only within its group, the loss summed over groups; "
                        "evaluation runs group 0 alone (1: off)")
    g.add_argument("--dn_groups", default=0, type=int,
                   help="DN-DETR: training also runs K groups of denoising queries, one per target box, made "
                        "from the noised ground truth and asked to reconstruct it; the matching queries cannot "
                        "see them (0: off)")
    g.add_argument("--dn_label_noise", default=0.2, type=float,
                   help="probability that a denoising query is given a random class instead of its box's (--dn_groups)")
    g.add_argument("--dn_box_noise", default=0.4, type=float,
                   help="denoising box noise: centres moved by up to half this fraction of the box size, sizes "
                        "scaled by 1 +- this (--dn_groups)")
    g.add_argument("--encoder_head", default=0.0, type=float,
                   help="Co-DETR: a dense detection head on the encoder's tokens, each token trained to classify "
                        "and box the smallest object holding its cell; the value weighs its loss (0: off)")
    g.add_argument("--mosaic", default=0.0, type=float,
                   help="probability that a training image is replaced by a 2x2 mosaic of four training images, "
                        "each at half its size: more objects per image for one-to-one matching (0: off; not "
                        "with --masks)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_file", default="coco",
                   help="dataset kind: coco (any COCO-format detection dataset) or coco_panoptic (COCO panoptic)")
    g.add_argument("--coco_path", type=str, default=None,
                   help="COCO-layout dataset root: annotations/instances_{train,val}2017.json, {train,val}2017/")
    for split, name in (("train", "training"), ("val", "validation")):
        g.add_argument(f"--{split}_images", default=None, metavar="DIR",
                       help=f"folder of the {name} images (their file_name in --{split}_annotations is relative "
                            f"to it); with --{split}_annotations it replaces --coco_path's {split}2017/")
        g.add_argument(f"--{split}_annotations", default=None, metavar="JSON",
                       help=f"COCO-format json of the {name} images; with --{split}_images it replaces "
                            f"--coco_path's annotations/instances_{split}2017.json")
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
    g.add_argument("--resume", default="",
                   help="checkpoint path, URL or published name (see --finetune) to resume or evaluate")
    g.add_argument("--finetune", default="", metavar="PATH_OR_URL",
                   help="start a new run from this checkpoint's model weights (a main.py checkpoint, a URL, or "
                        "detr_r50, detr_r50_dc5, detr_r101, detr_r101_dc5: DETR's published ones, downloaded), "
                        "its class head replaced when the class count differs; its optimiser, epoch and flags "
                        "are not used")
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
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            values = value if isinstance(value, list) else [value]
            if isinstance(action.nargs, int) and len(values) != action.nargs:
                raise UserError(f"{source}: {key} needs {action.nargs} values, got {value!r}")
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
        import yaml  # only a --config preset needs it

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
