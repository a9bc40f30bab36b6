"""The input pipeline: MAE's PIL transform reproduced on uint8 tensors, determinism across
workers and resumes, epoch-crossing sampling, and decoding of image folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from umae import data as D


def _pil_reference(img, size, seed, epoch, i, train=True):
    """MAE's transform with PIL (RandomResizedCrop bicubic, flip, ToTensor, Normalize), at the
    crop and flip umae's generator draws."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    if train:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + i)
        t, l, h, w = D.random_resized_crop_params(img.shape[1], img.shape[2], g)
        pil = pil.crop((l, t, l + w, t + h))
        flip = bool(torch.rand((), generator=g) < 0.5)
    pil = pil.resize((size, size), Image.BICUBIC)
    if train and flip:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    return (x - D.MEAN[:, None, None]) / D.STD[:, None, None]


@pytest.mark.parametrize("hw", [(32, 32), (8, 8), (97, 75)])  # the builtin size, upsampling, downsampling
@pytest.mark.parametrize("train", [True, False])
def test_augmentation_matches_maes_pil_transform(hw, train):
    g = torch.Generator().manual_seed(hw[0])
    smooth = torch.nn.functional.interpolate(torch.rand(7, 3, 6, 6, generator=g), size=hw, mode="bilinear")
    imgs = (smooth * 200 + 40 * torch.rand(7, 3, *hw, generator=g)).clamp(0, 255).round().to(torch.uint8)
    aug = D.Augmented(D.TensorImages(imgs, torch.arange(7)), 32, seed=3, train=train)
    aug.epoch = 2
    for i in range(7):
        got, label = aug[i]
        ref = _pil_reference(imgs[i], 32, 3, 2, i, train)
        assert got.shape == (3, 32, 32) and got.dtype == torch.float32 and label == i
        levels = ((got - ref) * D.STD[:, None, None] * 255).abs()  # in 8-bit levels
        # torchvision's uint8 bicubic-AA kernel vs PIL's: a level here and there (2 at most seen)
        assert levels.max() <= 2.01 and levels.mean() < 0.05, (i, float(levels.max()), float(levels.mean()))


def test_same_seed_and_step_same_batch_with_any_workers():
    ds = D.open_dataset("builtin", True, seed=0, builtin_size=96)
    aug = D.Augmented(ds, 32, seed=5)
    batches = []
    for workers in (0, 2):
        s = D.ResumableSampler(len(ds), 32, seed=5)
        s.epoch, s.start_batch, s.num_batches = 1, 1, 4  # crosses into epoch 2
        loader = torch.utils.data.DataLoader(aug, batch_size=32, sampler=s, drop_last=True, num_workers=workers)
        batches.append([x for x, _ in loader])
    assert len(batches[0]) == 4
    for a, b in zip(*batches):
        assert torch.equal(a, b)
    first = next(iter(_sampler(96, 32, 5, 1, 1)))
    assert first[0] == 1 and torch.equal(batches[0][0][0], aug[first][0])  # (epoch, index) keys the sample
    assert batches[0][0].dtype == torch.float32 and batches[0][0].shape == (32, 3, 32, 32)


def _sampler(n, gb, seed, epoch, start, num=None, rank=0, world=1):
    s = D.ResumableSampler(n, gb, seed, rank, world)
    s.epoch, s.start_batch, s.num_batches = epoch, start, num
    return s


def test_sampler_crosses_epochs_and_resumes_exactly():
    n, gb = 50, 8  # 6 batches per epoch, 2 images left over
    full = list(_sampler(n, gb, 1, 0, 0, num=15))
    assert len(full) == 15 * gb == len(_sampler(n, gb, 1, 0, 0, num=15))
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(1 * 7919 + e)).tolist() for e in range(3)]
    expect = [(e, i) for e in range(3) for i in perms[e][:6 * gb]][:15 * gb]
    assert full == expect
    for stop in (1, 6, 7, 13):  # resume at any batch, epoch boundaries included
        e, b = divmod(stop, 6)
        assert list(_sampler(n, gb, 1, e, b, num=15 - stop)) == full[stop * gb:]
    ranks = [list(_sampler(n, gb, 1, 0, 0, num=3, rank=r, world=2)) for r in range(2)]
    assert [x for k in range(3) for r in range(2) for x in ranks[r][k * 4:(k + 1) * 4]] == full[:3 * gb]
    assert len(list(_sampler(n, gb, 1, 0, 4))) == 2 * gb  # default: to the end of the epoch


def test_image_folder_decoding(tmp_path):
    g = torch.Generator().manual_seed(0)
    arrays = {}
    for k, ext in enumerate(("jpg", "png", "bmp", "JPEG")):
        d = tmp_path / f"c{k % 2}"
        d.mkdir(exist_ok=True)
        a = (torch.nn.functional.interpolate(torch.rand(1, 3, 5, 7, generator=g), size=(37, 45), mode="bilinear")[0]
             * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = d / f"img{k}.{ext}"
        Image.fromarray(a).save(path, format={"jpg": "JPEG", "JPEG": "JPEG"}.get(ext, ext.upper()), quality=90)
        arrays[str(path)] = a
    ds = D.open_dataset(str(tmp_path))
    assert len(ds) == 4 and D.num_classes(ds) == 2
    for i, (path, label) in enumerate(ds.ds.samples):
        img, lab = ds.load(i)
        with Image.open(path) as im:
            pil = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        assert img.dtype == torch.uint8 and img.shape == (3, 37, 45) and lab == label
        diff = (img.int() - pil.int()).abs()
        if path.lower().endswith((".png", ".bmp")):
            assert torch.equal(img, pil), path  # lossless: the same pixels
        else:
            assert diff.max() <= 2 and diff.float().mean() < 0.5, (path, int(diff.max()))  # two JPEG decoders


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_images_are_read_at_their_scale(tmp_path, ext):
    # a 16-bit PNG decoded as uint16 was divided by 255 downstream: inputs up to 257x too large (1145 seen)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(20, 24), dtype=np.uint16)
    path = str(tmp_path / f"g16.{ext}")
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I;16")
    got = D._decode(path)
    want = torch.from_numpy(((arr.astype(np.int64) + 128) // 257).astype(np.uint8))  # round(v / 257)
    assert got.dtype == torch.uint8 and got.shape == (3, 20, 24)
    assert torch.equal(got, want.expand(3, -1, -1))
    assert int(got.max()) > 200 and int(got.min()) < 50  # the values span the 8-bit range
