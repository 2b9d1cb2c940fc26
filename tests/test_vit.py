"""PnP-ViT (models/vit.py): the sampler on ViT tokens, timm's state_dict layout, the criterion."""
from types import SimpleNamespace

import pytest
import timm
import torch

from models.vit import (VIT_ARCHS, ClassificationCriterion, PnPViT, build, build_vit, load_vit_weights,
                        vit_state_dict)
from util.errors import UserError


def vit_flags(**overrides) -> SimpleNamespace:
    """A tiny ViT: 32 px images, patches of 8 (L = 16), the demo width, the sampler after block 1."""
    values = dict(vit_arch="demo", num_classes=5, input_size=32, patch_size=8, no_pnp=False,
                  unsample_abstract_number=3, sample_topk_ratio=0.5, score_pred_net="2layer-fc-16",
                  kproj_net="1layer-fc", pnp_after_block=1, drop_path=0.0, sample_reg_loss=1e-4,
                  mixup=0.0, cutmix=0.0, smoothing=0.1, global_pool="token")
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def model() -> PnPViT:
    torch.manual_seed(0)
    return build_vit(vit_flags()).eval()


def _block_inputs(model: PnPViT, images: torch.Tensor, ratio: float) -> tuple[torch.Tensor, dict]:
    """The tokens entering the first block after the sampler, and the outputs."""
    seen = []
    handle = model.blocks[model.pnp_after_block].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        out = model(images, ratio)
    finally:
        handle.remove()
    return seen[0], out


@pytest.mark.parametrize("ratio,fine", [(1 / 3, 5), (0.5, 8), (0.8, 12)])
def test_sampler_counts_on_vit_tokens(model, ratio, fine):
    images = torch.rand(2, 3, 32, 32)
    tokens, out = _block_inputs(model, images, ratio)
    assert fine == int(16 * ratio)
    assert tokens.shape == (2, 1 + fine + 3, 128)  # [class, N fine, M coarse]
    assert out["sampled"].num_fine == fine and out["sampled"].pos is None
    assert not out["sampled"].key_padding_mask.any()  # same-size images: no padding
    assert out["logits"].shape == (2, 5)


def test_class_token_bypasses_the_sampler(model):
    images = torch.rand(2, 3, 32, 32)
    features = model.extract_features(images)
    tokens, _ = _block_inputs(model, images, 0.5)
    assert torch.equal(tokens[:, 0], features[:, 0])
    assert model.sampler(features[:, 1:], ratio=0.5).scores.shape == (2, 16)  # only the 16 patches are scored


def test_ratio_one_drops_the_empty_pool_without_nan(model):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    model.train()
    tokens, out = _block_inputs(model, images, 1.0)
    assert tokens.shape == (2, 1 + 16, 128)
    assert torch.isfinite(out["logits"]).all()
    out["logits"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(images.grad).all()


@pytest.mark.parametrize("retrofit", [False, True])
def test_gradients_reach_the_score_net(retrofit):
    torch.manual_seed(0)
    model = build_vit(vit_flags(retrofit=retrofit)).train()
    out = model(torch.rand(2, 3, 32, 32), 0.5)
    ClassificationCriterion({"loss_ce": 1.0})(out, torch.tensor([0, 3]))["loss_ce"].backward()
    for p in model.sampler.score_pred_net.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_blocks_before_the_sampler_run_in_extract_features_only(model):
    calls = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, index=index: calls.append(index))
    features = model.extract_features(torch.rand(2, 3, 32, 32))
    assert calls == list(range(model.pnp_after_block))
    calls.clear()
    for ratio in (1 / 3, 0.8):  # each ratio runs only the blocks after the sampler, on the shared features
        model.predict(features, ratio)
    assert calls == 2 * list(range(model.pnp_after_block, len(model.blocks)))


def test_no_pnp_builds_the_plain_vit():
    model = build_vit(vit_flags(no_pnp=True))
    assert not model.uses_pnp and not any(k.startswith("sampler.") for k in model.state_dict())
    out = model(torch.rand(1, 3, 32, 32))
    assert out["sampled"] is None and "sample_reg_loss" not in out


def test_timm_state_dict_loads_strictly_and_computes_the_same():
    """A timm DeiT-Tiny (random weights, built here) loads key for key; without its sampler the
    model is timm's ViT, and with one only the sampler's keys start fresh."""
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    flags = vit_flags(vit_arch="deit_tiny", input_size=224, patch_size=16, num_classes=10, pnp_after_block=4)
    model = build_vit(flags).eval()
    assert set(model.state_dict()) - set(reference.state_dict()) == {k for k in model.state_dict()
                                                                     if k.startswith("sampler.")}
    notes = load_vit_weights(model, reference.state_dict(), "deit_tiny.pth")
    assert len(notes) == 1 and "sampler starts fresh" in notes[0]
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    images = torch.rand(1, 3, 224, 224)
    plain = build_vit(SimpleNamespace(**{**vars(flags), "no_pnp": True})).eval()
    load_vit_weights(plain, reference.state_dict(), "deit_tiny.pth")
    with torch.no_grad():
        assert torch.allclose(plain(images)["logits"], reference(images), atol=1e-5)


def test_retrofit_pnp_vit_on_a_timm_deit_is_that_deit_at_ratio_one():
    """DeiT-Tiny's shape at 96 px (36 patches); the sampler after block 4 polls every patch at r = 1."""
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=96).eval()
    flags = vit_flags(vit_arch="deit_tiny", input_size=96, patch_size=16, num_classes=10, pnp_after_block=4,
                      retrofit=True)
    model = build_vit(flags).eval()
    load_vit_weights(model, reference.state_dict(), "deit_tiny.pth")
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        out = model(images, 1.0)
        expected = reference(images)
    assert not torch.equal(out["sampled"].poll_index, torch.arange(36).expand(2, -1)), "the poll must permute"
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)


def test_flags_stored_before_retrofit_build_the_papers_sampler():
    assert not hasattr(vit_flags(), "retrofit")
    assert not build_vit(vit_flags()).sampler.retrofit
    assert build_vit(vit_flags(retrofit=True)).sampler.retrofit


def test_foreign_keys_head_and_grid_of_a_timm_state_dict():
    torch.manual_seed(0)
    model = build_vit(vit_flags())
    theirs = {k: v.clone() for k, v in build_vit(vit_flags(no_pnp=True, num_classes=7, input_size=48)).state_dict().items()}
    notes = load_vit_weights(model, theirs, "other.pth")
    assert any("pos_embed resampled from 36 to 16" in n for n in notes)
    assert any("head has 7 logits" in n for n in notes)
    theirs["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="unexpected blocks.9.attn.qkv.weight"):
        load_vit_weights(model, theirs, "other.pth")


def test_vit_weights_errors_name_the_flag(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--vit_weights timm: --vit_arch demo has no published weights"):
        vit_state_dict("timm", "demo")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="downloading deit_small_patch16_224.fb_in1k failed .*--vit_weights none"):
        vit_state_dict("timm", "deit_small")
    with pytest.raises(UserError, match="--vit_weights: .*missing.pth does not exist"):
        vit_state_dict(str(tmp_path / "missing.pth"), "deit_small")
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 4)}}, tmp_path / "deit.pth")
    assert set(vit_state_dict(str(tmp_path / "deit.pth"), "deit_small")) == {"cls_token"}


def test_bad_shapes_are_named():
    with pytest.raises(UserError, match="--pnp_after_block must lie in 0..5"):
        build_vit(vit_flags(pnp_after_block=6))
    with pytest.raises(UserError, match="--input_size 30 must be a multiple of --patch_size 8"):
        build_vit(vit_flags(input_size=30))
    assert {"deit_tiny", "deit_small", "vit_base"} <= set(VIT_ARCHS)


def test_criterion_with_labels_soft_targets_and_regulariser():
    model, criterion, postprocessors = build(vit_flags())
    assert criterion.weight_dict == {"loss_ce": 1.0, "sample_reg_loss": 1e-4} and postprocessors == {}
    logits = torch.tensor([[4.0, 0, 0, 0, 0], [0, 0, 4.0, 0, 0]])
    outputs = {"logits": logits, "sample_reg_loss": torch.tensor(0.5)}
    losses = criterion(outputs, torch.tensor([0, 1]))
    assert losses["class_error"] == 50 and losses["sample_reg_loss"] == 0.5
    soft = torch.nn.functional.one_hot(torch.tensor([0, 2]), 5).float()
    hard = ClassificationCriterion({"loss_ce": 1.0})(outputs, torch.tensor([0, 2]))
    assert torch.allclose(criterion(outputs, soft)["loss_ce"], hard["loss_ce"])  # soft targets: no extra smoothing
    assert losses["loss_ce"] > hard["loss_ce"]  # label smoothing 0.1 on the hard labels


def test_avg_pool_reads_the_mean_of_the_fine_and_coarse_tokens():
    torch.manual_seed(0)
    model = build_vit(vit_flags(global_pool="avg")).eval()
    seen = []
    handle = model.norm.register_forward_hook(lambda _, args, out: seen.append(out))
    logits = model(torch.rand(2, 3, 32, 32), 0.5)["logits"]
    handle.remove()
    assert seen[0].shape == (2, 1 + 8 + 3, 128)
    assert torch.allclose(logits, model.head(seen[0][:, 1:].mean(1)))
    with pytest.raises(UserError, match="--global_pool"):
        build_vit(vit_flags(global_pool="max"))
