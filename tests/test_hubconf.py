"""torch.hub entry points (hubconf.py), loaded as users load them: torch.hub.load(repo, name, source='local')."""
import os
import subprocess
import sys

import pytest
import torch

from models.detr import DETR, PostProcess
from models.segmentation import DETRsegm, PostProcessPanoptic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = ["detr_resnet50", "detr_resnet50_dc5", "detr_resnet101", "detr_resnet101_dc5", "pnp_detr_resnet50",
           "pnp_detr_resnet50_dc5", "pnp_detr_resnet101", "detr_resnet50_panoptic", "detr_resnet50_dc5_panoptic",
           "detr_resnet101_panoptic", "pnp_detr_resnet50_panoptic"]
VIT_ENTRIES = ["vit_deit_tiny", "vit_deit_small", "vit_base", "pnp_vit_deit_tiny", "pnp_vit_deit_small", "pnp_vit_base"]
# What a hub user need not have: dataset, evaluation, training and export packages, timm (PnP-ViT), and the
# project's modules that import them.
NOT_NEEDED = ("pycocotools", "hotcoco", "faster_coco_eval", "panopticapi", "yaml", "matplotlib", "tensorboard",
              "submitit", "onnx", "onnxruntime", "onnxscript", "timm", "datasets", "engine", "main", "predict")


def test_every_entry_point_is_exported_and_documented():
    import hubconf

    assert sorted(hubconf.__all__) == sorted(ENTRIES + VIT_ENTRIES)
    assert all(callable(getattr(hubconf, name)) and getattr(hubconf, name).__doc__ for name in ENTRIES + VIT_ENTRIES)


def test_pnp_vit_entry_is_the_vit_at_ratio_one_with_the_same_weights():
    torch.manual_seed(0)
    vit = torch.hub.load(REPO, "vit_deit_tiny", source="local", num_classes=10).eval()
    pnp = torch.hub.load(REPO, "pnp_vit_deit_tiny", source="local", num_classes=10).eval()
    assert pnp.uses_pnp and not vit.uses_pnp
    pnp.load_state_dict(vit.state_dict(), strict=False)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        plain, polled = vit(images)["logits"], pnp(images, 1.0)["logits"]
    assert plain.shape == (2, 10)
    assert torch.allclose(plain, polled, atol=1e-5)


def test_pnp_detr_loads_with_its_postprocessor():
    model, postprocessor = torch.hub.load(REPO, "pnp_detr_resnet50", source="local", return_postprocessor=True)
    assert isinstance(model, DETR) and model.uses_pnp and isinstance(postprocessor, PostProcess)
    assert model.class_embed.out_features == 92


@pytest.mark.parametrize("name,pnp", [("detr_resnet50_panoptic", False), ("pnp_detr_resnet50_panoptic", True)])
def test_panoptic_entries_predict_masks(name, pnp):
    model, postprocessor = torch.hub.load(REPO, name, source="local", return_postprocessor=True)
    assert isinstance(model, DETRsegm) and model.uses_pnp == pnp and isinstance(postprocessor, PostProcessPanoptic)
    assert model.detr.class_embed.out_features == 251
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 96))
    assert out["pred_masks"].shape == (1, 100, 16, 24)


def test_entry_points_build_and_run_without_dataset_or_evaluation_packages():
    """As in a hub user's environment: in the subprocess every package of ``NOT_NEEDED`` is
    absent (a None entry in sys.modules: ``import`` raises ModuleNotFoundError and
    ``importlib.util.find_spec`` finds nothing, as for a package that is not installed)."""
    script = f"""
import sys
for name in {NOT_NEEDED!r}:
    sys.modules[name] = None
import torch
import hubconf

with torch.no_grad():
    model, postprocessor = hubconf.pnp_detr_resnet50(return_postprocessor=True)
    boxes = postprocessor(model.eval()(torch.rand(1, 3, 64, 96)), torch.tensor([[64, 96]]))[0]["boxes"]
    masks = hubconf.detr_resnet50_panoptic().eval()(torch.rand(1, 3, 64, 96))["pred_masks"]
print(tuple(boxes.shape), tuple(masks.shape))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "(100, 4) (1, 100, 16, 24)"


def test_detrs_hub_recipe_builds_a_working_detector():
    """DETR's hubconf builds its models from these public names and signatures."""
    from models.backbone import Backbone, Joiner
    from models.detr import DETR, PostProcess
    from models.position_encoding import PositionEmbeddingSine
    from models.segmentation import DETRsegm
    from models.transformer import Transformer

    hidden_dim = 32
    backbone = Backbone("resnet18", train_backbone=True, return_interm_layers=True, dilation=False)
    joiner = Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2, normalize=True))
    joiner.num_channels = backbone.num_channels
    transformer = Transformer(d_model=hidden_dim, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=64, return_intermediate_dec=True)
    model = DETRsegm(DETR(joiner, transformer, num_classes=5, num_queries=7)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert out["pred_logits"].shape == (1, 7, 6) and out["pred_masks"].shape == (1, 7, 16, 24)
    assert PostProcess()(out, torch.tensor([[64, 96]]))[0]["boxes"].shape == (7, 4)
