"""torch.hub entry points: ``torch.hub.load(repo_dir, 'pnp_detr_resnet50', source='local')``, and
the ViT / PnP-ViT ones (``pnp_vit_deit_small``, ...), which also need timm.

Building a model imports torch, torchvision and scipy (the matcher) only: no dataset or
evaluation package. Every entry point builds the published architecture for COCO (91 classes + no-object; the
panoptic ones 250, as DETR's panoptic checkpoints) and downloads nothing unless
``pretrained=True`` is asked for, which needs ``checkpoint_url``: the original PnP-DETR
release published no stable weight URLs. The models come on the fast path (``models.fast_path``:
channels-last convolutions).
"""
from typing import Optional

from torch import nn

from models import build_model, fast_path
from models.detr import DETR, PostProcess
from models.segmentation import DETRsegm, PostProcessPanoptic
from util.checkpoint import load_model_weights, read_checkpoint
from util.flags import parse_args

dependencies = ["torch", "torchvision", "scipy"]

# COCO panoptic's categories, as in DETR's hub: ids 1-90 are things, 91-200 stuff.
COCO_PANOPTIC_IS_THING = {i: i <= 90 for i in range(201)}


def _build(flags: list[str], num_classes: int, pretrained: bool,
           checkpoint_url: Optional[str]) -> tuple[nn.Module, dict[str, nn.Module]]:
    args = parse_args(flags + ["--num_classes", str(num_classes), "--backbone_weights", "imagenet",
                               "--device", "cpu"])
    model, _, postprocessors = build_model(args)
    if pretrained:
        if not checkpoint_url:
            raise ValueError("pretrained=True needs checkpoint_url=<path or URL of a DETR/PnP-DETR checkpoint>")
        for note in load_model_weights(model, read_checkpoint(checkpoint_url)["model"], checkpoint_url):
            print(note)
    return fast_path(model), postprocessors


def _entry(flags: list[str], doc: str):
    def entry(pretrained: bool = False, num_classes: int = 91, checkpoint_url: Optional[str] = None,
              return_postprocessor: bool = False) -> DETR | tuple[DETR, PostProcess]:
        model, postprocessors = _build(flags, num_classes, pretrained, checkpoint_url)
        return (model, postprocessors["bbox"]) if return_postprocessor else model

    entry.__doc__ = doc
    return entry


def _panoptic_entry(flags: list[str], doc: str):
    def entry(pretrained: bool = False, num_classes: int = 250, threshold: float = 0.85,
              checkpoint_url: Optional[str] = None,
              return_postprocessor: bool = False) -> DETRsegm | tuple[DETRsegm, PostProcessPanoptic]:
        model, _ = _build(flags + ["--masks"], num_classes, pretrained, checkpoint_url)
        return (model, PostProcessPanoptic(COCO_PANOPTIC_IS_THING, threshold)) if return_postprocessor else model

    entry.__doc__ = doc + (" The post-processor keeps queries above ``threshold`` and knows COCO panoptic's "
                           "categories.")
    return entry


detr_resnet50 = _entry(["--no_pnp", "--backbone", "resnet50"], "DETR R50 (42.0 AP on COCO val).")
detr_resnet50_dc5 = _entry(["--no_pnp", "--backbone", "resnet50", "--dilation"], "DETR DC5-R50 (43.3 AP).")
detr_resnet101 = _entry(["--no_pnp", "--backbone", "resnet101"], "DETR R101 (43.5 AP).")
detr_resnet101_dc5 = _entry(["--no_pnp", "--backbone", "resnet101", "--dilation"], "DETR DC5-R101 (44.9 AP).")
pnp_detr_resnet50 = _entry(["--backbone", "resnet50"], "PnP-DETR R50 (41.1 AP at r=0.33, 41.8 at r=0.5).")
pnp_detr_resnet50_dc5 = _entry(["--backbone", "resnet50", "--dilation"],
                               "PnP-DETR DC5-R50 (42.7 AP at r=0.33, 43.1 at r=0.5).")
pnp_detr_resnet101 = _entry(["--backbone", "resnet101"], "PnP-DETR R101.")
detr_resnet50_panoptic = _panoptic_entry(["--no_pnp", "--backbone", "resnet50"],
                                         "DETR R50 panoptic (PQ 43.4); DETR's panoptic checkpoints load into it.")
detr_resnet50_dc5_panoptic = _panoptic_entry(["--no_pnp", "--backbone", "resnet50", "--dilation"],
                                             "DETR DC5-R50 panoptic (PQ 44.6).")
detr_resnet101_panoptic = _panoptic_entry(["--no_pnp", "--backbone", "resnet101"], "DETR R101 panoptic (PQ 45.1).")
pnp_detr_resnet50_panoptic = _panoptic_entry(["--backbone", "resnet50"],
                                             "PnP-DETR R50 panoptic: the encoder memory is put back on the grid "
                                             "(GridMemory) for DETR's mask head.")



def _vit_entry(flags: list[str], doc: str):
    def entry(pretrained: bool = False, num_classes: int = 1000, checkpoint_url: Optional[str] = None,
              retrofit: bool = True) -> nn.Module:
        # timm is imported here only: the detector entries need none
        from models.vit import load_vit_weights, vit_state_dict

        pnp = "--no_pnp" not in flags
        args = parse_args(["--task", "classification", "--num_classes", str(num_classes), "--device", "cpu"]
                          + flags + (["--retrofit"] if pnp and retrofit else []))
        model, _, _ = build_model(args)
        if pretrained:
            for note in load_vit_weights(model, vit_state_dict("timm", args.vit_arch), "timm's published weights"):
                print(note)
        if checkpoint_url:
            checkpoint = read_checkpoint(checkpoint_url)
            for note in load_model_weights(model, checkpoint["model"], checkpoint_url, head_prefix="head.",
                                           sampler_prefix="sampler."):
                print(note)
        return fast_path(model)

    entry.__doc__ = doc + (" ``pretrained=True`` loads timm's published ImageNet weights (downloaded; the "
                           "sampler starts fresh), ``checkpoint_url`` a main.py checkpoint. With ``retrofit`` "
                           "(the default) the sampler passes tokens on unchanged: at r = 1 the model computes "
                           "the ViT it was built on. Images: 224 px, normalised as input_config says.")
    return entry


vit_deit_tiny = _vit_entry(["--no_pnp", "--vit_arch", "deit_tiny"], "DeiT-Tiny (timm's ViT).")
vit_deit_small = _vit_entry(["--no_pnp", "--vit_arch", "deit_small"], "DeiT-Small (timm's ViT).")
vit_base = _vit_entry(["--no_pnp", "--vit_arch", "vit_base"], "ViT-B/16 (timm's augreg weights).")
pnp_vit_deit_tiny = _vit_entry(["--vit_arch", "deit_tiny"], "PnP-ViT on DeiT-Tiny, the sampler after block 2.")
pnp_vit_deit_small = _vit_entry(["--vit_arch", "deit_small"], "PnP-ViT on DeiT-Small, the sampler after block 2.")
pnp_vit_base = _vit_entry(["--vit_arch", "vit_base"], "PnP-ViT on ViT-B/16, the sampler after block 2.")

__all__ = ["detr_resnet50", "detr_resnet50_dc5", "detr_resnet101", "detr_resnet101_dc5", "pnp_detr_resnet50",
           "pnp_detr_resnet50_dc5", "pnp_detr_resnet101", "detr_resnet50_panoptic", "detr_resnet50_dc5_panoptic",
           "detr_resnet101_panoptic", "pnp_detr_resnet50_panoptic", "vit_deit_tiny", "vit_deit_small", "vit_base",
           "pnp_vit_deit_tiny", "pnp_vit_deit_small", "pnp_vit_base"]
