"""Batching and logging helpers (util/misc.py)."""
import numpy as np
import pytest
import torch

from util.misc import (MetricLogger, NestedTensor, SmoothedValue, collate_fn, gather, nested_tensor_from_tensor_list,
                       owner_rank, run_spread, slow_bf16_warning, to_nested_tensor)


def _images():
    torch.manual_seed(0)
    return [torch.rand(3, 4, 5) + 1.0, torch.rand(3, 6, 3) + 1.0]  # +1: no pixel is 0


def test_nested_tensor_pads_bottom_right_with_zeros():
    a, b = _images()
    nested = nested_tensor_from_tensor_list([a, b])
    assert nested.tensors.shape == (2, 3, 6, 5)
    torch.testing.assert_close(nested.tensors[0, :, :4, :5], a)
    torch.testing.assert_close(nested.tensors[1, :, :6, :3], b)
    assert (nested.tensors[0, :, 4:, :] == 0).all()
    assert (nested.tensors[1, :, :, 3:] == 0).all()


def test_nested_tensor_mask_true_exactly_on_padding():
    a, b = _images()
    nested = nested_tensor_from_tensor_list([a, b])
    assert nested.mask.shape == (2, 6, 5) and nested.mask.dtype == torch.bool
    expected = torch.ones(2, 6, 5, dtype=torch.bool)
    expected[0, :4, :5] = False
    expected[1, :6, :3] = False
    assert torch.equal(nested.mask, expected)
    # The mask is also exactly where the padded tensor is zero (no image pixel is 0).
    assert torch.equal(nested.mask, (nested.tensors == 0).all(dim=1))


def test_nested_tensor_pads_up_to_a_multiple_of_size_divisibility():
    a, b = _images()
    nested = nested_tensor_from_tensor_list([a, b], size_divisibility=4)
    assert nested.tensors.shape == (2, 3, 8, 8)
    torch.testing.assert_close(nested.tensors[1, :, :6, :3], b)
    assert torch.equal(nested.mask, (nested.tensors == 0).all(dim=1))
    exact = nested_tensor_from_tensor_list([torch.rand(3, 8, 4)], size_divisibility=4)
    assert exact.tensors.shape == (1, 3, 8, 4) and not exact.mask.any()


def test_nested_tensor_same_size_images_have_no_padding():
    images = [torch.rand(3, 4, 4), torch.rand(3, 4, 4)]
    nested = nested_tensor_from_tensor_list(images)
    assert not nested.mask.any()
    torch.testing.assert_close(nested.tensors, torch.stack(images))


def test_nested_tensor_rejects_empty_and_non_3d():
    with pytest.raises(ValueError):
        nested_tensor_from_tensor_list([])
    with pytest.raises(ValueError, match="C, H, W"):
        nested_tensor_from_tensor_list([torch.rand(4, 5)])


def test_nested_tensor_decompose_and_to():
    a, b = _images()
    nested = nested_tensor_from_tensor_list([a, b])
    tensors, mask = nested.decompose()
    assert tensors is nested.tensors and mask is nested.mask
    moved = nested.to("cpu")
    assert isinstance(moved, NestedTensor)
    assert torch.equal(moved.tensors, nested.tensors) and torch.equal(moved.mask, nested.mask)
    assert moved.image_sizes == nested.image_sizes


def test_nested_tensor_records_each_image_size_before_padding():
    a, b = _images()
    nested = nested_tensor_from_tensor_list([a, b], size_divisibility=4)
    assert nested.image_sizes == [tuple(a.shape[1:]), tuple(b.shape[1:])]
    for (height, width), mask in zip(nested.image_sizes, nested.mask):
        assert not mask[:height, :width].any() and int((~mask).sum()) == height * width


def test_to_nested_tensor_passes_nested_tensor_through():
    nested = nested_tensor_from_tensor_list(_images())
    assert to_nested_tensor(nested) is nested


def test_to_nested_tensor_4d_tensor_has_no_padding():
    batch = torch.rand(2, 3, 4, 5)
    nested = to_nested_tensor(batch)
    assert nested.tensors is batch
    assert nested.mask.shape == (2, 4, 5) and nested.mask.dtype == torch.bool
    assert not nested.mask.any()
    assert nested.image_sizes == [(4, 5), (4, 5)]


def test_to_nested_tensor_list_and_tuple_of_3d_tensors():
    a, b = _images()
    expected = nested_tensor_from_tensor_list([a, b])
    for samples in ([a, b], (a, b)):
        nested = to_nested_tensor(samples)
        assert torch.equal(nested.tensors, expected.tensors)
        assert torch.equal(nested.mask, expected.mask)


def test_to_nested_tensor_single_3d_tensor_is_a_batch_of_one():
    image = torch.rand(3, 4, 5)
    nested = to_nested_tensor(image)
    assert nested.tensors.shape == (1, 3, 4, 5)
    torch.testing.assert_close(nested.tensors[0], image)
    assert not nested.mask.any()


@pytest.mark.parametrize("bad", [torch.rand(4, 5), torch.rand(1, 2, 3, 4, 5), np.zeros((2, 3, 4, 5)), "image", None])
def test_to_nested_tensor_rejects_other_input(bad):
    with pytest.raises(TypeError, match="NestedTensor"):
        to_nested_tensor(bad)


def test_collate_fn_batches_images_and_keeps_targets():
    a, b = _images()
    ta, tb = {"labels": torch.tensor([1])}, {"labels": torch.tensor([2, 3])}
    samples, targets = collate_fn([(a, ta), (b, tb)])
    assert isinstance(samples, NestedTensor)
    assert samples.tensors.shape == (2, 3, 6, 5)
    torch.testing.assert_close(samples.tensors[1, :, :6, :3], b)
    assert isinstance(targets, tuple) and len(targets) == 2
    assert targets[0] is ta and targets[1] is tb


def test_smoothed_value_window_median_avg_and_global_avg():
    meter = SmoothedValue(window_size=3)
    for v in (1.0, 2.0, 3.0, 10.0):
        meter.update(v)
    # Window keeps the last 3 values: [2, 3, 10]; the global average covers all 4.
    assert meter.median == pytest.approx(3.0)
    assert meter.avg == pytest.approx(5.0)
    assert meter.global_avg == pytest.approx(16.0 / 4)
    assert meter.max == pytest.approx(10.0)
    assert meter.value == pytest.approx(10.0)


def test_smoothed_value_global_avg_weights_by_n():
    meter = SmoothedValue(window_size=5)
    meter.update(2.0, n=3)
    meter.update(6.0, n=1)
    assert meter.count == 4
    assert meter.global_avg == pytest.approx((2.0 * 3 + 6.0) / 4)
    assert meter.avg == pytest.approx(4.0)  # the window is per update, unweighted


def test_smoothed_value_empty_global_avg_is_zero_and_str_formats():
    meter = SmoothedValue(window_size=2, fmt="{median:.1f}|{global_avg:.2f}|{max:.0f}")
    assert meter.global_avg == 0.0
    meter.update(1.0)
    meter.update(4.0)
    # torch's median of an even window is the lower middle value.
    assert str(meter) == "1.0|2.50|4"


def test_one_process_owns_every_job_and_gathers_its_own_data():
    # Several processes: tests/test_distributed.py.
    ran = []
    jobs = [lambda i=i: ran.append(i) or i * i for i in range(3)]
    assert run_spread(jobs) == [0, 1, 4] and ran == [0, 1, 2]
    assert [owner_rank(i) for i in range(3)] == [0, 0, 0]
    assert gather({"a": 1}, dst=0) == [{"a": 1}]


def test_log_every_reports_the_images_per_second_of_its_pass(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr("util.misc.time.time", lambda: clock[0])
    logger = MetricLogger()
    for _ in logger.log_every([[0, 1], [2, 3], [4]], print_freq=2, header="Epoch: [0]", batch_size_of=len):
        clock[0] += 0.5  # each batch takes half a second
    assert logger.images_per_s == pytest.approx(5 / 1.5)
    assert "(0.500 s/it, 3.3 img/s)" in capsys.readouterr().out


@pytest.mark.parametrize("avx512_bf16,amx,warned", [(False, False, True), (True, False, False), (False, True, False)])
def test_bf16_is_called_slow_on_cpus_without_native_bf16_only(monkeypatch, avx512_bf16, amx, warned):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    warning = slow_bf16_warning(torch.device("cpu"))
    assert (warning is not None) == warned
    assert warning is None or ("--amp" in warning and "slower" in warning and "\n" not in warning)
    assert slow_bf16_warning(torch.device("cuda")) is None


@pytest.mark.gpu
def test_nested_tensor_pin_memory_pins_both_tensors_and_keeps_the_sizes():
    batch = nested_tensor_from_tensor_list(_images())
    pinned = batch.pin_memory()
    assert pinned.tensors.is_pinned() and pinned.mask.is_pinned()
    assert torch.equal(pinned.tensors, batch.tensors) and torch.equal(pinned.mask, batch.mask)
    assert pinned.image_sizes == batch.image_sizes
