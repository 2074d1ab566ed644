"""The pieces of the training recipe checked on their own, without training a network:
the folder scan, random-resized crops, MixUp/CutMix targets, EMA, precision choice,
the torch version check, and the module structure."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trtvit_native.data import IMAGE_EXTENSIONS, ImageFolder, TrainImages, random_resized_crop_box
from trtvit_native.train import BatchAugment, TrainError, _check_torch, make_ema, pick_amp

PACKAGE = Path(__file__).resolve().parent.parent / "trtvit_native"


def _image(path: Path, size=(12, 10), value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def test_folder_scan_is_torchvisions(tmp_path, monkeypatch):
    """Every torchvision extension, symlinked class folders followed, headers only."""
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
    root = tmp_path / "data"
    for i, ext in enumerate(("webp", "tif", "TIFF", "ppm", "png")):
        _image(root / "a" / f"{i}.{ext}")
    _image(root / "a" / "gray.pgm").write_bytes(b"P5\n4 4\n255\n" + bytes(16))
    elsewhere = _image(tmp_path / "outside" / "b" / "x.jpg").parent
    (root / "b").symlink_to(elsewhere, target_is_directory=True)  # a symlinked class folder
    more = _image(tmp_path / "outside" / "more" / "y.bmp").parent
    (root / "a" / "more").symlink_to(more, target_is_directory=True)  # and a symlinked folder inside one
    (root / "a" / "notes.txt").write_text("not an image")
    # reading the tree must not decode pixels: a full read would call Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    folder = ImageFolder.read(root)
    assert folder.classes == ["a", "b"]
    assert sorted(Path(p).name for p, _ in folder.samples) == ["0.webp", "1.tif", "2.TIFF", "3.ppm", "4.png",
                                                               "gray.pgm", "x.jpg", "y.bmp"]
    assert folder.counts() == {"a": 7, "b": 1} and folder.skipped == []


def test_random_resized_crops_come_from_the_whole_image():
    """Area within scale, aspect within ratio, and the crops reach every border of a
    non-square image (a centered square would never reach the left and right thirds)."""
    g = torch.Generator().manual_seed(0)
    boxes = [random_resized_crop_box(60, 180, (0.25, 1.0), (3 / 4, 4 / 3), g) for _ in range(400)]
    for top, left, bh, bw in boxes:
        assert 0 <= top and top + bh <= 60 and 0 <= left and left + bw <= 180
        assert 0.25 * 0.95 <= bh * bw / (60 * 180) <= 1.0
        assert 3 / 4 * 0.95 <= bw / bh <= 4 / 3 * 1.05
    assert min(b[1] for b in boxes) == 0 and max(b[1] + b[3] for b in boxes) == 180


def test_training_samples_are_uint8_crops_seeded_by_epoch_and_image(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(2):
            path = tmp_path / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)).save(path)
    ds = TrainImages(ImageFolder.read(tmp_path), 32, scale=(0.3, 1.0), seed=3)
    image, label, skipped = ds[(0, 1)]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == 0 and skipped is None
    assert torch.equal(ds[(0, 1)][0], image)  # the same draws for the same (epoch, image)
    assert not torch.equal(ds[(1, 1)][0], image)  # other draws in another epoch


def test_mixup_and_cutmix_targets_sum_to_one_and_match_the_mixed_images():
    torch.manual_seed(0)
    b, classes = 6, 10
    images = torch.rand(b, 3, 16, 16)
    labels = torch.arange(b)  # each label names its image: the partner's label is its index
    for kind, aug in (("mixup", BatchAugment(classes, mixup=0.8)), ("cutmix", BatchAugment(classes, cutmix=1.0))):
        for _ in range(3):
            mixed, targets = aug.mix(images.clone(), labels)
            info = aug.last_mix
            assert info["kind"] == kind
            assert targets.shape == (b, classes)
            assert torch.allclose(targets.sum(1), torch.ones(b), atol=1e-6)
            wa, wb, partner = info["weight_a"], info["weight_b"], info["partner_label"]
            for i in range(b):
                j = int(partner[i])
                if j == i:  # paired with itself: the image is unchanged
                    assert torch.allclose(mixed[i], images[i], atol=1e-6)
                    continue
                assert abs(float(targets[i, i]) - float(wa[i])) < 1e-6
                assert abs(float(targets[i, j]) - float(wb[i])) < 1e-6
                if kind == "mixup":
                    assert torch.allclose(mixed[i], wa[i] * images[i] + wb[i] * images[j], atol=1e-6)
                else:  # the fraction of pixels taken from the partner is its weight
                    from_partner = (mixed[i] == images[j]).all(0) & (mixed[i] != images[i]).any(0)
                    assert abs(float(from_partner.float().mean()) - float(wb[i])) < 1e-6


def test_batch_augment_normalizes_and_keeps_hard_labels_without_mixing():
    from trtvit_native.data import normalize

    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    x, y = BatchAugment(4)(images, labels)
    assert torch.equal(y, labels) and torch.allclose(x, normalize(images.float()), atol=1e-6)
    x, y = BatchAugment(4, randaug=(2, 9), erasing=1.0)(images, labels)
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all() and not torch.allclose(x, normalize(images.float()))


def test_ema_equals_a_hand_computed_average_of_weights_and_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.rand(2, 3, 6, 6))
    decay = 0.9
    ema = make_ema(model, decay)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hand, used = None, []
    start = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    for step in range(25):
        loss = model(torch.rand(4, 3, 6, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        now = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        # the first update takes the weights as they are, then ema = d * ema + (1 - d) * w with
        # timm's warmup d = min(decay, 1 - (1 + k) ** -0.75) after k updates: 0.405, 0.561, ... 0.9
        if hand is not None:
            d = min(decay, 1 - (1 + step) ** -0.75)
            used.append(d)
            hand = {k: d * hand[k] + (1 - d) * now[k] for k in now}
        else:
            hand = now
    averaged = ema.module.state_dict()
    assert used[0] == pytest.approx(1 - 2 ** -0.75) and used[-1] == decay and used.count(decay) == 4
    assert any("running_mean" in k for k in hand)
    for k, v in hand.items():
        if k.endswith("num_batches_tracked"):
            continue
        if not torch.allclose(start[k], model.state_dict()[k].float()):  # (the conv bias before BN has no gradient)
            assert not torch.allclose(v, model.state_dict()[k].float()), k  # an average, not the last weights
        assert torch.allclose(averaged[k].float(), v, rtol=1e-6, atol=1e-7), k


def test_amp_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    assert pick_amp("auto", torch.device("cpu")) == "off"
    assert pick_amp("fp16", torch.device("cpu")) == "fp16"
    # torch.cuda.is_bf16_supported() says True on T4 and V100 (emulation): capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, expected in (((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert pick_amp("auto", torch.device("cuda", 0)) == expected, capability


def test_old_torch_gets_a_named_error(monkeypatch):
    _check_torch()
    monkeypatch.setattr(torch, "__version__", "2.2.2+cpu")
    with pytest.raises(TrainError, match=r"needs torch >= 2.3 .*this is torch 2.2.2\+cpu"):
        _check_torch()


def test_setup_declares_the_torch_training_needs():
    setup = (PACKAGE.parent / "setup.py").read_text()
    assert '"torch>=2.3"' in setup and "torchmetrics" in setup


def _imports(module: Path):
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_import_circle_between_cli_and_train():
    assert not {".cli", "trtvit_native.cli"} & _imports(PACKAGE / "train.py")
    assert ".train" in _imports(PACKAGE / "cli.py")
    # and the package's other modules do not reach back into the command line either
    for module in ("data.py", "evaluate.py", "weights.py"):
        assert not {".cli", "trtvit_native.cli"} & _imports(PACKAGE / module), module


def test_an_image_that_fails_to_decode_is_left_out_of_its_batch(tmp_path):
    from torch.utils.data import DataLoader

    from trtvit_native.data import collate_skipping

    for c in ("a", "b"):
        _image(tmp_path / c / "ok.png", size=(40, 40), value=50)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "b" / "t.jpg")
    data = (tmp_path / "b" / "t.jpg").read_bytes()
    (tmp_path / "b" / "t.jpg").write_bytes(data[: len(data) // 2])
    folder = ImageFolder.read(tmp_path)
    assert len(folder) == 3 and folder.skipped == []  # the header is readable
    loader = DataLoader(TrainImages(folder, 32), batch_size=3, sampler=[(0, 0), (0, 1), (0, 2)],
                        collate_fn=collate_skipping)
    ((images, labels, skipped),) = list(loader)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    assert skipped == [str(tmp_path / "b" / "t.jpg")]
