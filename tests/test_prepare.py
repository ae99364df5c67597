"""Dataset preparation: repeats, project layout, tag edits, face crops, the report, the CLI and the Prepare tab.

Face tests run on a real photograph (scikit-image's ``astronaut``) with OpenCV's bundled Haar cascade;
they are skipped when scikit-image or OpenCV is missing. The tab test runs under whichever gradio is
installed (3.41 for A1111, 4.40 for Forge) and is skipped without gradio.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lora_trainer.cli import main
from lora_trainer.config import TrainConfig
from lora_trainer.dataset import scan_dataset, steps_per_epoch
from lora_trainer.dataset.faces import (
    center_square_crop,
    crop_images,
    detect_faces,
    enlarge_to,
    face_square_crop,
    fit_square,
    pad_to_square,
)
from lora_trainer.dataset.prepare import (
    edit_captions,
    edit_tags,
    parse_replacements,
    repeats_for,
    set_repeats,
    tag_frequencies,
    write_layout,
)
from lora_trainer.dataset.report import dataset_report
from lora_trainer.errors import DatasetError, MissingPackageError

# ----------------------------------------------------------------- helpers


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under ``root``: equal before and after means untouched."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def gradient_image(size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A smooth image with no face in it."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.astronaut()).convert("RGB")  # 512 x 512, one face near (225, 115)


@pytest.fixture(scope="session")
def cv2_available():
    return pytest.importorskip("cv2")


# ----------------------------------------------------------------- repeats


def test_repeats_count_the_batch_size() -> None:
    r, per_epoch, total, text = repeats_for(1500, images=20, epochs=10, batch_size=2)
    assert (r, per_epoch, total) == (15, 150, 1500)
    # the guides' formula (steps / (images x epochs)) would give 7.5: it holds at batch size 1 only
    assert repeats_for(1500, 20, 10, 1)[0] in (7, 8)
    assert repeats_for(1500, 20, 10, 2, grad_accum=2)[:3] == (30, 150, 1500)
    # the formula shown to the user names the batch size and the numbers
    assert "batch size" in text and "1500 x 2 x 1 / (20 x 10)" in text and "ceil(20 images x 15 repeats / batch 2)" in text
    assert "150 x 10 epochs = 1500" in text


@pytest.mark.parametrize(("target", "images", "epochs", "batch", "accum"), [(1000, 13, 7, 3, 1), (800, 37, 4, 4, 2), (50, 200, 10, 1, 1)])
def test_repeats_are_the_closest_whole_number(target, images, epochs, batch, accum) -> None:
    r, per_epoch, total, _ = repeats_for(target, images, epochs, batch, accum)
    assert per_epoch == steps_per_epoch(images * r, batch, accum) and total == per_epoch * epochs
    best = min(abs(steps_per_epoch(images * k, batch, accum) * epochs - target) for k in range(1, 500))
    assert abs(total - target) == best and r >= 1


def test_repeats_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="images"):
        repeats_for(100, 0, 10, 1)
    with pytest.raises(ValueError, match="batch_size"):
        repeats_for(100, 10, 10, 0)


# ----------------------------------------------------------------- layout


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    src = tmp_path / "originals"
    src.mkdir()
    noise_image((64, 48), 1).save(src / "a.png")
    noise_image((48, 64), 2).save(src / "b.jpg", quality=95)
    noise_image((40, 40), 3).convert("CMYK").save(src / "c.tif")  # a format the trainer does not read
    (src / "b.txt").write_text("photo of ohwx, smiling", encoding="utf-8")
    return src


def test_layout_writes_the_kohya_folders_and_leaves_originals_alone(sources: Path, tmp_path: Path) -> None:
    before = tree_state(sources)
    project = tmp_path / "project"
    res = write_layout(project, "ohwx woman", sources, 15, captions={"a.png": "ohwx woman, red background"})
    assert tree_state(sources) == before  # originals untouched (content and modification time)
    subset = project / "img" / "15_ohwx woman"
    assert res.subset_dir == subset and (project / "model").is_dir() and (project / "log").is_dir()
    assert sorted(p.name for p in subset.iterdir()) == ["a.png", "a.txt", "b.jpg", "b.txt", "c.png"]
    assert (subset / "a.png").read_bytes() == (sources / "a.png").read_bytes()  # copied byte for byte
    assert (subset / "b.jpg").read_bytes() == (sources / "b.jpg").read_bytes()
    with Image.open(subset / "c.png") as im:
        assert im.mode == "RGB" and im.size == (40, 40)  # TIFF/CMYK converted
    assert (subset / "a.txt").read_text(encoding="utf-8") == "ohwx woman, red background"  # from the dict
    assert (subset / "b.txt").read_text(encoding="utf-8") == "photo of ohwx, smiling"  # copied along
    assert [p.name for p in res.without_caption] == ["c.png"]
    assert res.config_values() == {
        "train_data_dir": str(project / "img"), "output_dir": str(project / "model"), "logging_dir": str(project / "log"),
    }
    # the trainer's own scan reads the result
    scan = scan_dataset(project / "img")
    assert [(s.name, s.repeats, len(s.images)) for s in scan.subsets] == [("ohwx woman", 15, 3)]
    assert "15_ohwx woman" in res.summary()


def test_layout_never_overwrites_silently(sources: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    write_layout(project, "ohwx", sources, 10)
    again = write_layout(project, "ohwx", sources, 10)  # the same files: nothing to do, no error
    assert len(again.unchanged) == 3 and not again.copied and not again.converted
    subset = project / "img" / "10_ohwx"
    (subset / "a.png").write_bytes(b"edited by the user")
    (sources / "d.png").write_bytes((sources / "a.png").read_bytes())
    with pytest.raises(DatasetError, match="a.png") as e:
        write_layout(project, "ohwx", sources, 10)
    assert "nothing was written" in str(e.value)
    assert not (subset / "d.png").exists() and (subset / "a.png").read_bytes() == b"edited by the user"
    # a second repeat count for the same name would train the images twice
    with pytest.raises(DatasetError, match="10_ohwx"):
        write_layout(project, "ohwx", sources, 20)
    res = write_layout(project, "ohwx", sources, 10, overwrite=True)
    assert (subset / "a.png").read_bytes() == (sources / "a.png").read_bytes() and (subset / "d.png").exists()
    assert subset / "a.png" in res.copied
    assert not list(project.rglob(".*.tmp"))


def test_layout_refuses_two_sources_with_one_stem(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    noise_image((32, 32), 1).save(src / "x.png")
    noise_image((32, 32), 2).save(src / "x.jpg")
    with pytest.raises(DatasetError, match="same name"):
        write_layout(tmp_path / "p", "n", src, 5)
    assert not (tmp_path / "p").exists()


def test_set_repeats_renames_the_folder(sources: Path, tmp_path: Path) -> None:
    res = write_layout(tmp_path / "p", "ohwx", sources, 10)
    new = set_repeats(res.subset_dir, 4)
    assert new.name == "4_ohwx" and new.is_dir() and not res.subset_dir.exists()
    with pytest.raises(DatasetError, match="at most 10000"):
        set_repeats(new, 20240101)
    assert new.is_dir()


@pytest.mark.parametrize(
    "name, repeats, words",
    [
        ("ohwx.", 10, "end with a dot"),
        ("x" * 253, 10, "at most 255 bytes"),  # "10_" + 253 = 256 bytes
        ("é" * 127, 1, "at most 255 bytes"),  # 2 bytes each: "1_" + 254 = 256 bytes
        ("tab\tname", 10, "control characters"),
        ("ohwx", 20240101, "at most 10000"),
        ("ohwx", 0, "at least 1"),
    ],
)
def test_layout_refuses_names_and_repeats_windows_or_training_cannot_use(
    sources: Path, tmp_path: Path, name: str, repeats: int, words: str
) -> None:
    with pytest.raises(DatasetError, match=words):
        write_layout(tmp_path / "p", name, sources, repeats)
    assert not (tmp_path / "p").exists()
    # the longest name that fits is written
    assert write_layout(tmp_path / "q", "x" * 252, sources, 10).subset_dir.name == "10_" + "x" * 252


# ----------------------------------------------------------------- tags


def test_edit_tags_order_of_operations() -> None:
    tags = ["1girl", "smiling", "ohwx", "blurry", "Smiling", "red  hair"]
    out = edit_tags(tags, trigger="ohwx", remove=["blurry"], replace={"1girl": "woman, adult", "red hair": "auburn hair"}, dedupe=True)
    assert out == ["ohwx", "woman", "adult", "smiling", "auburn hair"]
    assert edit_tags(["a", "b"], replace={"b": ""}) == ["a"]
    assert parse_replacements("1girl=woman\nold -> new; x=") == {"1girl": "woman", "old": "new", "x": ""}


@pytest.fixture
def captions_dir(tmp_path: Path) -> Path:
    root = tmp_path / "img"
    (root / "10_a").mkdir(parents=True)
    (root / "5_b").mkdir(parents=True)
    (root / "10_a" / "1.txt").write_text("1girl, smiling, blurry, smiling", encoding="utf-8")
    (root / "10_a" / "2.txt").write_text("\ufeffportrait, 1girl", encoding="utf-8")  # with a BOM
    (root / "5_b" / "3.txt").write_text("ohwx, outdoors", encoding="utf-8")
    for stem, folder in (("1", "10_a"), ("2", "10_a"), ("3", "5_b"), ("4", "5_b")):
        Image.new("RGB", (8, 8)).save(root / folder / f"{stem}.png")
    return root


def test_tag_edits_apply_to_every_caption(captions_dir: Path) -> None:
    res = edit_captions(captions_dir, trigger="ohwx", remove=["blurry"], replace={"1girl": "woman"}, dedupe=True, create_missing=True)
    read = {p.name: p.read_text(encoding="utf-8") for p in captions_dir.rglob("*.txt")}
    assert read == {
        "1.txt": "ohwx, woman, smiling",
        "2.txt": "ohwx, portrait, woman",
        "3.txt": "ohwx, outdoors",  # already right: not rewritten
        "4.txt": "ohwx",  # the image had no caption
    }
    assert sorted(p.name for p in res.changed) == ["1.txt", "2.txt"] and [p.name for p in res.created] == ["4.txt"]
    assert res.files == 3 and not list(captions_dir.rglob(".*.tmp"))
    assert tag_frequencies(captions_dir) == [("ohwx", 4), ("woman", 2), ("outdoors", 1), ("portrait", 1), ("smiling", 1)]


def test_tag_dry_run_and_bad_files_change_nothing(captions_dir: Path) -> None:
    before = tree_state(captions_dir)
    res = edit_captions(captions_dir, trigger="ohwx", dry_run=True)
    assert len(res.changed) == 2 and res.dry_run and tree_state(captions_dir) == before
    (captions_dir / "5_b" / "bad.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    before = tree_state(captions_dir)
    with pytest.raises(DatasetError, match="UTF-8"):
        edit_captions(captions_dir, trigger="ohwx")
    assert tree_state(captions_dir) == before  # all captions are read before the first is written


# ----------------------------------------------------------------- faces and crops


def test_face_found_on_a_real_photograph(astronaut, cv2_available) -> None:
    faces = detect_faces(astronaut)
    assert faces, "no face found on the astronaut photograph"
    x, y, w, h = faces[0]
    assert x < 225 < x + w and y < 115 < y + h  # her face
    assert 60 <= w <= 160


@pytest.mark.parametrize("margin", [0.3, 0.5, 0.6])
def test_face_square_crop_holds_the_face_with_the_margin(astronaut, cv2_available, margin) -> None:
    res = face_square_crop(astronaut, margin=margin, size=256)
    assert res.image.size == (256, 256) and res.image.mode == "RGB"
    assert not res.fell_back and res.face is not None
    x, y, w, h = res.face
    left, top, right, bottom = res.crop_box
    side = right - left
    assert bottom - top == side and abs(side - max(w, h) * (1 + 2 * margin)) <= 1
    m = margin * max(w, h)
    assert left <= x - m + 1 and top <= y - m + 1 and right >= x + w + m - 1 and bottom >= y + h + m - 1
    assert res.margin == pytest.approx(margin, abs=0.01)
    assert res.enlarged == (side < 256)
    # the crop really shows the face: found again in the output, near its centre
    fx, fy, fw, fh = detect_faces(res.image)[0]
    assert abs(fx + fw / 2 - 128) < 40 and abs(fy + fh / 2 - 128) < 40


def test_large_margin_is_shifted_inside_and_big_images_are_not_enlarged(astronaut, cv2_available) -> None:
    big = astronaut.resize((1536, 1536), Image.Resampling.LANCZOS)
    res = face_square_crop(big, margin=1.5, size=512)
    left, top, right, bottom = res.crop_box
    assert 0 <= left and 0 <= top and right <= 1536 and bottom <= 1536
    x, y, w, h = res.face
    assert left <= x and top <= y and right >= x + w and bottom >= y + h
    assert res.image.size == (512, 512) and not res.enlarged  # reduced, never enlarged


def test_no_face_falls_back_to_centre_crop(cv2_available) -> None:
    res = face_square_crop(gradient_image((320, 240)), margin=0.5, size=128)
    assert res.fell_back and res.face is None and res.crop_box == (40, 0, 280, 240)
    assert res.image.size == (128, 128)


def test_crop_images_reports_fallbacks_and_keeps_originals(astronaut, cv2_available, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    astronaut.save(src / "astronaut.png")
    gradient_image().save(src / "sky.jpg")
    (src / "astronaut.txt").write_text("ohwx woman", encoding="utf-8")
    before = tree_state(src)
    out = tmp_path / "crops"
    rep = crop_images(src, out, mode="face", size=256, margin=0.5)
    assert tree_state(src) == before
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "astronaut.txt", "sky.png"]
    assert [p.name for p in rep.fell_back] == ["sky.jpg"]
    assert "no face found" in rep.summary() and "sky.jpg" in rep.summary()
    for p in rep.written:
        with Image.open(p) as im:
            assert im.size == (256, 256) and im.mode == "RGB"
    with pytest.raises(DatasetError, match="exist"):
        crop_images(src, out, mode="face", size=256)
    crop_images(src, out, mode="pad", size=256, overwrite=True)


def test_missing_opencv_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    from lora_trainer.dataset import faces

    faces._cascade.cache_clear()
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    try:
        with pytest.raises(MissingPackageError, match="opencv-python-headless"):
            detect_faces(gradient_image())
        assert not faces.faces_available()
        # centre crops and padding need no OpenCV
        gradient_image().save(tmp_path / "g.png")
        rep = crop_images([tmp_path / "g.png"], tmp_path / "out", mode="center", size=64)
        assert len(rep.written) == 1
        assert not dataset_report(tmp_path / "out").faces_checked
    finally:
        faces._cascade.cache_clear()


def test_pad_fit_and_enlarge_rules() -> None:
    red = Image.new("RGB", (300, 200), (255, 0, 0))
    sq = pad_to_square(red, "#00ff00")
    assert sq.size == (300, 300) and sq.getpixel((0, 0)) == (0, 255, 0) and sq.getpixel((150, 150)) == (255, 0, 0)
    assert center_square_crop(red).size == (200, 200)
    calls = []

    def upscaler(img, scale):
        calls.append(scale)
        return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)

    out, enlarged = fit_square(Image.new("RGB", (600, 600)), 512, upscaler)
    assert out.size == (512, 512) and not enlarged and calls == []  # a big-enough picture is never enlarged
    out, enlarged = fit_square(Image.new("RGB", (128, 128)), 512, upscaler)
    assert out.size == (512, 512) and enlarged and calls == [4.0]  # the host's upscaler hook
    out, enlarged = fit_square(Image.new("RGB", (128, 128)), 512)
    assert out.size == (512, 512) and enlarged  # LANCZOS without a hook
    img = Image.new("RGB", (600, 400))
    assert enlarge_to(img, 256) == (img, False)
    out, enlarged = enlarge_to(Image.new("RGB", (200, 100)), 256)
    assert out.size == (512, 256) and enlarged


# ----------------------------------------------------------------- report


@pytest.fixture
def report_dir(tmp_path: Path, astronaut) -> Path:
    d = tmp_path / "raw"
    d.mkdir()
    astronaut.save(d / "astronaut.png")
    (d / "astronaut.txt").write_text("ohwx woman", encoding="utf-8")
    astronaut.resize((400, 400), Image.Resampling.LANCZOS).save(d / "astronaut_copy.jpg", quality=85)  # near-duplicate
    astronaut.filter(ImageFilter.GaussianBlur(3)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(d / "blurred.png")
    noise_image((120, 90), 4).save(d / "small.png")
    noise_image((600, 600), 5).convert("CMYK").save(d / "cmyk.jpg")
    rgba = noise_image((600, 600), 6).convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(d / "alpha.png")
    Image.fromarray((np.random.default_rng(7).integers(0, 65535, (600, 600))).astype(np.uint16)).save(d / "deep.png")
    return d


def test_report_finds_what_hurts_training_and_changes_nothing(report_dir: Path) -> None:
    before = tree_state(report_dir)
    rep = dataset_report(report_dir, resolution=512, faces=False)
    assert tree_state(report_dir) == before  # nothing changed by looking
    by_name = {i.path.name: i for i in rep.images}
    assert len(rep.images) == 7
    assert (by_name["astronaut.png"].width, by_name["astronaut.png"].height) == (512, 512)
    assert {i.path.name for i in rep.below_resolution()} == {"astronaut_copy.jpg", "small.png"}
    assert "blurred.png" in {i.path.name for i in rep.blurry()}
    assert "astronaut.png" not in {i.path.name for i in rep.blurry()}
    pairs = {frozenset((a.name, b.name)) for a, b, _ in rep.duplicates}
    assert frozenset(("astronaut.png", "astronaut_copy.jpg")) in pairs
    assert not any("small.png" in p or "cmyk.jpg" in p for p in pairs)
    assert {i.path.name for i in rep.missing_captions()} == set(by_name) - {"astronaut.png"}
    modes = {i.path.name: [s for s in i.issues if s.startswith("mode:")] for i in rep.unusual_modes()}
    assert set(modes) == {"cmyk.jpg", "alpha.png", "deep.png"}
    assert "CMYK" in modes["cmyk.jpg"][0] and "16-bit" in modes["deep.png"][0] and "transparency" in modes["alpha.png"][0]
    summary = rep.summary()
    assert "7 images" in summary and "near-duplicate" in summary and "faces: not checked" in summary
    assert len(rep.rows()) == 7 and json.loads(rep.to_json())["resolution"] == 512


def test_report_counts_faces(report_dir: Path, cv2_available) -> None:
    rep = dataset_report(report_dir, faces=True)
    by_name = {i.path.name: i for i in rep.images}
    assert by_name["astronaut.png"].faces == 1
    assert by_name["cmyk.jpg"].faces == 0 and "no face found" in by_name["cmyk.jpg"].issues


# ----------------------------------------------------------------- CLI


def test_cli_prepare_commands(capsys, sources: Path, tmp_path: Path) -> None:
    assert main(["prepare", "repeats", "--steps", "1500", "--count", "20", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "-> 15" in out and "batch 2" in out and "= 1500" in out

    project = tmp_path / "proj"
    assert main(["prepare", "layout", str(project), "--name", "ohwx", "--images", str(sources), "--steps", "30",
                 "--epochs", "2", "--batch", "1"]) == 0
    assert (project / "img" / "5_ohwx" / "a.png").is_file()  # 30 x 1 / (3 x 2) = 5
    capsys.readouterr()

    assert main(["prepare", "tags", str(project / "img"), "--trigger", "ohwx", "--replace", "smiling=happy"]) == 0
    assert (project / "img" / "5_ohwx" / "b.txt").read_text(encoding="utf-8") == "ohwx, photo of ohwx, happy"
    assert main(["prepare", "tags", str(project / "img"), "--freq"]) == 0
    assert "ohwx" in capsys.readouterr().out

    assert main(["prepare", "report", str(project / "img"), "--json", "--no-faces"]) == 0
    assert len(json.loads(capsys.readouterr().out)["images"]) == 3

    kohya = tmp_path / "k.json"
    kohya.write_text(json.dumps({"network_dim": "48", "max_resolution": "640,640", "flip_aug": True}), encoding="utf-8")
    toml = tmp_path / "k.toml"
    assert main(["prepare", "import-kohya", str(kohya), "--out", str(toml)]) == 0
    err = capsys.readouterr().err
    assert "flip_aug" in err
    cfg = TrainConfig.load(toml)
    assert cfg.network_dim == 48 and cfg.resolution == 640
    assert main(["prepare", "import-kohya", str(kohya), "--out", str(toml)]) == 2  # exists: refused
    capsys.readouterr()
    assert main(["prepare", "export-kohya", "--config", str(toml)]) == 0
    assert json.loads(capsys.readouterr().out)["network_dim"] == 48

    assert main(["prepare", "preset"]) == 0
    assert "Realistic face, SD1.5" in capsys.readouterr().out
    assert main(["prepare", "preset", "Realistic face, SD1.5"]) == 0
    face = tmp_path / "face.toml"
    face.write_text(capsys.readouterr().out, encoding="utf-8")
    assert TrainConfig.load(face).network_dim == 128


# ----------------------------------------------------------------- the Prepare tab


class _Upload:
    """What gradio 3.41 hands a handler for an uploaded file (4.40 hands the path string)."""

    def __init__(self, name: str):
        self.name = name


def _check_actions(act, sources: Path, tmp_path: Path, published: list) -> None:
    table, summary = act.report(str(sources), 512, ".txt", False)
    assert "3 images" in summary and len(table["data"]) == 3 and table["headers"][0] == "file"
    r, formula = act.repeats(str(sources), 30, 2, 1, 1)
    assert r == 5 and "batch 1" in formula
    summary, toml, state = act.layout(str(tmp_path / "proj"), "ohwx", str(sources), r, ".txt", False, False, act.initial_state())
    assert "5_ohwx" in summary and state["train_data_dir"] == str(tmp_path / "proj" / "img")
    assert published[-1].train_data_dir == state["train_data_dir"]
    msg = act.edit_tags(str(tmp_path / "proj" / "img"), ".txt", "ohwx", "smiling", "", True, True, False)
    assert "changed" in msg
    freq = act.tag_frequencies(str(tmp_path / "proj" / "img"), ".txt")
    assert freq["data"][0] == ["ohwx", 3]
    toml, msg, state = act.apply_preset("Realistic face, SD1.5", state)
    assert "applied" in msg and state["network_dim"] == 128 and state["train_data_dir"] == str(tmp_path / "proj" / "img")
    assert "network_dim = 128" in toml
    assert "Saved" in act.save_preset("mine", state, False)
    assert "mine" in act.preset_names()
    kohya = tmp_path / "k.json"
    kohya.write_text(json.dumps({"network_dim": 24, "LoRA_type": "Kohya LoCon", "flip_aug": True}), encoding="utf-8")
    for upload in (_Upload(str(kohya)), str(kohya)):
        toml, notes, st = act.import_kohya(upload, "", state)
        assert st["network_dim"] == 24 and st["network_type"] == "LoCon" and "flip_aug" in notes
    _toml, notes, _st = act.import_kohya(None, str(tmp_path / "missing.json"), state)
    assert notes.startswith("Error")
    assert "Written" in act.export_kohya(str(tmp_path / "out.json"), st, False)
    assert "exists" in act.export_kohya(str(tmp_path / "out.json"), st, False)
    crop_msg, gallery = act.crop(str(sources), str(tmp_path / "crops"), "pad", 64, 0.5, "#000000", False)
    assert "3 images written" in crop_msg and len(gallery) == 3
    assert act.report(str(tmp_path / "nowhere"), 512, ".txt", False)[1].startswith("Error")


def test_prepare_actions_work_without_gradio(sources: Path, tmp_path: Path) -> None:
    from lora_trainer.ui.prepare_tab import PrepareActions

    published: list[TrainConfig] = []
    act = PrepareActions(TrainConfig(output_name="anna"), tmp_path / "presets", published.append)
    _check_actions(act, sources, tmp_path, published)
    assert len(published) == 4 and all(c.output_name == "anna" for c in published)  # run fields kept throughout


def test_prepare_tab_builds_and_its_handlers_work(sources: Path, tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio")
    from lora_trainer.ui.prepare_tab import build_prepare_tab

    published: list[TrainConfig] = []
    tab = build_prepare_tab(defaults=lambda: TrainConfig(output_name="anna"), user_preset_dir=tmp_path / "presets",
                            on_config=published.append)
    assert isinstance(tab, gr.Blocks)
    prep = tab.lora_trainer_prepare
    assert "Realistic face, SD1.5" in [c[0] if isinstance(c, (tuple, list)) else c for c in prep["preset_dropdown"].choices]
    _check_actions(prep["actions"], sources, tmp_path, published)
    # the wrapped handlers and the components' own output processing accept what the handlers return
    msg, update = prep["handlers"]["save_preset"]("another", published[-1].to_dict(), False)
    assert "Saved" in msg and "another" in str(update)
    table, _ = prep["handlers"]["report"](str(sources), 512, ".txt", False)
    prep["outputs"]["report_table"].postprocess(table)
    prep["outputs"]["freq_table"].postprocess(prep["handlers"]["tag_frequencies"](str(tmp_path / "nowhere"), ".txt"))
    _msg, gallery = prep["handlers"]["crop"](str(sources), str(tmp_path / "crops2"), "center", 64, 0.5, "#000000", False)
    prep["outputs"]["crop_gallery"].postprocess(gallery)


def test_prepare_tab_nests_in_a_parent_and_fills_its_form(tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio")
    from lora_trainer.ui.prepare_tab import build_prepare_tab, connect_to_form

    with gr.Blocks() as parent:
        with gr.Tab("Prepare"):
            prep = build_prepare_tab(defaults=TrainConfig(output_name="anna"))
        with gr.Tab("Train"):
            dim = gr.Number(label="network_dim")
            name = gr.Textbox(label="output_name")
        to_form = connect_to_form(prep, [dim, name], ["network_dim", "output_name"])
    assert isinstance(parent, gr.Blocks)
    _toml, _msg, state = prep.lora_trainer_prepare["actions"].apply_preset("Realistic face, SD1.5", None)
    assert to_form(state) == [128, "anna"]
