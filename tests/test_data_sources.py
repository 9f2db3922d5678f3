"""Source ingest: ImageNet-style folders (every bad-input case), flat val, webdataset tars."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import parse_params
from pipeline.data.build import PrepareError, prepare_images
from pipeline.data.crop import center_crop_arr
from pipeline.data.decode import BadImage, decode_rgb
from pipeline.data.imageset import ImageSet
from tests.support import tar_bytes

CROP = 16


def png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def rgb(seed: int, h: int = 30, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def params(**data):
    return parse_params({"seed": 0, "data": {"crop_size": CROP, "min_size": 8, "shard_size": 5, **data}})


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def skipped(split_dir: Path) -> dict[str, str]:
    """basename of the source -> reason."""
    lines = (split_dir / "skipped.jsonl").read_text().splitlines()
    out = {}
    for line in lines:
        s = json.loads(line)
        out[s["source"].rsplit("/", 1)[-1]] = s["reason"]
    return out


# ----------------------------------------------------------------------------- decoding


def test_decode_modes_to_rgb():
    def one(data: bytes) -> np.ndarray:
        return np.asarray(decode_rgb(data))

    assert one(png(np.full((4, 4), 65535, np.uint16))).tolist() == np.full((4, 4, 3), 255).tolist()
    assert (one(png(np.full((4, 4), 128 * 257, np.uint16))) == 128).all()  # scaled, not clipped
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white
    rgba[0, 0] = (255, 0, 0, 255)
    out = one(png(rgba, "RGBA"))
    assert out[0, 0].tolist() == [255, 0, 0] and (out[1:] == 255).all()
    la = np.stack([np.zeros((4, 4), np.uint8), np.full((4, 4), 128, np.uint8)], -1)
    assert np.abs(one(png(la, "LA")).astype(int) - 127).max() <= 1  # half black over white
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert one(buf.getvalue())[0, 1].tolist() == [200, 100, 50]
    cmyk = jpeg(Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    assert np.abs(one(cmyk).astype(int) - [255, 0, 0]).max() < 8
    f32 = Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")
    buf = io.BytesIO()
    f32.save(buf, format="TIFF")
    assert (one(buf.getvalue()) == 128).all()
    with pytest.raises(BadImage) as err:
        decode_rgb(png(rgb(0, 4, 4)), min_size=5)
    assert err.value.reason == "too_small"


# ----------------------------------------------------------------------------- image folder


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # every good image here is < 2000 px
    root = tmp_path / "imagenet"
    tr = root / "train"
    write(tr / "a" / "good.jpg", jpeg(Image.fromarray(rgb(1))))
    write(tr / "a" / "gray.png", png(rgb(2)[..., 0]))
    write(tr / "a" / "rgba.png", png(np.zeros((30, 40, 4), np.uint8), "RGBA"))
    write(tr / "a" / "cmyk.jpg", jpeg(Image.new("CMYK", (40, 30), (0, 255, 255, 0))))
    write(tr / "a" / "i16.png", png(np.full((30, 40), 128 * 257, np.uint16)))
    write(tr / "a" / "la.png", png(np.zeros((30, 40, 2), np.uint8), "LA"))
    write(tr / "a" / "empty.jpg", b"")
    write(tr / "a" / "trunc.jpg", jpeg(Image.fromarray(rgb(3)))[:400])
    write(tr / "a" / "garbage.png", np.random.default_rng(4).bytes(300))
    write(tr / "a" / "tiny.png", png(rgb(5, 4, 6)))
    write(tr / "a" / "bomb.png", png(np.zeros((60, 80), np.uint8)))
    os.symlink(tr / "a" / "gone.jpg", tr / "a" / "link.jpg")
    write(tr / "a" / "notes.txt", b"ignored: not an image extension")
    write(tr / "b" / "a.b.png", png(rgb(6)))
    write(tr / "b" / "dup.jpg", jpeg(Image.fromarray(rgb(7))))
    write(tr / "b" / "dup.png", png(rgb(8)))
    write(tr / "b" / "sub" / "deep.PNG", png(rgb(9, 20, 20)))  # nested folder, upper-case extension
    write(tr / "b" / "small.png", png(rgb(10, 10, 12)))  # short side 10 >= min_size 8: upsampled
    write(tr / "loose.png", png(rgb(11)))
    write(root / "val" / "a" / "v1.png", png(rgb(12)))
    write(root / "val" / "zzz" / "v2.png", png(rgb(13)))
    return root


def test_imagefolder_ingest_converts_or_skips_every_bad_input(folder: Path, tmp_path: Path):
    out = tmp_path / "images"
    metrics = prepare_images(params(source="imagefolder", root=str(folder)), out)
    train = ImageSet(out / "train")
    assert train.classes == ["a", "b"] and not train.has_masks and train.mask(0) is None
    assert train.keys == ["a/cmyk", "a/good", "a/gray", "a/i16", "a/la", "a/rgba",
                          "b/a_b", "b/dup", "b/small", "b/sub/deep"]
    assert train.labels.tolist() == [0] * 6 + [1] * 4
    assert skipped(out / "train") == {
        "empty.jpg": "empty_file", "trunc.jpg": "truncated", "garbage.png": "not_an_image",
        "tiny.png": "too_small", "bomb.png": "decompression_bomb", "link.jpg": "unreadable",
        "dup.png": "duplicate_key", "loose.png": "missing_label"}
    assert metrics["splits"]["train"]["skipped_by_reason"]["truncated"] == 1
    assert metrics["splits"]["train"]["count"] == 10 and metrics["classes"] == ["a", "b"]
    # conversions: alpha on white, 16-bit scaled, CMYK converted, L replicated
    assert (train.image(train.index_of("a/rgba")) == 255).all()
    assert (train.image(train.index_of("a/la")) == 255).all()  # LA with alpha 0: white
    assert (train.image(train.index_of("a/i16")) == 128).all()
    assert np.abs(train.image(train.index_of("a/cmyk")).astype(int) - [255, 0, 0]).max() < 8
    gray = train.image(train.index_of("a/gray"))
    assert (gray[..., 0] == gray[..., 1]).all()
    expect = center_crop_arr(Image.fromarray(rgb(6)), CROP)
    np.testing.assert_array_equal(train.image(train.index_of("b/a_b")), expect)
    assert train.image(train.index_of("b/small")).shape == (CROP, CROP, 3)
    val = ImageSet(out / "val")
    assert val.keys == ["a/v1"] and val.classes == ["a", "b"]
    assert skipped(out / "val") == {"v2.png": "unknown_class"}


def test_strict_mode_fails_naming_the_file(folder: Path, tmp_path: Path):
    (folder / "train" / "a" / "link.jpg").unlink()
    (folder / "train" / "loose.png").unlink()
    (folder / "train" / "b" / "dup.png").unlink()
    with pytest.raises(PrepareError, match=r"bomb\.png: decompression_bomb"):
        prepare_images(params(source="imagefolder", root=str(folder), strict=True), tmp_path / "o")


def test_flat_val_with_label_files(tmp_path: Path):
    root = tmp_path / "in"
    for c in ("n01", "n02"):
        write(root / "train" / c / f"{c}_1.JPEG", jpeg(Image.fromarray(rgb(1))))
    write(root / "val" / "ILSVRC_val_1.JPEG", jpeg(Image.fromarray(rgb(2))))
    write(root / "val" / "ILSVRC_val_2.JPEG", jpeg(Image.fromarray(rgb(3))))
    write(root / "val" / "ILSVRC_val_3.JPEG", jpeg(Image.fromarray(rgb(4))))
    (root / "val_labels.txt").write_text("ILSVRC_val_1.JPEG n02\nILSVRC_val_2 0\n")
    prepare_images(params(source="imagefolder", root=str(root)), tmp_path / "o1")
    val = ImageSet(tmp_path / "o1" / "val")
    assert val.keys == ["ILSVRC_val_1", "ILSVRC_val_2"] and val.labels.tolist() == [1, 0]
    assert skipped(tmp_path / "o1" / "val") == {"ILSVRC_val_3.JPEG": "missing_label"}
    (root / "val_labels.txt").unlink()
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC_val_3,n01 1 2 3 4 n01 5 6 7 8\nILSVRC_val_1,n02 0 0 9 9\n")
    prepare_images(params(source="imagefolder", root=str(root)), tmp_path / "o2")
    val = ImageSet(tmp_path / "o2" / "val")
    assert val.keys == ["ILSVRC_val_1", "ILSVRC_val_3"] and val.labels.tolist() == [1, 0]
    # the localisation boxes become object masks, cropped as the image: ILSVRC_val_1 is 40x30
    # with a box over x, y in 0..9; resized by 16/30 to 21x16 and cropped 2 px from the left,
    # the box covers rows 0..5.3 and columns 0..3.3 (thresholded at half: 5 x 3 pixels)
    assert val.has_masks
    mask = val.mask(0)
    assert mask.shape == (CROP, CROP) and mask[:5, :3].all() and not mask[6:].any() and not mask[:, 4:].any()
    (root / "val_labels.txt").write_text("ILSVRC_val_1.JPEG 490\n")  # a devkit ILSVRC2012_ID
    with pytest.raises(ValueError, match="devkit"):
        prepare_images(params(source="imagefolder", root=str(root)), tmp_path / "o3")


# ----------------------------------------------------------------------------- webdataset


def make_tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    data = tar_bytes(members)
    path.write_bytes(data[:cut] if cut else data)


def test_webdataset_ingest(tmp_path: Path):
    src = tmp_path / "wds"
    src.mkdir()
    make_tar(src / "train-000000.tar", [
        ("s/k1.jpg", jpeg(Image.fromarray(rgb(1)))), ("s/k1.cls", b"0"),
        ("d.x/k3.png", png(rgb(3))), ("d.x/k3.cls", b"2\n"),
        ("s/nolabel.png", png(rgb(4))),
        ("s/badlabel.png", png(rgb(5))), ("s/badlabel.cls", b"abc"),
        ("s/noimg.cls", b"1"),
        ("s/corrupt.jpg", b"not a jpeg at all"), ("s/corrupt.cls", b"1"),
    ])
    make_tar(src / "train-000001.tar", [
        ("s/k1.png", png(rgb(9))), ("s/k1.cls", b"1"),
        ("s/k4.webp", b""), ("s/k4.png", png(rgb(6))), ("s/k4.cls", b"1"),
    ])
    big = png(rgb(7, 60, 60))
    make_tar(src / "train-000002.tar", [("t/k5.png", big), ("t/k5.cls", b"0"),
                                        ("t/k6.png", big), ("t/k6.cls", b"0")], cut=len(big) * 3 // 2 + 3000)  # inside k6.png
    make_tar(src / "val-000000.tar", [("v/a.png", png(rgb(8))), ("v/a.cls", b"0"),
                                      ("v/b.png", png(rgb(8))), ("v/b.cls", b"7")])
    p = params(source="webdataset", train_urls=f"file://{src}/train-{{000000..000002}}.tar",
               val_urls=str(src / "val-000000.tar"), shard_size=2)
    out = tmp_path / "images"
    metrics = prepare_images(p, out)
    train = ImageSet(out / "train")
    assert train.classes == ["0", "1", "2"]
    assert "s/k1" in train.keys and "d_x/k3" in train.keys and "s/k4" in train.keys
    assert train.keys == sorted(train.keys)
    np.testing.assert_array_equal(train.image(train.index_of("d_x/k3")), center_crop_arr(Image.fromarray(rgb(3)), CROP))
    assert train.labels[train.index_of("d_x/k3")] == 2 and train.labels[train.index_of("s/k1")] == 0
    # s/k4 has an empty .webp (first in the jpg, jpeg, png, webp order is png): it is the png
    np.testing.assert_array_equal(train.image(train.index_of("s/k4")), center_crop_arr(Image.fromarray(rgb(6)), CROP))
    reasons = metrics["splits"]["train"]["skipped_by_reason"]
    for reason in ("missing_label", "bad_label", "no_image", "not_an_image", "duplicate_key", "bad_shard"):
        assert reasons.get(reason, 0) >= 1, (reason, reasons)
    assert "t/k5" in train.keys and "t/k6" not in train.keys  # read up to the damage
    lines = [json.loads(x) for x in (out / "train" / "skipped.jsonl").read_text().splitlines()]
    assert sum(s["reason"] == "bad_shard" for s in lines) == 1
    assert {"source", "reason"} <= set(lines[0])
    assert any(s["reason"] == "duplicate_key" and s["source"].endswith("train-000001.tar#s/k1") for s in lines)
    val = ImageSet(out / "val")
    assert val.keys == ["v/a"] and val.classes == train.classes
    assert metrics["splits"]["val"]["skipped_by_reason"] == {"unknown_class": 1}
    assert not (out / "train" / ".staging").exists()
    with pytest.raises(PrepareError, match="train-000000.tar#s/"):
        prepare_images(p.model_copy(update={"data": p.data.model_copy(update={"strict": True})}), tmp_path / "o")
