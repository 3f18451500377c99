"""VOC2012 segmentation: reader and masks, paired transforms, metrics, the demo writer and the task (d2l 13.9-13.11)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cvtasks import pictures
from cvtasks import segmentation as seg
from cvtasks.demo import voc as demo
from cvtasks.errors import DataFormatError
from cvtasks.formats import voc
from cvtasks.tasks.voc import VocTask, background_miou, per_class_iou_csv
from tests.configs import at_root, typed_config

CROP = (48, 64)
CFG = typed_config("voc", {
    "data": {"skip_bad": False},
    "model": {"weights": "scratch", "head_lr_mult": 1.0},
    "augment": {"crop_size": list(CROP), "small": "filter", "hflip": 0.5},
})


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def palette_png(indices: np.ndarray) -> bytes:
    img = Image.fromarray(indices.astype(np.uint8))
    img.putpalette(voc.voc_palette().reshape(-1).tolist())
    return png_bytes(img)


def batch_of(frame) -> dict[str, np.ndarray]:
    return {col: frame[col].to_numpy() for col in frame.columns}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc-demo")
    demo.write(root, seed=3, n_train=6, n_val=3, min_side=40, max_side=90)
    return root


# --- masks and the palette ---------------------------------------------------------------------------------------

def test_palette_starts_with_the_class_colormap_and_ends_with_the_boundary_colour():
    palette = voc.voc_palette()
    assert palette.shape == (256, 3)
    assert [tuple(c) for c in palette[: voc.NUM_CLASSES].tolist()] == list(voc.VOC_COLORMAP)
    assert tuple(palette[voc.IGNORE_INDEX].tolist()) == voc.BOUNDARY_COLOR == (224, 224, 192)
    assert voc.VOC_CLASSES[15] == "person" and voc.VOC_COLORMAP[15] == (192, 128, 128)


def test_palette_mask_keeps_indices_and_the_ignore_value():
    indices = np.array([[0, 1, 255], [20, 15, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(voc.decode_mask(palette_png(indices), "m.png"), indices)


def test_palette_mask_with_an_unknown_index_names_file_and_index():
    with pytest.raises(DataFormatError, match=r"bad\.png.*class index 30"):
        voc.decode_mask(palette_png(np.array([[0, 30]])), "bad.png")


def test_rgb_mask_maps_colours_and_the_boundary_colour_to_ignore():
    rgb = np.array([[voc.VOC_COLORMAP[0], voc.VOC_COLORMAP[7]], [voc.BOUNDARY_COLOR, voc.VOC_COLORMAP[20]]],
                   dtype=np.uint8)
    mask = voc.decode_mask(png_bytes(Image.fromarray(rgb)), "rgb.png")
    np.testing.assert_array_equal(mask, [[0, 7], [255, 20]])


def test_rgb_mask_with_an_unknown_colour_names_file_and_colour():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[1, 2] = (1, 2, 3)
    with pytest.raises(DataFormatError, match=r"odd\.png.*\(1, 2, 3\).*row 1, col 2"):
        voc.decode_mask(png_bytes(Image.fromarray(rgb)), "odd.png")


def test_unreadable_mask_names_the_file():
    with pytest.raises(DataFormatError, match="broken.png"):
        voc.decode_mask(b"\x89PNG not really", "broken.png")


def test_mask_and_image_of_different_sizes_fail(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "a.png").write_bytes(palette_png(np.zeros((30, 41))))
    with pytest.raises(DataFormatError, match=r"a\.png: mask is 41x30 .* is 40x30"):
        voc.read_sample(str(tmp_path / "a.jpg"), str(tmp_path / "a.png"))


def test_write_mask_round_trips_through_the_reader(tmp_path):
    mask = np.array([[0, 3], [255, 12]], dtype=np.uint8)
    voc.write_mask(tmp_path / "m.png", mask)
    assert Image.open(tmp_path / "m.png").mode == "P"
    np.testing.assert_array_equal(voc.decode_mask((tmp_path / "m.png").read_bytes(), "m.png"), mask)


# --- the index and the demo ---------------------------------------------------------------------------------------

def test_demo_is_read_back_by_the_reader(demo_root):
    train, val = voc.index(str(demo_root), "train"), voc.index(str(demo_root), "val")
    assert (len(train), len(val)) == (6, 3)
    assert list(train.columns) == ["image_path", "mask_path", "name"]
    sizes, values = set(), set()
    for row in train.itertuples():
        image, mask = voc.read_sample(row.image_path, row.mask_path)
        assert Image.open(row.mask_path).mode == "P"
        sizes.add(image.shape)
        values |= set(np.unique(mask).tolist())
    drawn = {voc.VOC_CLASSES.index(name) for name in demo.LOOKS}
    assert len(sizes) > 1  # varying sizes
    assert voc.IGNORE_INDEX in values and 0 in values and values - {0, voc.IGNORE_INDEX} <= drawn


def test_demo_is_deterministic(tmp_path):
    first = demo.write(tmp_path / "a", seed=1, n_train=2, n_val=1)
    second = demo.write(tmp_path / "b", seed=1, n_train=2, n_val=1)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 3 * 2 + 3  # images + masks, and train/val/trainval lists
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


def test_listed_id_without_files_names_the_missing_file(demo_root, tmp_path):
    listing = tmp_path / voc.DEVKIT_DIR / voc.YEAR_DIR / "ImageSets" / "Segmentation"
    listing.mkdir(parents=True)
    for folder in (voc.IMAGES_DIR, voc.MASKS_DIR):
        (tmp_path / voc.DEVKIT_DIR / voc.YEAR_DIR / folder).mkdir()
    (listing / "train.txt").write_text("\nghost\n")
    with pytest.raises(DataFormatError, match=r"JPEGImages/ghost\.jpg.*row 2"):
        voc.index(str(tmp_path), "train")


def test_missing_split_file_names_it(demo_root):
    with pytest.raises(DataFormatError, match="Segmentation/test.txt"):
        voc.index(str(demo_root), "test")


# --- paired transforms -------------------------------------------------------------------------------------------

def coordinate_sample(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Image whose red/green channels hold each pixel's row/column (blue 0); mask = (row + col) % 20."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    return image, ((rows + cols) % 20).astype(np.uint8)


def test_paired_crop_and_flip_keep_image_and_mask_aligned():
    samples = [coordinate_sample(60, 90), coordinate_sample(30, 50), coordinate_sample(48, 64)]
    images, masks = seg.paired_batch([s[0] for s in samples] * 4, [s[1] for s in samples] * 4, CROP, train=True,
                                     rng=np.random.default_rng(0), hflip_prob=0.5, ignore_index=255)
    assert images.shape == (12, *CROP, 3) and images.dtype == np.uint8
    assert masks.shape == (12, *CROP) and masks.dtype == np.uint8
    pixels = images.astype(np.int64)
    real = pixels[..., 2] == 0
    np.testing.assert_array_equal(masks[real], (pixels[..., 0] + pixels[..., 1])[real] % 20)
    np.testing.assert_array_equal(masks[~real], 255)
    np.testing.assert_array_equal(pixels[~real], np.broadcast_to(seg.PAD_COLOR, pixels[~real].shape))
    assert (~real[1]).any() and real[0].all()  # the 30x50 sample is padded, the 60x90 one only cropped
    column_step = np.diff(pixels[:, :, :, 1], axis=2)[real[:, :, 1:] & real[:, :, :-1]]
    assert set(np.unique(column_step).tolist()) == {-1, 1}  # some crops flipped, some not


def test_paired_batch_equals_crop_then_flip_image_by_image():
    """The batch writes each (possibly mirrored) window in place: the same pixels, for the same draws, as cropping
    each image and flipping the crop."""
    samples = [coordinate_sample(60, 90), coordinate_sample(30, 50), coordinate_sample(48, 64)] * 4
    images, masks = seg.paired_batch([s[0] for s in samples], [s[1] for s in samples], CROP, train=True,
                                     rng=np.random.default_rng(3), hflip_prob=0.5, ignore_index=255)
    rng, crops, crop_masks = np.random.default_rng(3), [], []
    for image, mask in samples:
        image, mask = seg.random_crop_pair(image, mask, CROP, rng, 255)
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        crops.append(image)
        crop_masks.append(mask)
    np.testing.assert_array_equal(images, np.stack(crops))
    np.testing.assert_array_equal(masks, np.stack(crop_masks))


def test_paired_batch_refuses_an_ignore_index_its_uint8_masks_cannot_hold():
    image, mask = coordinate_sample(60, 90)
    with pytest.raises(ValueError, match="ignore_index 256 does not fit the uint8 masks"):
        seg.paired_batch([image], [mask], CROP, train=False, rng=np.random.default_rng(0), hflip_prob=0.5,
                         ignore_index=256)


def test_eval_center_crop_is_deterministic_and_centred():
    image, mask = coordinate_sample(60, 90)
    out_image, out_mask = seg.center_crop_pair(image, mask, CROP, 255)
    assert out_image[0, 0].tolist() == [6, 13, 0] and out_mask[0, 0] == (6 + 13) % 20
    small_image, small_mask = seg.center_crop_pair(*coordinate_sample(44, 60), CROP, 255)
    assert small_image[2, 2].tolist() == [0, 0, 0] and small_mask[1, 1] == 255 and small_mask[2, 2] == 0


# --- metrics -------------------------------------------------------------------------------------------------------

def test_confusion_matrix_and_ious_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = seg.confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert seg.pixel_accuracy(cm) == pytest.approx(5 / 7)
    iou = seg.class_iou(cm)
    torch.testing.assert_close(iou[:3], torch.tensor([2 / 4, 2 / 3, 1 / 2], dtype=torch.float64))
    assert torch.isnan(iou[3])
    assert seg.mean_iou(cm) == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    # all background: IoU(bg) = 3 true bg / 7 labelled pixels, classes 1 and 2 score 0
    assert background_miou(cm) == pytest.approx((3 / 7) / 3)


# --- the task ------------------------------------------------------------------------------------------------------

def decoded(task: VocTask, root, split: str, cfg=CFG) -> dict[str, np.ndarray]:
    return task.decode(batch_of(task.index(split, at_root(cfg, str(root)))), cfg)


def test_decode_filters_or_keeps_images_smaller_than_the_crop(demo_root):
    task = VocTask()
    filtered = decoded(task, demo_root, "train")
    fits = [seg.fits(image.shape, CROP) for image in filtered["image"]]
    assert 0 < sum(fits) < len(fits)  # the fixture draws sides of 40..90 around the 48x64 crop
    np.testing.assert_array_equal(filtered["keep"], fits)
    assert len(task.augment(filtered, True, CFG, np.random.default_rng(0))["mask"]) == sum(fits)
    padded = decoded(task, demo_root, "train", CFG.with_values({"augment.small": "pad"}))
    assert padded["keep"].all()
    with pytest.raises(ValueError, match='Unknown augment.small policy "shrink"'):
        decoded(task, demo_root, "train", CFG.with_values({"augment.small": "shrink"}))


def test_decode_skips_bad_files_only_when_asked(demo_root, tmp_path):
    task = VocTask()
    batch = batch_of(task.index("val", at_root(CFG, str(demo_root))))
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    batch["image_path"] = batch["image_path"].copy()
    batch["image_path"][1] = str(tmp_path / "bad.jpg")
    with pytest.raises(DataFormatError, match="bad.jpg"):
        task.decode(batch, CFG)
    out = task.decode(batch, CFG.with_values({"data.skip_bad": True, "augment.small": "pad"}))
    assert out["keep"].tolist() == [True, False, True]


def test_loss_ignores_boundary_pixels():
    task = VocTask()
    scores = torch.randn(2, 21, 3, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.randint(0, 21, (2, 3, 4), generator=torch.Generator().manual_seed(1))
    mask[0, 0] = 255
    loss, _ = task.loss(scores, {"mask": mask}, CFG)
    valid = mask != 255
    expected = F.cross_entropy(scores.permute(0, 2, 3, 1)[valid], mask[valid])
    torch.testing.assert_close(loss, expected)
    assert float(task.loss(scores, {"mask": torch.full_like(mask, 255)}, CFG)[0]) == 0.0


def test_task_learns_a_batch_and_reports_its_metrics(demo_root):
    torch.manual_seed(0)
    task = VocTask()
    cfg = CFG.with_values({"augment.small": "pad"})
    arrays = task.augment(decoded(task, demo_root, "train", cfg), False, cfg, np.random.default_rng(0))
    batch = {key: torch.from_numpy(value) for key, value in arrays.items()}
    model = task.build_model(cfg)
    groups = task.param_groups(model, cfg)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.Adam([{"params": g["params"], "lr": 1e-3 * g["lr_mult"]} for g in groups])
    losses = []
    for _ in range(6):
        loss, _ = task.loss(task.forward(model, batch), batch, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        sums = task.metric_sums(task.forward(model, batch), batch, cfg)
    assert sums["confusion"].shape == (21, 21)
    labelled = int((batch["mask"] != 255).sum())
    assert int(sums["confusion"].sum()) == labelled
    assert int(sums["ignored_pixels"]) == batch["mask"].numel() - labelled
    metrics = task.summarize(sums, cfg)
    assert set(metrics) == {"pixel_acc", "miou", "background_miou", "ignored_share"}
    assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["pixel_acc"] <= 1

    picture = task.render_predictions(model, batch, cfg)
    assert picture.size == (3 * (CROP[1] + 2) + 2, 4 * (CROP[0] + 2) + 2)
    assert task.render_inputs(arrays, cfg).size == (4 * (CROP[1] + 2) + 2, 2 * (CROP[0] + 2) + 2)
    artifacts = task.extra_artifacts(model, sums, cfg)
    lines = artifacts["metrics/val_per_class_iou.csv"].splitlines()
    assert lines[0] == "class_index,class,iou,true_pixels,predicted_pixels" and len(lines) == 22
    assert artifacts["metrics/val_confusion.json"]["rows_true_cols_predicted"] == sums["confusion"].long().tolist()


def test_per_class_iou_csv_leaves_absent_classes_blank():
    cm = torch.zeros(21, 21, dtype=torch.float64)
    cm[0, 0], cm[7, 7], cm[7, 0] = 6, 3, 1
    lines = per_class_iou_csv(cm).splitlines()
    assert lines[1] == "0,background,0.8571,6,7" and lines[8] == "7,car,0.7500,4,3" and lines[2] == "1,aeroplane,,0,0"


def test_predict_and_writers_handle_any_image_size(tmp_path):
    model = VocTask().build_model(CFG)
    images = [coordinate_sample(50, 70)[0], coordinate_sample(33, 41)[0]]
    masks = seg.predict(model, images)
    assert [m.shape for m in masks] == [(50, 70), (33, 41)] and all(m.dtype == np.uint8 for m in masks)
    assert all(m.max() < voc.NUM_CLASSES for m in masks)
    voc.write_mask(tmp_path / "pred.png", masks[0])
    np.testing.assert_array_equal(voc.decode_mask((tmp_path / "pred.png").read_bytes(), "pred.png"), masks[0])
    voc.write_overlay(tmp_path / "overlay.png", images[1], masks[1])
    assert Image.open(tmp_path / "overlay.png").size == (41, 33)


class RedIsCar(torch.nn.Module):
    """A fixed 'model': scores car (7) by the normalised red channel and background (0) at zero, so pixels redder than
    ImageNet's mean red are predicted car."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # seg.predict reads the device from the parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.full((x.shape[0], voc.NUM_CLASSES, *x.shape[-2:]), -1e3)
        scores[:, 0], scores[:, 7] = 0.0, x[:, 0]
        return scores


def test_predict_files_writes_palette_masks_overlays_and_class_shares(tmp_path):
    image = np.zeros((37, 45, 3), dtype=np.uint8)  # sides not multiples of 32
    image[:, 30:, 0] = 250  # a red band on the right: car
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b").mkdir()
    paths = [tmp_path / "in" / "a" / "street.jpg", tmp_path / "in" / "b" / "street.png"]
    Image.fromarray(image).save(paths[0], quality=100)
    Image.fromarray(image).save(paths[1])
    out = tmp_path / "out"
    out.mkdir()

    written = VocTask().predict_files(RedIsCar(), [str(p) for p in paths], out, CFG)

    assert [p.name for p in written] == ["street_mask.png", "street_overlay.png", "street-2_mask.png",
                                         "street-2_overlay.png", "predictions.json"]
    expected = np.where(np.arange(45) >= 30, 7, 0).astype(np.uint8)[None].repeat(37, axis=0)
    mask_png = Image.open(out / "street-2_mask.png")
    assert mask_png.mode == "P" and mask_png.getpalette()[: 3 * voc.NUM_CLASSES] == list(sum(voc.VOC_COLORMAP, ()))
    np.testing.assert_array_equal(voc.decode_mask((out / "street-2_mask.png").read_bytes(), "m"), expected)
    overlay = np.asarray(Image.open(out / "street-2_overlay.png"))
    np.testing.assert_array_equal(overlay, pictures.overlay(image, expected, voc.voc_palette()))
    records = json.loads((out / "predictions.json").read_text())
    assert records[1] == {"image": str(paths[1]), "mask": "street-2_mask.png", "overlay": "street-2_overlay.png",
                          "class_pixel_share": {"background": round(30 / 45, 4), "car": round(15 / 45, 4)}}


def test_predict_files_runs_the_fcn_on_odd_sizes(tmp_path):
    model = VocTask().build_model(CFG).eval()
    paths = []
    for height, width in ((50, 70), (33, 97)):
        paths.append(str(tmp_path / f"{height}x{width}.png"))
        Image.fromarray(coordinate_sample(height, width)[0]).save(paths[-1])
    VocTask().predict_files(model, paths, tmp_path, CFG)
    assert Image.open(tmp_path / "33x97_mask.png").size == (97, 33)
    assert Image.open(tmp_path / "50x70_overlay.png").size == (70, 50)


def test_overlay_leaves_background_and_tints_objects():
    image = np.full((1, 2, 3), 100, dtype=np.uint8)
    out = pictures.overlay(image, np.array([[0, 1]]), voc.voc_palette(), alpha=0.5)
    assert out.tolist() == [[[100, 100, 100], [114, 50, 50]]]
