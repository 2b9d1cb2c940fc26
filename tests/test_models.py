"""models.fast_path: the layout every entry point runs the models in (models/__init__.py)."""
import copy

import torch
from torch import nn

import main
from models import build_model, fast_path
from models.backbone import FrozenBatchNorm2d


def _pnp_detr():
    """A tiny PnP-DETR with FrozenBatchNorm (as with pretrained weights) and non-trivial statistics."""
    args = main.parse_args(["--backbone", "resnet18", "--backbone_weights", "imagenet", "--num_classes", "5",
                            "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
                            "--dim_feedforward", "64", "--num_queries", "7", "--unsample_abstract_number", "4",
                            "--device", "cpu"])
    torch.manual_seed(0)
    model = build_model(args)[0].eval()
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    return model


def test_fast_path_computes_the_same_with_the_same_state_dict():
    plain = _pnp_detr()
    fast = fast_path(copy.deepcopy(plain))
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        expected, out = plain(images, 0.5), fast(images, 0.5)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key], expected[key], rtol=1e-4, atol=1e-5)
    plain_state, fast_state = plain.state_dict(), fast.state_dict()
    assert list(fast_state) == list(plain_state)
    assert all(torch.equal(fast_state[k], v) for k, v in plain_state.items())
    assert "backbone.0.body.layer1.0.bn1.running_var" in fast_state


def test_fast_path_puts_every_convolution_channels_last_unless_told_not_to():
    fast, kept = fast_path(_pnp_detr()), fast_path(_pnp_detr(), channels_last=False)
    convolutions = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    assert all(m.weight.is_contiguous() for m in kept.modules() if isinstance(m, nn.Conv2d))


def test_fast_path_gradients_have_their_parameters_strides():
    """DDP checks every gradient's strides against its parameter's (its bucket view); a mismatch
    warns on every run and costs a copy."""
    model = fast_path(_pnp_detr().train())
    out = model(torch.rand(2, 3, 64, 96), 0.5)
    (out["pred_logits"].sum() + out["pred_boxes"].sum() + out["sample_reg_loss"]).backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.grad is not None]
    assert any(name.startswith("transformer.sampler.score_pred_net") for name, _ in trained)
    assert [name for name, p in trained if p.grad.stride() != p.stride()] == []
