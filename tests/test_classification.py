"""ImageFolder classification data (datasets/classification.py)."""
import os
import shutil
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.classification import build_classification_dataset, build_transform, input_config, input_image
from datasets.synthetic import CATEGORIES
from util.errors import UserError


def flags(data_path, **overrides) -> Namespace:
    """The flags the dataset reads, at DeiT's defaults (input size scaled down)."""
    values = {"data_path": str(data_path), "input_size": 32, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25,
              "color_jitter": 0.3, "train_interpolation": "bicubic"}
    values.update(overrides)
    return Namespace(**values)


@pytest.fixture
def copy(classification_root, tmp_path) -> str:
    """A private copy of ``classification_root`` that a test may break."""
    root = str(tmp_path / "data")
    shutil.copytree(classification_root, root)
    return root


def test_samples_labels_and_classes(classification_root):
    train = build_classification_dataset("train", flags(classification_root))
    val = build_classification_dataset("val", flags(classification_root))
    assert train.classes == val.classes == sorted(CATEGORIES)
    assert train.num_classes == val.num_classes == 6
    assert (len(train), len(val)) == (12, 6)
    image, label = val[0]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == 0  # the first sample in sorted order is a "circle"
    assert sorted(train.targets) == [c for c in range(6) for _ in range(2)]
    for index, (path, label) in enumerate(val.samples):
        assert os.path.basename(os.path.dirname(path)) == val.classes[label]


def test_evaluation_transform_is_deterministic_and_training_is_random(classification_root):
    val = build_classification_dataset("val", flags(classification_root))
    assert torch.equal(val[1][0], val[1][0])
    torch.manual_seed(0)
    train = build_classification_dataset("train", flags(classification_root))
    first, second = train[1][0], train[1][0]
    assert first.shape == second.shape == (3, 32, 32)
    assert not torch.equal(first, second)


def test_evaluation_transform_is_a_resize_and_centre_crop(classification_root):
    val = build_classification_dataset("val", flags(classification_root, input_size=40))
    names = [type(t).__name__ for t in val.transform.transforms]
    assert names[:2] == ["Resize", "CenterCrop"]
    # normalised with the ImageNet mean and std: a mid-grey pixel is near -mean/std
    assert val[0][0].abs().max() < 3


def test_training_transform_follows_the_flags(classification_root):
    def names(**overrides):
        transform = build_transform(True, flags(classification_root, **overrides))
        return [type(t).__name__ for t in transform.transforms]

    deit = names()
    assert "RandomResizedCropAndInterpolation" in deit and "RandomErasing" in deit
    assert any("RandAugment" in name for name in deit)
    plain = names(aa="none", reprob=0.0)
    assert "RandomErasing" not in plain and not any("RandAugment" in name for name in plain)
    assert names(aa=None, reprob=0.0) == plain
    assert "ColorJitter" in plain and "ColorJitter" not in names(aa="none", reprob=0.0, color_jitter=0.0)


def test_crop_scale_reaches_timm(classification_root):
    transform = build_transform(True, flags(classification_root, scale=[0.5, 1.0]))
    assert transform.transforms[0].scale == (0.5, 1.0)


def test_missing_split_folder(copy):
    shutil.rmtree(os.path.join(copy, "val"))
    with pytest.raises(UserError, match=r"split folder not found: .*val \(--data_path must hold"):
        build_classification_dataset("val", flags(copy))
    assert len(build_classification_dataset("train", flags(copy))) == 12  # train alone still works


def test_split_without_class_folders(copy):
    shutil.rmtree(os.path.join(copy, "val"))
    os.makedirs(os.path.join(copy, "val"))
    with pytest.raises(UserError, match=r"val: no class folders, expected"):
        build_classification_dataset("train", flags(copy))


def test_empty_class_folder(copy):
    ring = os.path.join(copy, "train", "ring")
    for name in os.listdir(ring):
        os.remove(os.path.join(ring, name))
    with open(os.path.join(ring, "notes.txt"), "w") as f:
        f.write("not an image")
    with pytest.raises(UserError, match=r"train/ring: empty class folder, expected at least one image \(.*\.png"):
        build_classification_dataset("train", flags(copy))


def test_unreadable_image_names_the_file(copy):
    broken = os.path.join(copy, "val", "circle", "000000.png")
    with open(broken, "wb") as f:
        f.write(b"not a png")
    val = build_classification_dataset("val", flags(copy))
    with pytest.raises(UserError) as excinfo:
        val[0]
    message = str(excinfo.value)
    assert message.startswith(f"cannot read image {broken}") and "\n" not in message
    assert val[1][0].shape == (3, 32, 32)  # the others still load


@pytest.mark.parametrize("split", ["train", "val"])
def test_train_and_val_classes_differ(copy, split):
    os.rename(os.path.join(copy, "val", "ring"), os.path.join(copy, "val", "rings"))
    with pytest.raises(UserError, match=r"train and val hold different class folders \(only in train: ring; "
                                        r"only in val: rings\)"):
        build_classification_dataset(split, flags(copy))


@pytest.mark.parametrize("overrides, flag", [({"aa": "rand-x9"}, "--aa"), ({"aa": "bogus"}, "--aa"),
                                             ({"train_interpolation": "cubic"}, "--train_interpolation"),
                                             ({"reprob": 1.5}, "--reprob"),
                                             ({"scale": [0.9, 0.5]}, "--scale")])
def test_bad_augmentation_flags(classification_root, overrides, flag):
    with pytest.raises(UserError, match=f"^{flag}: ") as excinfo:
        build_classification_dataset("train", flags(classification_root, **overrides))
    assert "\n" not in str(excinfo.value)


def test_rgb_conversion_of_grey_images(copy):
    path = os.path.join(copy, "val", "square", "000001.png")
    Image.open(path).convert("L").save(path)
    val = build_classification_dataset("val", flags(copy))
    index = [p for p, _ in val.samples].index(path)
    assert val[index][0].shape == (3, 32, 32)


def test_input_image_undoes_the_normalisation(classification_root):
    val = build_classification_dataset("val", flags(classification_root, input_size=40))
    view = input_image(val[0][0], flags(classification_root, input_size=40))
    resize, crop = val.transform.transforms[:2]
    with Image.open(val.samples[0][0]) as source:
        expected = np.asarray(crop(resize(source.convert("RGB"))), dtype=np.int64)
    assert view.size == (40, 40) and view.mode == "RGB"
    assert np.abs(np.asarray(view, dtype=np.int64) - expected).max() <= 1  # 8-bit rounding only


@pytest.mark.parametrize("overrides,expected", [
    ({}, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875)),  # DeiT's
    ({"vit_weights": "timm", "vit_arch": "vit_base"}, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9)),  # timm's config
    ({"vit_weights": "timm", "vit_arch": "deit_small", "crop_pct": 1.0}, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0)),
    ({"input_mean": [0.1, 0.2, 0.3], "input_std": [1.0, 1.0, 1.0]}, ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0), 0.875)),
])
def test_input_config_comes_from_the_flags_then_the_weights_then_deit(classification_root, overrides, expected):
    config = input_config(flags(classification_root, **overrides))
    assert config["mean"] == pytest.approx(expected[0]) and config["std"] == pytest.approx(expected[1])
    assert config["crop_pct"] == expected[2]


def test_evaluation_transform_normalises_and_crops_as_the_config_says(classification_root):
    plain = build_classification_dataset("val", flags(classification_root, input_size=32))
    half = build_classification_dataset("val", flags(classification_root, input_size=32, input_mean=[0.5] * 3,
                                                     input_std=[0.5] * 3, crop_pct=1.0))
    resize = half.transform.transforms[0]
    assert resize.size == 32  # crop_pct 1: resized to the input size, nothing cropped away
    assert plain.transform.transforms[0].size == 36  # 32 / 0.875, rounded down
    assert half[0][0].min() >= -1 - 1e-6 and half[0][0].max() <= 1 + 1e-6  # (x - 0.5) / 0.5 of x in [0, 1]
