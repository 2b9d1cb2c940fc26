"""The poll-and-pool sampler: a hand-computed case, the reference algorithm, invariants."""
import math

import pytest
import torch
from torch import nn

from conftest import HostWaits
from models.pnp import PollAndPoolSampler, poll_counts


def _ln(v: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the last dimension, written out."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + 1e-5)


def _hand_sampler() -> PollAndPoolSampler:
    """C = 2, M = 1; score = sigmoid(channel 0); pool logit = LN(x)[0]; v_proj = identity."""
    sampler = PollAndPoolSampler(dim=2, num_coarse=1, score_pred_net="1layer-fc", kproj_net="1layer-fc")
    with torch.no_grad():
        sampler.score_pred_net.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        sampler.score_pred_net.bias.zero_()
        sampler.k_proj.weight.copy_(torch.tensor([[1.0, 0.0]]))
        sampler.k_proj.bias.zero_()
        sampler.v_proj.weight.copy_(torch.eye(2))
        sampler.v_proj.bias.zero_()
    return sampler


def test_hand_computed_2x3_map():
    # Channel 0 over the 2x3 grid (row-major positions 0..5); channel 1 is zero.
    channel0 = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -2.0])
    x = torch.stack([channel0, torch.zeros(6)]).view(1, 2, 2, 3)
    pos = torch.arange(12, dtype=torch.float32).view(1, 2, 2, 3)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    out = _hand_sampler()(x, mask, pos, ratio=0.5)

    # N = int(6 * 0.5) = 3: the three highest scores are at positions 2, 4, 0 (in that order).
    assert out.poll_index.tolist() == [[2, 4, 0]]
    assert out.num_polled.tolist() == [3]
    features = x.flatten(2).transpose(1, 2)[0]                     # (6, 2)
    scores = torch.sigmoid(channel0)
    expected_fine = _ln(features[[2, 4, 0]]) * scores[[2, 4, 0], None]
    torch.testing.assert_close(out.tokens[0, :3], expected_fine)
    # LN((a, 0)) = (1, -1) * |a| / 2 / sqrt(a^2 / 4 + eps) for a > 0: close to (1, -1).
    torch.testing.assert_close(out.tokens[0, 0], torch.tensor([1.0, -1.0]) * scores[2], atol=2e-5, rtol=0)

    # The pool sees positions 1, 3, 5 with logits LN(x)[0] ~ (-1, 0, -1).
    logits = _ln(features[[1, 3, 5]])[:, 0]
    weights = torch.softmax(logits, 0)
    e = math.exp(-1)
    torch.testing.assert_close(weights, torch.tensor([e, 1, e]) / (1 + 2 * e), atol=1e-4, rtol=0)
    expected_coarse = (weights[:, None] * _ln(features[[1, 3, 5]])).sum(0)
    torch.testing.assert_close(out.tokens[0, 3], expected_coarse)
    torch.testing.assert_close(out.tokens[0, 3], torch.tensor([-2 * e, 2 * e]) / (1 + 2 * e), atol=1e-4, rtol=0)
    pos_flat = pos.flatten(2).transpose(1, 2)[0]
    torch.testing.assert_close(out.pos[0, 3], (weights[:, None] * pos_flat[[1, 3, 5]]).sum(0))
    torch.testing.assert_close(out.pos[0, :3], pos_flat[[2, 4, 0]])
    full_weights = torch.zeros(6)
    full_weights[[1, 3, 5]] = weights
    torch.testing.assert_close(out.pool_weights[0, 0], full_weights)
    torch.testing.assert_close(out.sample_reg_loss, scores[[2, 4, 0]].mean())
    assert out.key_padding_mask.tolist() == [[False, False, False, False]]


def _reference_sampler(sampler: PollAndPoolSampler, x, mask, pos, ratio):
    """The reference algorithm step by step: full sort, gather of the rest, -inf masking,
    v_proj on every remaining position before pooling."""
    b, c, h, w = x.shape
    scores = sampler.score_pred_net(x).sigmoid().view(b, -1)
    ranked = scores.detach().clone()
    pad = mask.view(b, -1)
    ranked[pad] = -1.0
    lens = ((~pad).sum(1) * ratio).int()
    n_max, n_min = int(lens.max()), int(lens.min())
    order = ranked.sort(descending=True, dim=1)[1]
    top, rest = order[:, :n_max], order[:, n_min:]
    feats = sampler.norm_feature(x.flatten(2).permute(0, 2, 1))
    pos = pos.flatten(2).permute(0, 2, 1)

    def take(t, idx):
        return torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1]))

    fine = take(feats, top) * scores.gather(1, top)[..., None]
    fine_mask = torch.arange(n_max)[None] > (lens - 1)[:, None]
    rest_feats, rest_pos = take(feats, rest), take(pos, rest)
    rest_mask = (torch.arange(n_min, h * w)[None] < lens[:, None]) | pad.gather(1, rest)
    key_in = rest_feats + rest_pos if sampler.pos_embed_kproj else rest_feats
    logits = sampler.k_proj(key_in).masked_fill(rest_mask[..., None], float("-inf"))
    attn = logits.permute(0, 2, 1).softmax(-1)
    coarse = torch.bmm(attn, sampler.v_proj(rest_feats))
    coarse_pos = torch.bmm(attn, rest_pos)
    reg = scores.gather(1, top).mean()
    return fine, take(pos, top), fine_mask, coarse, coarse_pos, reg


@pytest.mark.parametrize("score_net,kproj,pos_kproj", [
    ("2layer-fc-256", "1layer-fc", False),
    ("2layer-fc-16", "2layer-fc", True),
    ("1layer-fc", "2layer-fc", False),
])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.65, 0.9])
def test_matches_reference_algorithm_with_padding(score_net, kproj, pos_kproj, ratio):
    torch.manual_seed(0)
    sampler = PollAndPoolSampler(dim=8, num_coarse=3, score_pred_net=score_net, kproj_net=kproj,
                                 pos_embed_kproj=pos_kproj)
    x = torch.randn(3, 8, 5, 6)
    pos = torch.randn(3, 8, 5, 6)
    mask = torch.zeros(3, 5, 6, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[2, :, 4:] = True
    mask[2, 4:, :] = True
    out = sampler(x, mask, pos, ratio)
    fine, fine_pos, fine_mask, coarse, coarse_pos, reg = _reference_sampler(sampler, x, mask, pos, ratio)
    n = fine.shape[1]
    assert out.num_fine == n
    assert torch.equal(out.key_padding_mask[:, :n], fine_mask)
    real = ~fine_mask   # slots past N_b may hold padded positions, whose order among ties is arbitrary
    torch.testing.assert_close(out.tokens[:, :n][real], fine[real])
    torch.testing.assert_close(out.pos[:, :n][real], fine_pos[real])
    torch.testing.assert_close(out.tokens[:, n:], coarse, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pos[:, n:], coarse_pos, atol=1e-5, rtol=1e-4)
    assert not out.key_padding_mask[:, n:].any()
    if n <= int((~mask).flatten(1).sum(1).min()):   # no padded position among the top N
        torch.testing.assert_close(out.sample_reg_loss, reg)
    torch.testing.assert_close(out.sample_reg_loss, out.scores.gather(1, out.poll_index).mean())


def test_token_counts_follow_each_images_valid_area():
    sampler = PollAndPoolSampler(dim=4, num_coarse=2)
    mask = torch.zeros(2, 6, 5, dtype=torch.bool)
    mask[1, :, 3:] = True                                  # image 1: 6 x 3 = 18 valid positions
    out = sampler(torch.randn(2, 4, 6, 5), mask, torch.randn(2, 4, 6, 5), ratio=0.5)
    assert out.num_polled.tolist() == [15, 9]
    assert out.tokens.shape == (2, 15 + 2, 4)
    assert out.key_padding_mask[0].sum() == 0
    assert out.key_padding_mask[1, :15].tolist() == [False] * 9 + [True] * 6
    real_slots = out.poll_index[1, :9]
    assert not mask[1].flatten()[real_slots].any(), "a padded position was polled"
    assert len(set(out.poll_index[0].tolist())) == 15


def _padded_batch():
    mask = torch.zeros(2, 6, 5, dtype=torch.bool)
    mask[1, 4:, :] = True
    mask[1, :, 3:] = True                                  # image 1: 4 x 3 = 12 valid positions
    return torch.randn(2, 4, 6, 5), mask, torch.randn(2, 4, 6, 5)


@pytest.mark.parametrize("ratio", [0.3, 0.65, 1.0])
def test_host_counts_give_the_tokens_the_mask_gives(ratio):
    torch.manual_seed(0)
    sampler = PollAndPoolSampler(dim=4, num_coarse=2)
    x, mask, pos = _padded_batch()
    counted = sampler(x, mask, pos, ratio)
    given = sampler(x, mask, pos, ratio, num_valid=torch.tensor([30, 12]))
    assert given.num_polled.tolist() == counted.num_polled.tolist() == poll_counts(torch.tensor([30, 12]), ratio).tolist()
    for name in ("tokens", "pos", "key_padding_mask", "poll_index", "pool_weights", "sample_reg_loss"):
        torch.testing.assert_close(getattr(given, name), getattr(counted, name), msg=name)


def test_host_counts_spare_the_sampler_any_wait_for_the_device():
    sampler = PollAndPoolSampler(dim=4, num_coarse=2).to("meta")   # meta stands in for a GPU: no values
    x, mask, pos = (t.to("meta") for t in _padded_batch())
    with HostWaits() as waits:
        out = sampler(x, mask, pos, 0.5, num_valid=torch.tensor([30, 12]))
    assert waits.found == []
    assert out.tokens.shape == (2, 15 + 2, 4) and out.num_polled.device.type == "meta"
    with pytest.raises(RuntimeError), HostWaits() as waits:   # counted from the mask, N is a device value
        sampler(x, mask, pos, 0.5)
    assert waits.found == ["aten._local_scalar_dense.default: reads a device value"]


def test_pool_weights_are_convex_over_the_rest():
    sampler = PollAndPoolSampler(dim=4, num_coarse=3)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 2:, :] = True
    out = sampler(torch.randn(2, 4, 4, 4), mask, torch.randn(2, 4, 4, 4), ratio=0.4)
    torch.testing.assert_close(out.pool_weights.sum(-1), torch.ones(2, 3))
    for b in range(2):
        polled = out.poll_index[b, : out.num_polled[b]]
        assert (out.pool_weights[b][:, polled] == 0).all()
        assert (out.pool_weights[b][:, mask[b].flatten()] == 0).all()


def test_ratio_one_polls_everything_and_pools_nothing():
    torch.manual_seed(0)
    sampler = PollAndPoolSampler(dim=4, num_coarse=2)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 2:] = True
    x = torch.randn(2, 4, 3, 4, requires_grad=True)
    out = sampler(x, mask, torch.randn(2, 4, 3, 4), ratio=1.0)
    assert out.num_polled.tolist() == [12, 6]
    assert out.key_padding_mask[:, 12:].all(), "an empty pool's coarse tokens must be masked"
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pos).all()
    assert (out.tokens[:, 12:] == 0).all() and (out.pool_weights == 0).all()
    out.tokens.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in sampler.parameters() if p.grad is not None)
    assert torch.isfinite(x.grad).all()


def test_poll_count_is_a_truncated_float32_product():
    assert poll_counts(torch.tensor([180]), 0.65).tolist() == [116]
    assert poll_counts(torch.tensor([10, 7, 1]), 1 / 3).tolist() == [3, 2, 0]
    assert poll_counts(torch.tensor([37]), 1.0).tolist() == [37]


@pytest.mark.parametrize("ratio", [0.0, -0.2, 1.01, float("nan")])
def test_invalid_ratio_is_rejected(ratio):
    sampler = PollAndPoolSampler(dim=4, num_coarse=2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sampler(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), torch.randn(1, 4, 2, 2), ratio)


def test_default_ratio_is_used_when_none_is_given():
    sampler = PollAndPoolSampler(dim=4, num_coarse=2, default_ratio=0.25)
    out = sampler(torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), torch.randn(1, 4, 4, 4))
    assert out.num_polled.tolist() == [4]


def test_scores_get_gradient_only_through_the_fine_tokens():
    torch.manual_seed(0)
    sampler = PollAndPoolSampler(dim=4, num_coarse=2)
    args = (torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.bool), torch.randn(1, 4, 3, 3))
    out = sampler(*args, ratio=0.5)
    n = out.num_fine
    out.tokens[:, :n].sum().backward()
    assert sampler.score_pred_net[0].weight.grad.abs().sum() > 0
    sampler.zero_grad()
    out = sampler(*args, ratio=0.5)
    out.tokens[:, n:].sum().backward()     # the coarse tokens do not depend on the scores
    assert sampler.score_pred_net[0].weight.grad is None or (sampler.score_pred_net[0].weight.grad == 0).all()


def test_pos_embed_kproj_changes_the_pool():
    torch.manual_seed(0)
    plain = PollAndPoolSampler(dim=4, num_coarse=2)
    with_pos = PollAndPoolSampler(dim=4, num_coarse=2, pos_embed_kproj=True)
    with_pos.load_state_dict(plain.state_dict())
    args = (torch.randn(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.bool), torch.randn(1, 4, 3, 3) * 3)
    a, b = plain(*args, ratio=0.3), with_pos(*args, ratio=0.3)
    torch.testing.assert_close(a.tokens[:, : a.num_fine], b.tokens[:, : b.num_fine])
    assert not torch.allclose(a.pool_weights, b.pool_weights)


@pytest.mark.parametrize("kind,keys", [
    ("2layer-fc-256", {"score_pred_net.0.weight": (6, 6, 1, 1), "score_pred_net.2.weight": (1, 6, 1, 1)}),
    ("2layer-fc-16", {"score_pred_net.0.weight": (16, 6, 1, 1), "score_pred_net.2.weight": (1, 16, 1, 1)}),
    ("1layer-fc", {"score_pred_net.weight": (1, 6, 1, 1)}),
])
def test_score_net_variants_have_the_reference_layout(kind, keys):
    state = PollAndPoolSampler(dim=6, num_coarse=5, score_pred_net=kind).state_dict()
    assert {k: tuple(state[k].shape) for k in keys} == keys
    assert tuple(state["k_proj.weight"].shape) == (5, 6)
    assert tuple(state["v_proj.weight"].shape) == (6, 6)


def test_two_layer_kproj_layout():
    state = PollAndPoolSampler(dim=6, num_coarse=5, kproj_net="2layer-fc").state_dict()
    assert tuple(state["k_proj.0.weight"].shape) == (6, 6)
    assert tuple(state["k_proj.2.weight"].shape) == (5, 6)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="--score_pred_net"):
        PollAndPoolSampler(dim=4, num_coarse=2, score_pred_net="3layer")
    with pytest.raises(ValueError, match="--kproj_net"):
        PollAndPoolSampler(dim=4, num_coarse=2, kproj_net="conv")


def test_layer_norm_has_no_affine_parameters():
    sampler = PollAndPoolSampler(dim=4, num_coarse=2)
    assert isinstance(sampler.norm_feature, nn.LayerNorm)
    assert not any(name.startswith("norm_feature") for name, _ in sampler.named_parameters())


def test_tokens_without_mask_or_pos_sample_as_the_unpadded_map():
    """(B, L, C) tokens with no mask and no pos (PnP-ViT) give the fine and coarse tokens of the
    same positions as a (B, C, H, W) map with nothing padded; ``pos`` is then None."""
    torch.manual_seed(0)
    sampler = PollAndPoolSampler(16, num_coarse=3)
    x = torch.randn(2, 16, 3, 4)
    from_map = sampler(x, torch.zeros(2, 3, 4, dtype=torch.bool), torch.randn(2, 16, 3, 4), ratio=0.5)
    from_tokens = sampler(x.flatten(2).transpose(1, 2), ratio=0.5)
    assert from_tokens.pos is None
    assert torch.equal(from_tokens.tokens, from_map.tokens)
    assert torch.equal(from_tokens.poll_index, from_map.poll_index)
    assert from_tokens.num_polled.tolist() == [6, 6]


def test_tokens_at_ratio_one_mask_the_empty_pool():
    sampler = PollAndPoolSampler(8, num_coarse=2)
    tokens = torch.randn(2, 10, 8, requires_grad=True)
    sampled = sampler(tokens, ratio=1.0)
    assert sampled.num_fine == 10
    assert sampled.key_padding_mask.tolist() == [[False] * 10 + [True] * 2] * 2
    assert torch.isfinite(sampled.tokens).all() and not sampled.tokens[:, 10:].any()
    sampled.tokens.sum().backward()
    assert torch.isfinite(tokens.grad).all()


def test_pos_embed_kproj_without_pos_is_refused():
    sampler = PollAndPoolSampler(8, num_coarse=2, pos_embed_kproj=True)
    with pytest.raises(ValueError, match="pos_embed_kproj"):
        sampler(torch.randn(1, 10, 8), ratio=0.5)


# ----------------------------------------------------------------------------- retrofit
def _retrofit_and_paper_samplers() -> tuple[PollAndPoolSampler, PollAndPoolSampler]:
    """A retrofit sampler and a paper sampler sharing the score net and ``k_proj``."""
    torch.manual_seed(0)
    paper = PollAndPoolSampler(dim=8, num_coarse=3)
    retrofit = PollAndPoolSampler(dim=8, num_coarse=3, retrofit=True)
    retrofit.load_state_dict({k: v for k, v in paper.state_dict().items() if not k.startswith("v_proj.")})
    return retrofit, paper


def _padded_map(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x and pos ``(2, 8, 3, 4)``; image 1 pads its last two columns."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 2:] = True
    return torch.randn(2, 8, 3, 4, generator=gen), mask, torch.randn(2, 8, 3, 4, generator=gen)


def test_retrofit_has_no_v_proj():
    assert not any(k.startswith("v_proj.") for k in PollAndPoolSampler(8, 3, retrofit=True).state_dict())


def test_retrofit_fine_tokens_are_the_polled_inputs_unchanged():
    retrofit, _ = _retrofit_and_paper_samplers()
    x, mask, pos = _padded_map()
    out = retrofit(x, mask, pos, ratio=0.5)
    tokens = x.flatten(2).transpose(1, 2)
    for b in range(2):
        polled = out.poll_index[b, : out.num_polled[b]]
        assert torch.equal(out.tokens[b, : len(polled)], tokens[b, polled])


def test_retrofit_fine_tokens_give_the_score_net_the_gradient_of_x_times_score():
    retrofit, _ = _retrofit_and_paper_samplers()
    x, mask, pos = _padded_map()
    weight = retrofit.score_pred_net[0].weight
    out = retrofit(x, mask, pos, ratio=0.5)
    fine = out.tokens[:, : out.num_fine]
    upstream = torch.randn(fine.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((fine * upstream).sum(), weight)
    out = retrofit(x, mask, pos, ratio=0.5)
    rows = torch.arange(2)[:, None]
    x_times_score = x.flatten(2).transpose(1, 2)[rows, out.poll_index] * out.scores.gather(1, out.poll_index)[..., None]
    (expected,) = torch.autograd.grad((x_times_score * upstream).sum(), weight)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected)


def test_retrofit_coarse_tokens_are_pool_weighted_inputs_of_the_papers_pool():
    retrofit, paper = _retrofit_and_paper_samplers()
    x, mask, pos = _padded_map()
    out, reference = retrofit(x, mask, pos, ratio=0.5), paper(x, mask, pos, ratio=0.5)
    n = out.num_fine
    assert torch.equal(out.poll_index, reference.poll_index)
    torch.testing.assert_close(out.pool_weights, reference.pool_weights)
    torch.testing.assert_close(out.tokens[:, n:], out.pool_weights @ x.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.pos, reference.pos)


def test_retrofit_ratio_one_masks_the_empty_pool_without_nan():
    retrofit, _ = _retrofit_and_paper_samplers()
    x, mask, pos = _padded_map()
    x.requires_grad_(True)
    out = retrofit(x, mask, pos, ratio=1.0)
    assert out.num_polled.tolist() == [12, 6]
    assert out.key_padding_mask[:, 12:].all() and not out.tokens[:, 12:].any()
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pos).all()
    out.tokens.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in retrofit.parameters() if p.grad is not None)
