"""torch.hub entry points (hubconf.py), loaded as users load them: torch.hub.load(repo, name, source='local')."""
import os

import pytest
import torch

from models.detr import DETR, PostProcess
from models.segmentation import DETRsegm, PostProcessPanoptic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = ["detr_resnet50", "detr_resnet50_dc5", "detr_resnet101", "pnp_detr_resnet50", "pnp_detr_resnet50_dc5",
           "pnp_detr_resnet101", "detr_resnet50_panoptic", "pnp_detr_resnet50_panoptic"]


def test_every_entry_point_is_exported_and_documented():
    import hubconf

    assert sorted(hubconf.__all__) == sorted(ENTRIES)
    assert all(callable(getattr(hubconf, name)) and getattr(hubconf, name).__doc__ for name in ENTRIES)


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
