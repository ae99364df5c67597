"""Tests of lora_trainer.dataset: folder scanning, image loading, caption augmentation, step counts."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.dataset import (
    DatasetScan,
    describe_steps,
    image_to_tensor,
    load_image,
    parse_color,
    process_caption,
    scan_dataset,
    steps_per_epoch,
    total_steps,
)
from lora_trainer.errors import ConfigError, DatasetError

# ----------------------------------------------------------------- helpers


def make_image(path: Path, size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 50, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}[path.suffix.lower()]
    Image.new("RGB", size, color).save(path, fmt)
    return path


def noise_image(path: Path, size: int = 64) -> bytes:
    """Save a noise image (so the encoded data is large) and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path.read_bytes()


def truncate(path: Path, fraction: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def caption(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------- layout


def test_scan_counts_subsets_repeats_and_captions(tmp_path: Path) -> None:
    a = tmp_path / "10_ohwx woman"
    b = tmp_path / "3_style"
    for i in range(4):
        make_image(a / f"img{i}.png")
        caption(a / f"img{i}.txt", f"  ohwx woman, smiling, tag{i}\n")
    make_image(b / "x.jpg")
    make_image(b / "y.webp")
    caption(b / "x.txt", "style, Red")
    caption(b / "y.txt", "style, red")

    scan = scan_dataset(tmp_path)
    assert isinstance(scan, DatasetScan)
    assert [s.dir.name for s in scan.subsets] == ["10_ohwx woman", "3_style"]
    assert [s.repeats for s in scan.subsets] == [10, 3]
    assert [s.name for s in scan.subsets] == ["ohwx woman", "style"]
    assert scan.num_images == 6
    assert scan.num_samples == 4 * 10 + 2 * 3
    assert scan.warnings == []
    entries = scan.entries()
    assert [e.path.name for e in entries] == ["img0.png", "img1.png", "img2.png", "img3.png", "x.jpg", "y.webp"]
    assert entries[0].caption == "ohwx woman, smiling, tag0"
    assert all(e.caption_from_file for e in entries)
    assert scan.dataset_dirs() == {
        "10_ohwx woman": {"n_repeats": 10, "img_count": 4},
        "3_style": {"n_repeats": 3, "img_count": 2},
    }
    freq = scan.tag_frequency()
    assert freq["10_ohwx woman"]["ohwx woman"] == 4
    assert freq["10_ohwx woman"]["tag2"] == 1
    assert freq["3_style"] == {"style": 2, "red": 2}


def test_upper_case_extensions_found(tmp_path: Path) -> None:
    d = tmp_path / "2_cat"
    make_image(d / "IMG_1.JPG")
    make_image(d / "IMG_2.PNG")
    make_image(d / "IMG_3.Jpeg")
    make_image(d / "IMG_4.WEBP")
    make_image(d / "IMG_5.BMP")
    for i in range(1, 6):
        caption(d / f"IMG_{i}.txt", f"cat {i}")
    scan = scan_dataset(tmp_path)
    assert scan.num_images == 5
    assert [e.caption for e in scan.entries()] == [f"cat {i}" for i in range(1, 6)]


def test_missing_captions_fall_back_to_folder_name_with_one_warning(tmp_path: Path) -> None:
    d = tmp_path / "10_ohwx woman"
    make_image(d / "a.png")
    make_image(d / "b.png")
    make_image(d / "c.png")
    caption(d / "c.txt", "has caption")
    e = tmp_path / "5_other thing"
    make_image(e / "d.png")
    caption(e / "d.txt", "   \n")  # present but empty
    logged: list[str] = []

    scan = scan_dataset(tmp_path, log=logged.append)

    caps = {x.path.name: (x.caption, x.caption_from_file) for x in scan.entries()}
    assert caps == {
        "a.png": ("ohwx woman", False),
        "b.png": ("ohwx woman", False),
        "c.png": ("has caption", True),
        "d.png": ("other thing", False),
    }
    caption_warnings = [w for w in scan.warnings if "caption" in w]
    assert len(caption_warnings) == 1
    w = caption_warnings[0]
    assert "2 images" in w and "a.png" in w and "b.png" in w
    assert "d.txt" in w and "empty" in w
    assert "c.png" not in w
    assert logged == scan.warnings


def test_missing_caption_warning_is_truncated_and_suggests_other_extension(tmp_path: Path) -> None:
    d = tmp_path / "1_many"
    for i in range(30):
        make_image(d / f"p{i:02d}.png", size=(8, 8))
    caption(d / "p00.caption", "tagged with the other extension")
    scan = scan_dataset(tmp_path, verify=False)
    assert len(scan.warnings) == 1
    w = scan.warnings[0]
    assert "30 images" in w
    assert "p00.png" in w and "p29.png" not in w and "20 more" in w
    assert "p00.caption" in w and "caption_extension='.caption'" in w
    # with the right extension the caption is read
    scan2 = scan_dataset(tmp_path, caption_extension=".caption", verify=False)
    assert scan2.entries()[0].caption == "tagged with the other extension"


def test_unused_files_and_ignored_folders_warn(tmp_path: Path) -> None:
    d = tmp_path / "4_dog"
    make_image(d / "a.png")
    caption(d / "a.txt", "dog")
    (d / "anim.gif").write_bytes(b"GIF89a")
    (d / "scan.tiff").write_bytes(b"II*\x00")
    (d / "a.npz").write_bytes(b"")  # latent cache: no warning
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("x")
    scan = scan_dataset(tmp_path)
    joined = "\n".join(scan.warnings)
    assert "anim.gif" in joined and "scan.tiff" in joined and "not used" in joined
    assert "a.npz" not in joined
    assert "notes" in joined and "Ignored" in joined
    assert scan.num_images == 1


def test_caption_with_bom_is_accepted(tmp_path: Path) -> None:
    d = tmp_path / "1_x"
    make_image(d / "a.png")
    (d / "a.txt").write_bytes("\ufeffcafé, tag".encode())
    assert scan_dataset(tmp_path).entries()[0].caption == "café, tag"


def test_non_utf8_caption_raises(tmp_path: Path) -> None:
    d = tmp_path / "1_x"
    make_image(d / "a.png")
    (d / "a.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    msg = str(ei.value)
    assert "a.txt" in msg and "UTF-8" in msg and "Re-save" in msg


def test_missing_root_and_file_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(f)
    with pytest.raises(DatasetError, match="train_data_dir"):
        scan_dataset("")


def test_images_directly_in_root_raise(tmp_path: Path) -> None:
    make_image(tmp_path / "loose.png")
    make_image(tmp_path / "10_ok" / "a.png")
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    msg = str(ei.value)
    assert "loose.png" in msg and "10_<name>" in msg and str(tmp_path) in msg


def test_folder_without_prefix_with_images_raises(tmp_path: Path) -> None:
    make_image(tmp_path / "my pics" / "a.png")
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    msg = str(ei.value)
    assert "my pics" in msg and "10_my pics" in msg


@pytest.mark.parametrize("name", ["0_name", "-3_name", "1.5_name"])
def test_bad_repeat_counts_raise(tmp_path: Path, name: str) -> None:
    make_image(tmp_path / name / "a.png")
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    msg = str(ei.value)
    assert name in msg and "at least 1" in msg


def test_prefixed_folder_without_images_raises(tmp_path: Path) -> None:
    make_image(tmp_path / "5_good" / "a.png")
    (tmp_path / "5_empty").mkdir()
    (tmp_path / "5_empty" / "a.txt").write_text("orphan caption")
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    assert "5_empty" in str(ei.value) and "no images" in str(ei.value)


def test_empty_dataset_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    assert str(tmp_path) in str(ei.value)
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(DatasetError, match="unrelated"):
        scan_dataset(tmp_path)


def test_corrupt_and_truncated_images_all_listed(tmp_path: Path) -> None:
    d = tmp_path / "2_mix"
    make_image(d / "good1.png")
    make_image(d / "good2.jpg")
    (d / "garbage.png").write_bytes(b"this is not an image at all")
    noise_image(d / "cut.jpg")
    truncate(d / "cut.jpg")
    noise_image(d / "cut.png")
    truncate(d / "cut.png")
    noise_image(d / "cut.webp")
    truncate(d / "cut.webp")

    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    msg = str(ei.value)
    for bad in ("garbage.png", "cut.jpg", "cut.png", "cut.webp"):
        assert bad in msg, f"{bad} missing from: {msg}"
    assert "good1.png" not in msg and "good2.jpg" not in msg
    assert "4 images" in msg
    assert "Re-export" in msg and "delete" in msg
    # verify=False skips decoding (the scan itself still works)
    assert scan_dataset(tmp_path, verify=False).num_images == 6


def test_every_problem_is_listed_in_one_run(tmp_path: Path) -> None:
    """Six problems, one scan: each named with its own message and fix (the texts of the single-problem
    errors above), good folders not mentioned."""
    make_image(tmp_path / "loose.png")
    make_image(tmp_path / "0_zero" / "a.png")
    make_image(tmp_path / "20240101_photos" / "a.png")  # a date, not a repeat count
    make_image(tmp_path / "my pics" / "a.png")
    (tmp_path / "5_empty").mkdir()
    good = tmp_path / "10_good"
    make_image(good / "fine.png")
    make_image(good / "latin.png")
    (good / "latin.txt").write_bytes("café".encode("latin-1"))
    (good / "garbage.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    msg = str(ei.value)
    assert "7 problems" in msg, msg
    expected = [
        ("loose.png", "10_<name>"),
        ("0_zero", "at least 1"),
        ("20240101_photos", "at most 10000"),
        ("my pics", "10_my pics"),
        ("5_empty", "no images"),
        ("latin.txt", "Re-save it as UTF-8"),
        ("garbage.png", "Re-export"),
    ]
    lines = msg.splitlines()
    for name, words in expected:
        line = next((x for x in lines if name in x), None)
        assert line is not None and words in line, (name, msg)
    assert "fine.png" not in msg


def test_single_truncated_png_named(tmp_path: Path) -> None:
    d = tmp_path / "1_x"
    make_image(d / "fine.png")
    noise_image(d / "broken.png")
    truncate(d / "broken.png", 0.9)
    with pytest.raises(DatasetError) as ei:
        scan_dataset(tmp_path)
    assert ei.value.path == str(d / "broken.png")
    assert "truncated" in str(ei.value)


def test_verify_does_not_leave_truncated_loading_on(tmp_path: Path) -> None:
    from PIL import ImageFile

    d = tmp_path / "1_x"
    noise_image(d / "broken.jpg")
    truncate(d / "broken.jpg")
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # something else in the process turned it on
    try:
        with pytest.raises(DatasetError, match="broken.jpg"):
            scan_dataset(tmp_path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_layout_and_captions_do_not_import_torch() -> None:
    code = (
        "import sys; import lora_trainer.dataset.layout, lora_trainer.dataset.captions, "
        "lora_trainer.dataset.steps, lora_trainer.dataset; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------- images


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # Stored 60x30 (landscape); a red block touches the top edge in the middle.
    # EXIF orientation 6 = rotate 90 degrees clockwise to display: 30x60 (portrait),
    # the block lands on the right edge in the middle and survives the centre crop.
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (24, 0, 36, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())

    out = load_image(path, 30)
    assert out.size == (30, 30) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    right_middle = arr[12:18, 23:28].mean(axis=(0, 1))  # rows y, cols x
    left_middle = arr[12:18, 2:7].mean(axis=(0, 1))
    assert right_middle[0] > 200 and right_middle[2] < 60, right_middle
    assert left_middle[2] > 200 and left_middle[0] < 60, left_middle
    # without the rotation the block would be at the top middle of the crop
    top_middle = arr[0:5, 12:18].mean(axis=(0, 1))
    assert top_middle[2] > 200, top_middle


def test_rgba_over_background(tmp_path: Path) -> None:
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 10, 20))
    path = tmp_path / "alpha.png"
    img.save(path)
    out = load_image(path, 20, background=(0, 255, 0))
    assert out.mode == "RGB" and out.size == (20, 20)
    assert out.getpixel((2, 10)) == (255, 0, 0)
    assert out.getpixel((17, 10)) == (0, 255, 0)
    # half-transparent pixels blend
    half = Image.new("RGBA", (8, 8), (255, 255, 255, 128))
    half.save(path)
    px = load_image(path, 8, background=(0, 0, 0)).getpixel((4, 4))
    assert all(120 <= c <= 136 for c in px), px


def test_la_over_background(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (8, 8), (255, 0)).save(path)
    assert load_image(path, 8, background=(10, 20, 30)).getpixel((3, 3)) == (10, 20, 30)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (8, 0, 16, 16))
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    out = load_image(path, 16, background=(0, 0, 255))
    assert out.mode == "RGB"
    assert out.getpixel((2, 8)) == (0, 0, 255)  # transparent index -> background
    assert out.getpixel((13, 8)) == (255, 255, 0)


def test_cmyk_converted(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    r, g, b = load_image(path, 16).getpixel((8, 8))
    assert r < 30 and g > 225 and b > 225  # pure cyan


def test_sixteen_bit_greyscale_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.zeros((8, 24), dtype=np.uint16)
    arr[:, 8:16] = 32768
    arr[:, 16:] = 65535
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path, 8).convert("RGB").resize((24, 8)))  # crop keeps the middle
    loaded = load_image(path, 8)
    mid = loaded.getpixel((4, 4))
    assert mid[0] == mid[1] == mid[2]
    assert 127 <= mid[0] <= 129, mid
    assert out.shape == (8, 24, 3)
    # the full range, without the crop: convert the stored file at its own size
    from lora_trainer.dataset import to_rgb

    for mode, img in (
        ("I;16", Image.open(path)),
        ("I;16B", Image.fromarray(arr.astype(">u2"))),
        ("I", Image.fromarray(arr.astype(np.int32))),
    ):
        rgb = to_rgb(img)
        assert rgb.mode == "RGB", mode
        assert rgb.getpixel((0, 0)) == (0, 0, 0), mode
        assert rgb.getpixel((12, 0))[0] == 128, mode
        assert rgb.getpixel((20, 0)) == (255, 255, 255), mode


def test_float_and_bilevel_and_grey_modes() -> None:
    from lora_trainer.dataset import to_rgb

    f = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert f.mode == "F"
    assert to_rgb(f).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((1, 1)) == (77, 77, 77)


@pytest.mark.parametrize("size", [(100, 40), (40, 100), (33, 33), (7, 5), (512, 513)])
def test_output_is_square_rgb_at_resolution(tmp_path: Path, size: tuple[int, int]) -> None:
    path = make_image(tmp_path / "x.png", size=size)
    out = load_image(path, 24)
    assert out.size == (24, 24) and out.mode == "RGB"


def test_centre_crop_keeps_the_middle(tmp_path: Path) -> None:
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 255, 0), (30, 0, 60, 30))
    path = tmp_path / "wide.png"
    img.save(path)
    out = load_image(path, 30)
    arr = np.asarray(out)
    assert (arr[:, 2:28] == (0, 255, 0)).all()


def test_unreadable_image_raises(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"nope")
    with pytest.raises(DatasetError) as ei:
        load_image(path, 8)
    assert "bad.png" in str(ei.value)


def test_parse_color() -> None:
    assert parse_color("#ffffff") == (255, 255, 255)
    assert parse_color("#0A1b2C") == (10, 27, 44)
    assert parse_color("#fff") == (255, 255, 255)
    with pytest.raises(ConfigError):
        parse_color("white")
    with pytest.raises(ConfigError):
        parse_color("#12345")


def test_image_to_tensor() -> None:
    import torch

    img = Image.new("RGB", (4, 2), (255, 0, 128))
    t = image_to_tensor(img)
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, 2, 4)
    assert torch.allclose(t[0], torch.ones(2, 4))
    assert torch.allclose(t[1], -torch.ones(2, 4))
    assert abs(float(t[2, 0, 0]) - (128 / 127.5 - 1)) < 1e-6
    assert float(t.min()) >= -1 and float(t.max()) <= 1


# ----------------------------------------------------------------- captions

TAGS = "ohwx, woman, red hair, smiling, outdoors, sunset, bokeh"


def test_process_caption_passthrough() -> None:
    rng = random.Random(0)
    assert process_caption("  a photo of ohwx  ", rng) == "a photo of ohwx"


def test_keep_tokens_fixed_under_shuffle() -> None:
    seen_orders = set()
    for seed in range(200):
        out = process_caption(TAGS, random.Random(seed), shuffle=True, keep_tokens=2)
        tags = out.split(", ")
        assert tags[:2] == ["ohwx", "woman"]
        assert sorted(tags[2:]) == sorted(["red hair", "smiling", "outdoors", "sunset", "bokeh"])
        seen_orders.add(tuple(tags[2:]))
    assert len(seen_orders) > 20  # it does shuffle


def test_shuffle_without_keep_tokens_moves_first_tag() -> None:
    firsts = {process_caption(TAGS, random.Random(s), shuffle=True).split(", ")[0] for s in range(100)}
    assert len(firsts) > 3


def test_tag_dropout() -> None:
    for seed in range(50):
        out = process_caption(TAGS, random.Random(seed), keep_tokens=1, tag_dropout_rate=1.0)
        assert out == "ohwx"
    assert process_caption(TAGS, random.Random(1), tag_dropout_rate=1.0) == ""
    kept = [
        len(process_caption(TAGS, random.Random(s), keep_tokens=1, tag_dropout_rate=0.5).split(", ")) - 1
        for s in range(400)
    ]
    mean = sum(kept) / len(kept)
    assert 2.6 < mean < 3.4  # 6 droppable tags, half kept on average
    # without shuffle the survivors keep their order
    out = process_caption(TAGS, random.Random(3), tag_dropout_rate=0.5).split(", ")
    order = TAGS.split(", ")
    assert [order.index(t) for t in out] == sorted(order.index(t) for t in out)


def test_caption_dropout() -> None:
    for seed in range(20):
        assert process_caption(TAGS, random.Random(seed), shuffle=True, caption_dropout_rate=1.0) == ""
    empties = sum(process_caption(TAGS, random.Random(s), caption_dropout_rate=0.25) == "" for s in range(1000))
    assert 180 < empties < 320
    assert all(process_caption(TAGS, random.Random(s), caption_dropout_rate=0.0) == TAGS for s in range(20))


def test_process_caption_deterministic_and_separator() -> None:
    a = [process_caption(TAGS, random.Random(7), shuffle=True, tag_dropout_rate=0.3) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(5)
    seq1 = [process_caption(TAGS, rng, shuffle=True) for _ in range(5)]
    rng = random.Random(5)
    seq2 = [process_caption(TAGS, rng, shuffle=True) for _ in range(5)]
    assert seq1 == seq2
    out = process_caption("a | b | c", random.Random(0), shuffle=True, keep_tokens=1, separator="|")
    assert out.startswith("a, ") and sorted(out.split(", ")) == ["a", "b", "c"]
    # empty parts from a trailing comma are not tags
    assert process_caption("a, b,", random.Random(0), shuffle=True, keep_tokens=5) == "a, b"


# ----------------------------------------------------------------- steps


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(240, 2, 1) == 120
    assert steps_per_epoch(241, 2, 1) == 121
    assert steps_per_epoch(240, 2, 4) == 30
    assert steps_per_epoch(241, 2, 4) == 31  # ceil(121 / 4)
    assert steps_per_epoch(10, 3, 2) == 2  # ceil(ceil(10/3)=4 / 2)
    assert steps_per_epoch(1, 8, 8) == 1
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(10, 0, 1)


def test_total_steps() -> None:
    assert total_steps(240, 2, 1, 10) == (1200, 10)
    assert total_steps(240, 2, 4, 10) == (300, 10)
    assert total_steps(240, 2, 1, 10, max_train_steps=1000) == (1000, 9)  # ceil(1000/120)
    assert total_steps(240, 2, 1, 10, max_train_steps=240) == (240, 2)
    assert total_steps(240, 2, 1, 10, max_train_steps=5) == (5, 1)
    assert total_steps(10, 3, 2, 99, max_train_steps=7) == (7, 4)


def test_describe_steps(tmp_path: Path) -> None:
    for i in range(12):
        make_image(tmp_path / "10_ohwx woman" / f"a{i}.png", size=(8, 8))
        make_image(tmp_path / "10_style" / f"b{i}.png", size=(8, 8))
    scan = scan_dataset(tmp_path, verify=False)
    text = describe_steps(scan, 2, 1, 10, 0)
    first = text.splitlines()[0]
    assert first == (
        "2 folders, 24 images, 240 samples per epoch (images x repeats) / batch 2 / accumulation 1 "
        "= 120 steps per epoch x 10 epochs = 1200 steps"
    )
    assert "10_ohwx woman: 12 images x 10 repeats = 120 samples" in text
    assert "10_style" in text
    capped = describe_steps(scan, 2, 1, 10, 1000)
    assert "1000 steps" in capped and "9 epochs" in capped
