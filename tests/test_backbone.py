"""ResNet backbone, Joiner and backbone weight loading (models/backbone.py)."""
import urllib.error
import urllib.request

import pytest
import torch
import torch.hub
import torchvision
from torch import nn
from torchvision.models import _api as tv_api
from torchvision.ops import FrozenBatchNorm2d

import main
from models.backbone import Backbone, Joiner, build_backbone, load_backbone_weights, unpadded_positions
from util.errors import UserError
from util.misc import NestedTensor, nested_tensor_from_tensor_list



def tiny_args(*extra: str):
    return main.parse_args(["--backbone", "resnet18", "--backbone_weights", "none", "--num_classes", "5",
                            "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
                            "--dim_feedforward", "64", "--num_queries", "7", "--unsample_abstract_number", "4",
                            "--device", "cpu", *extra])


def _batch(size=64, batch=1):
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size)
    return NestedTensor(x, torch.zeros(batch, size, size, dtype=torch.bool))


@pytest.fixture(scope="module")
def resnet18_frozen():
    torch.manual_seed(0)
    return Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False,
                    frozen_bn=True).eval()


@pytest.mark.parametrize("last_stage,channels,stride", [(4, 512, 32), (3, 256, 16)])
def test_resnet18_output_stride_and_channels(last_stage, channels, stride):
    backbone = Backbone("resnet18", True, False, False, frozen_bn=True, last_stage=last_stage).eval()
    assert backbone.num_channels == channels
    assert backbone.strides[-1] == stride
    with torch.no_grad():
        out = backbone(_batch(64))
    assert list(out) == [str(last_stage - 1)]
    feature = out[str(last_stage - 1)]
    assert feature.tensors.shape == (1, channels, 64 // stride, 64 // stride)
    assert feature.mask.shape == (1, 64 // stride, 64 // stride)
    assert f"layer{last_stage}" in backbone.body and f"layer{last_stage + 1}" not in backbone.body


def test_resnet50_dilation_gives_stride_16():
    backbone = Backbone("resnet50", True, False, dilation=True, frozen_bn=True).eval()
    assert backbone.num_channels == 2048
    assert backbone.strides[-1] == 16
    with torch.no_grad():
        feature = backbone(_batch(32))["3"]
    assert feature.tensors.shape == (1, 2048, 2, 2)
    # Stage 4 no longer strides; torchvision dilates its blocks after the first.
    assert backbone.body["layer4"][0].conv2.stride == (1, 1)
    assert backbone.body["layer4"][1].conv2.dilation == (2, 2)


def test_interm_layers_return_all_stages_with_masks():
    backbone = Backbone("resnet18", True, return_interm_layers=True, dilation=False, frozen_bn=True).eval()
    with torch.no_grad():
        out = backbone(_batch(64))
    assert list(out) == ["0", "1", "2", "3"]
    assert [v.tensors.shape[-1] for v in out.values()] == [16, 8, 4, 2]
    assert [v.tensors.shape[1] for v in out.values()] == [64, 128, 256, 512]
    assert [v.mask.shape[-1] for v in out.values()] == [16, 8, 4, 2]


def test_mask_is_downsampled_with_the_features(resnet18_frozen):
    # Image 0 is 64x64 (no padding), image 1 is 64 high and 32 wide: its right half is padding.
    torch.manual_seed(0)
    nested = nested_tensor_from_tensor_list([torch.rand(3, 64, 64), torch.rand(3, 64, 32)])
    with torch.no_grad():
        feature = resnet18_frozen(nested)["3"]
    assert feature.tensors.shape == (2, 512, 2, 2)
    expected = torch.tensor([[[False, False], [False, False]], [[False, True], [False, True]]])
    assert feature.mask.dtype == torch.bool
    assert torch.equal(feature.mask, expected)


@pytest.mark.parametrize("sizes", [[(64, 64), (64, 32)], [(97, 61), (33, 130), (70, 70)], [(45, 45)]])
def test_unpadded_positions_count_what_the_resized_masks_leave_unpadded(sizes):
    backbone = Backbone("resnet18", True, return_interm_layers=True, dilation=False, frozen_bn=True).eval()
    nested = nested_tensor_from_tensor_list([torch.rand(3, h, w) for h, w in sizes])
    with torch.no_grad():
        stages = backbone(nested).values()
    for stage in stages:                                    # strides 4, 8, 16 and 32
        counted = unpadded_positions(nested.image_sizes, nested.tensors.shape[-2:], stage.mask.shape[-2:])
        assert counted.device.type == "cpu"
        assert counted.tolist() == (~stage.mask).flatten(1).sum(1).tolist()


def test_dilation_on_resnet18_is_a_user_error():
    with pytest.raises(UserError, match="--dilation"):
        build_backbone(tiny_args("--dilation"))


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="--backbone"):
        Backbone("vgg16", True, False, False)


def test_building_never_downloads(monkeypatch):
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise AssertionError("building a backbone tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    # The default --backbone_weights is 'imagenet': building must still not fetch it.
    args = tiny_args("--backbone", "resnet50", "--backbone_weights", "imagenet")
    joiner = build_backbone(args)
    assert calls == []
    assert joiner.num_channels == 2048


def test_frozen_bn_trains_stages_2_to_4_only(resnet18_frozen):
    modules = list(resnet18_frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    params = dict(resnet18_frozen.named_parameters())
    frozen = [n for n, p in params.items() if not p.requires_grad]
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert "body.conv1.weight" in frozen
    assert all(n.startswith(("body.conv1", "body.layer1")) for n in frozen)
    assert any(n.startswith("body.layer1") for n in frozen)
    assert all(n.startswith(("body.layer2", "body.layer3", "body.layer4")) for n in trainable)
    assert {n.split(".")[1] for n in trainable} == {"layer2", "layer3", "layer4"}


def test_trainable_bn_trains_every_stage():
    backbone = Backbone("resnet18", True, False, False, frozen_bn=False)
    modules = list(backbone.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    params = dict(backbone.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert "body.bn1.weight" in params and "body.layer1.0.bn1.weight" in params


def test_build_backbone_picks_norm_from_backbone_weights():
    scratch = build_backbone(tiny_args("--backbone_weights", "none"))
    pretrained = build_backbone(tiny_args("--backbone_weights", "imagenet"))
    assert isinstance(scratch[0].body["bn1"], nn.BatchNorm2d)
    assert isinstance(pretrained[0].body["bn1"], FrozenBatchNorm2d)


def test_lr_backbone_zero_freezes_everything():
    joiner = build_backbone(tiny_args("--lr_backbone", "0"))
    assert not any(p.requires_grad for p in joiner.parameters())


def test_joiner_state_dict_uses_torchvision_names():
    joiner = build_backbone(tiny_args("--backbone_weights", "imagenet"))  # FrozenBN, as in DETR checkpoints
    keys = list(joiner.state_dict())
    assert keys[0] == "0.body.conv1.weight"
    assert all(k.startswith("0.body.") for k in keys)
    assert "0.body.layer1.0.conv1.weight" in keys
    assert "0.body.bn1.running_var" in keys
    reference = {k for k in torchvision.models.resnet18(weights=None).state_dict()
                 if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert {k[len("0.body."):] for k in keys} == reference


def test_joiner_learned_position_keys():
    joiner = build_backbone(tiny_args("--position_embedding", "learned"))
    sd = joiner.state_dict()
    assert sd["1.row_embed.weight"].shape == (50, 16)
    assert sd["1.col_embed.weight"].shape == (50, 16)


def test_joiner_returns_features_and_positions():
    joiner = build_backbone(tiny_args()).eval()
    with torch.no_grad():
        features, pos = joiner(_batch(64, batch=2))
    assert isinstance(joiner, Joiner)
    assert len(features) == 1 and len(pos) == 1
    assert features[0].tensors.shape == (2, 512, 2, 2)
    assert pos[0].shape == (2, 32, 2, 2)


def _saved_resnet18(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        reference.bn1.running_mean.uniform_(-1, 1)   # a non-default buffer, to see buffers load
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_load_backbone_weights_from_path(tmp_path):
    reference, path = _saved_resnet18(tmp_path)
    torch.manual_seed(4)
    backbone = Backbone("resnet18", True, False, False, frozen_bn=True)
    assert not torch.equal(backbone.body["layer3"][0].conv1.weight, reference.layer3[0].conv1.weight)
    load_backbone_weights(backbone, str(path))
    torch.testing.assert_close(backbone.body["layer3"][0].conv1.weight, reference.layer3[0].conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(backbone.body["bn1"].running_mean, reference.bn1.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(backbone.body["layer4"][1].bn2.weight, reference.layer4[1].bn2.weight, rtol=0, atol=0)


def test_load_backbone_weights_into_trainable_bn(tmp_path):
    reference, path = _saved_resnet18(tmp_path)
    backbone = Backbone("resnet18", True, False, False, frozen_bn=False)
    load_backbone_weights(backbone, str(path))
    torch.testing.assert_close(backbone.body["conv1"].weight, reference.conv1.weight, rtol=0, atol=0)


def test_load_backbone_weights_none_changes_nothing():
    backbone = Backbone("resnet18", True, False, False, frozen_bn=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    load_backbone_weights(backbone, "none")
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_backbone_weights_missing_path(tmp_path):
    backbone = Backbone("resnet18", True, False, False)
    with pytest.raises(UserError, match="--backbone_weights") as info:
        load_backbone_weights(backbone, str(tmp_path / "nope.pth"))
    assert "nope.pth" in str(info.value)


def test_load_backbone_weights_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="--backbone_weights"):
        load_backbone_weights(Backbone("resnet18", True, False, False), str(path))


def test_load_backbone_weights_incomplete_state_dict(tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(UserError, match="lacks"):
        load_backbone_weights(Backbone("resnet18", True, False, False), str(path))


def test_load_backbone_weights_imagenet_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UserError, match="--backbone_weights none"):
        load_backbone_weights(Backbone("resnet18", True, False, False), "imagenet")


def test_load_backbone_weights_of_another_depth_is_a_user_error(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="--backbone_weights.*another ResNet depth"):
        load_backbone_weights(Backbone("resnet18", True, False, False), str(path))


def test_detrs_test_all_imports_and_backbone_signatures_work():
    """DETR's test_all.py imports these names; its Backbone and BackboneBase take positional args."""
    from hubconf import detr_resnet50, detr_resnet50_panoptic  # noqa: F401
    from models.backbone import Backbone, BackboneBase, Joiner
    from models.matcher import HungarianMatcher  # noqa: F401
    from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine  # noqa: F401
    from util import box_ops  # noqa: F401

    backbone = Backbone("resnet18", True, False, False)  # name, train_backbone, return_interm_layers, dilation
    assert isinstance(backbone, BackboneBase) and backbone.num_channels == 512

    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    base = BackboneBase(resnet, True, 512, True)  # backbone, train_backbone, num_channels, return_interm_layers
    trained = {name.split(".")[0] for name, p in base.body.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}  # as DETR: the stem and stage 1 stay frozen
    assert not any(p.requires_grad for p in BackboneBase(resnet, False, 512, False).parameters())

    samples = nested_tensor_from_tensor_list([torch.rand(3, 64, 64), torch.rand(3, 64, 96)])
    out = base(samples)
    assert list(out) == ["0", "1", "2", "3"]
    assert [o.tensors.shape[1] for o in out.values()] == [64, 128, 256, 512]
    assert out["3"].mask.shape == (2, 2, 3) and out["3"].mask[0, :, 2].all() and not out["3"].mask[1].any()
    features, pos = Joiner(base, PositionEmbeddingSine(16, normalize=True))(samples)
    assert len(features) == len(pos) == 4 and pos[-1].shape == (2, 32, 2, 3)


def _random_statistics(module: nn.Module) -> None:
    """Non-trivial frozen statistics, as pretrained weights have."""
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if not isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            continue
        with torch.no_grad():
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) / 10)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) / 10)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def test_fast_frozen_batch_norm_computes_torchvisions_in_training_too():
    from models.backbone import FrozenBatchNorm2d as FastFrozenBatchNorm2d

    fast, plain = FastFrozenBatchNorm2d(16), FrozenBatchNorm2d(16)
    _random_statistics(fast)
    plain.load_state_dict(fast.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    for training in (False, True):
        fast.train(training)
        x = torch.randn(2, 16, 5, 7, requires_grad=True)
        x_plain = x.detach().clone().requires_grad_()
        out, expected = fast(x), plain(x_plain)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-5, atol=1e-6)
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    fast(torch.randn(2, 16, 3, 3))  # training mode: nothing is updated
    assert all(torch.equal(before[k], v) for k, v in fast.state_dict().items())


def test_fast_frozen_batch_norm_loads_checkpoints_with_or_without_the_counter():
    from models.backbone import FrozenBatchNorm2d as FastFrozenBatchNorm2d

    trained = nn.BatchNorm2d(8)
    _random_statistics(trained)
    frozen = FastFrozenBatchNorm2d(8)
    frozen.load_state_dict(trained.state_dict())  # holds num_batches_tracked, as scratch checkpoints
    assert all(torch.equal(getattr(frozen, k), getattr(trained, k))
               for k in ("weight", "bias", "running_mean", "running_var"))
    assert "num_batches_tracked" not in frozen.state_dict()


def test_the_backbone_runs_the_fast_frozen_batch_norm(resnet18_frozen):
    from models.backbone import FrozenBatchNorm2d as FastFrozenBatchNorm2d

    norms = [m for m in resnet18_frozen.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(type(m) is FastFrozenBatchNorm2d for m in norms)


@pytest.mark.parametrize("conv_bias,channels_last", [(False, False), (True, False), (False, True)])
def test_conv_frozen_bn_is_the_convolution_then_the_norm(conv_bias, channels_last):
    from models.backbone import FrozenBatchNorm2d as FastFrozenBatchNorm2d, conv_frozen_bn

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(6, 8, 3, padding=2, dilation=2, bias=conv_bias), FastFrozenBatchNorm2d(8)
    _random_statistics(bn)
    x = torch.randn(2, 6, 9, 11)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, expected = conv_frozen_bn(x, conv, bn), bn(conv(x_ref))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    weight_grad = torch.autograd.grad(out, (x, conv.weight), grad)
    expected_grad = torch.autograd.grad(expected, (x_ref, conv.weight), grad)
    for got, want in zip(weight_grad, expected_grad):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_conv_frozen_bn_runs_any_other_norm_as_a_module():
    from models.backbone import conv_frozen_bn

    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4).train()
    conv_frozen_bn(torch.randn(2, 3, 5, 5), conv, bn)
    assert int(bn.num_batches_tracked) == 1  # the module ran, in training mode, and updated its statistics
    torchvision_frozen = FrozenBatchNorm2d(4)
    _random_statistics(torchvision_frozen)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(conv_frozen_bn(x, conv, torchvision_frozen), torchvision_frozen(conv(x)))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_backbone_computes_the_blocks_own_forward(name):
    torch.manual_seed(0)
    backbone = Backbone(name, True, return_interm_layers=True, dilation=name == "resnet50", frozen_bn=True).eval()
    _random_statistics(backbone)
    body = backbone.body
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = body(x)
        y = body["maxpool"](body["relu"](body["bn1"](body["conv1"](x))))
        for stage in range(1, 5):
            y = body[f"layer{stage}"](y)  # torchvision's own block forward: conv, then norm
            # float rounding only: random weights make the activations grow to ~1e3 by stage 4
            assert (out[str(stage - 1)] - y).abs().max() <= 1e-5 * y.abs().max()
