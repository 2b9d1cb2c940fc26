"""Hungarian matching (models/matcher.py)."""
import argparse

import pytest
import torch

from models.matcher import HungarianMatcher, build_matcher

NUM_CLASSES = 5


def _outputs(batch, queries, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(batch, queries, NUM_CLASSES + 1, generator=gen),
            "pred_boxes": torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.1}


def _targets(counts, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
             "boxes": torch.rand(n, 4, generator=gen) * 0.5 + 0.1} for n in counts]


def _box(cx, cy=0.5, w=0.2, h=0.2):
    return [cx, cy, w, h]


def test_batched_matching_equals_per_image_matching():
    matcher = HungarianMatcher(1, 5, 2)
    outputs, targets = _outputs(3, 6), _targets([2, 5, 3])
    batched = matcher(outputs, targets)
    assert len(batched) == 3
    for b in range(3):
        alone = matcher({k: v[b:b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert torch.equal(batched[b][0], alone[0]) and torch.equal(batched[b][1], alone[1])


def test_index_lengths_dtype_and_uniqueness():
    matcher = HungarianMatcher(1, 5, 2)
    queries = 4
    indices = matcher(_outputs(3, queries), _targets([2, 7, 4]))
    for (rows, cols), n in zip(indices, [2, 7, 4]):
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(queries, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert rows.max() < queries and cols.max() < n


def test_one_image_without_targets():
    matcher = HungarianMatcher(1, 5, 2)
    outputs, targets = _outputs(2, 5), _targets([0, 3])
    indices = matcher(outputs, targets)
    assert len(indices[0][0]) == 0 and len(indices[0][1]) == 0
    assert indices[0][0].dtype == torch.int64
    assert len(indices[1][0]) == 3
    alone = matcher({k: v[1:] for k, v in outputs.items()}, [targets[1]])[0]
    assert torch.equal(indices[1][0], alone[0]) and torch.equal(indices[1][1], alone[1])


def test_no_image_has_targets():
    matcher = HungarianMatcher(1, 5, 2)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    indices = matcher(_outputs(2, 5), targets)
    assert len(indices) == 2
    for rows, cols in indices:
        assert rows.shape == (0,) and cols.shape == (0,)
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64


def test_known_optimum_where_greedy_fails():
    # L1 cost only. Targets at cx 0.5 and 0.6; queries at cx 0.58, 0.62 and 0.1.
    # Costs (row = query): [[.08, .02], [.12, .02], [.40, .50]].
    # Greedy by query takes q0->t1 then q1->t0 (0.14); the optimum is q0->t0, q1->t1 (0.10).
    matcher = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0)
    outputs = {"pred_logits": torch.zeros(1, 3, NUM_CLASSES + 1),
               "pred_boxes": torch.tensor([[_box(0.58), _box(0.62), _box(0.1)]])}
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([_box(0.5), _box(0.6)])}]
    rows, cols = matcher(outputs, targets)[0]
    assert rows.tolist() == [0, 1]
    assert cols.tolist() == [0, 1]


def test_exact_boxes_are_matched_to_their_targets():
    matcher = HungarianMatcher(1, 5, 2)
    boxes = torch.tensor([_box(0.2, 0.3), _box(0.7, 0.6, 0.3, 0.1), _box(0.4, 0.8, 0.1, 0.2)])
    targets = [{"labels": torch.tensor([3, 0]), "boxes": boxes[[2, 0]]}]
    logits = torch.full((1, 3, NUM_CLASSES + 1), -5.0)
    logits[0, 2, 3] = 5.0
    logits[0, 0, 0] = 5.0
    rows, cols = matcher({"pred_logits": logits, "pred_boxes": boxes[None]}, targets)[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


@pytest.mark.parametrize("costs,expected_query", [((10.0, 0.1, 0.0), 0), ((0.1, 10.0, 0.0), 1),
                                                  ((0.1, 0.0, 10.0), 1)])
def test_cost_weights_decide_between_class_and_box(costs, expected_query):
    # Query 0 has the right class but a poor box; query 1 the wrong class but the exact box.
    logits = torch.full((1, 2, NUM_CLASSES + 1), -5.0)
    logits[0, 0, 2] = 5.0
    logits[0, 1, 4] = 5.0
    boxes = torch.tensor([[_box(0.2), _box(0.7)]])
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([_box(0.7)])}]
    rows, cols = HungarianMatcher(*costs)({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]
    assert rows.tolist() == [expected_query] and cols.tolist() == [0]


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="--set_cost"):
        HungarianMatcher(0, 0, 0)


def test_non_finite_prediction_raises():
    outputs = _outputs(1, 3)
    outputs["pred_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        HungarianMatcher(1, 5, 2)(outputs, _targets([2]))


def test_build_matcher_reads_flags():
    matcher = build_matcher(argparse.Namespace(set_cost_class=2.0, set_cost_bbox=3.0, set_cost_giou=4.0))
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2.0, 3.0, 4.0)
