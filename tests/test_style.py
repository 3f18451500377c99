"""Neural style transfer: losses against hand-computed values, explicit weights, image input, VGG features, and the
pipeline's pure parts (pairs, metrics, sweep plan). Fast: no Ray, tiny images."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.vgg import cfgs, make_layers

from cvtasks.errors import DataFormatError
from cvtasks.models import vgg
from cvtasks.style import (
    MIN_IMAGE_SIDE,
    LossWeights,
    StyleConfig,
    contact_sheet,
    content_loss,
    demo_image,
    demo_specs,
    gram,
    load_image,
    loss_terms,
    open_image,
    postprocess,
    preprocess,
    seeded_extractor,
    style_loss,
    stylize,
    tv_loss,
)
from pipelines.config import ConfigError, load_config


def save(img: Image.Image, path, fmt: str = "PNG") -> str:
    img.save(path, format=fmt)
    return str(path)


# ------------------------------------------------------------------------------------------------------- losses

def test_gram_is_normalised_by_channels_times_pixels():
    x = torch.arange(8.0).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    # sum_p x_i x_j: 0+1+4+9 = 14, 0*4+1*5+2*6+3*7 = 38, 16+25+36+49 = 126; divided by C*H*W = 8
    assert torch.allclose(gram(x), torch.tensor([[[14.0, 38.0], [38.0, 126.0]]]) / 8)


def test_content_and_style_losses_are_mean_squared_errors():
    y_hat, y = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    assert content_loss(y_hat, y).item() == pytest.approx(1.0)
    x = torch.arange(8.0).reshape(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2)
    expected = ((14 / 8) ** 2 + 2 * (38 / 8) ** 2 + (126 / 8) ** 2) / 4
    assert style_loss(x, target).item() == pytest.approx(expected)
    assert style_loss(x, gram(x)).item() == 0.0


def test_tv_loss_known_value():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # vertical |2-0|, |3-1| -> mean 2; horizontal |1-0|, |3-2| -> mean 1; 0.5 * (2 + 1)
    assert tv_loss(x).item() == pytest.approx(1.5)
    assert tv_loss(torch.full((1, 3, 4, 5), 0.7)).item() == 0.0


def test_loss_terms_sum_layers_and_weights_are_applied_once():
    a, b = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    terms = loss_terms(torch.zeros(1, 3, 4, 4), [a, a], [a, b], [b, b], [gram(b), gram(b)])
    assert terms["content"].item() == pytest.approx(2.0)  # two content layers, MSE 1 each
    assert terms["style"].item() == pytest.approx((0.5**2) * 1.0)  # gram(ones) = 4/8 everywhere; b matches
    weighted = LossWeights().weigh({"content": 1.0, "style": 1.0, "tv": 1.0})
    assert weighted == {"content": 1.0, "style": 1e4, "tv": 10.0}  # style x1e4 exactly once (d2l erratum 6)
    assert LossWeights(2.0, 3.0, 4.0).total({"content": 1.0, "style": 10.0, "tv": 100.0}) == 432.0


def test_config_weights_are_explicit_numbers_with_the_book_defaults():
    cfg = load_config("style")
    loss = cfg.loss
    assert all(isinstance(v, float) for v in dataclasses.asdict(loss).values())
    assert (loss.content_weight, loss.style_weight, loss.tv_weight) == (1.0, 10000.0, 10.0)
    style = StyleConfig.from_config(cfg)
    assert style.loss == LossWeights() == style.reference
    assert (style.lr, style.lr_step, style.lr_gamma) == (0.3, 50, 0.8)
    assert style.style_layers == (0, 5, 10, 19, 28) and style.content_layers == (25,)
    assert StyleConfig.from_config(load_config("style", overrides=["loss.style_weight=1e5"])).loss.style == 1e5
    with pytest.raises(ValueError, match="sides >= 32"):
        StyleConfig.from_config(load_config("style", overrides=["style.size=[16, 64]"]))
    with pytest.raises(ValueError, match="adam only"):
        StyleConfig.from_config(load_config("style", overrides=["optim.name=sgd"]))


# --------------------------------------------------------------------------------------------------- image input

def test_grayscale_rgba_palette_and_16bit_are_converted(tmp_path):
    gray = load_image(save(Image.new("L", (40, 36), 77), tmp_path / "g.png"))
    assert gray.mode == "RGB" and gray.size == (40, 36) and gray.getpixel((0, 0)) == (77, 77, 77)
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue: shows the white background
    rgb = load_image(save(rgba, tmp_path / "a.png"))
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((5, 5)) == (255, 0, 0)
    la = load_image(save(Image.new("LA", (40, 40), (0, 128)), tmp_path / "la.png"))
    assert la.getpixel((0, 0)) == (127, 127, 127)  # black at half alpha over white
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 1
    assert load_image(save(palette, tmp_path / "p.png")).getpixel((3, 3)) == (255, 255, 255)
    deep = np.full((40, 40), 65535, np.uint16)
    deep[0, 0] = 257 * 100
    converted = load_image(save(Image.fromarray(deep), tmp_path / "d.png"))
    assert converted.getpixel((1, 1)) == (255, 255, 255) and converted.getpixel((0, 0)) == (100, 100, 100)
    cmyk = load_image(save(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), tmp_path / "c.jpg", "JPEG"))
    assert cmyk.mode == "RGB" and min(cmyk.getpixel((5, 5))) > 240


def test_bad_images_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"missing\.png.*cannot read"):
        load_image(str(tmp_path / "missing.png"))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataFormatError, match=r"notes\.png.*not a readable image"):
        load_image(str(text))
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(DataFormatError, match=r"cut\.png"):
        load_image(str(truncated))
    with pytest.raises(DataFormatError, match=rf"tiny\.png.*20x40.*at least {MIN_IMAGE_SIDE} px"):
        load_image(save(Image.new("RGB", (20, 40)), tmp_path / "tiny.png"))
    with pytest.raises(ValueError, match="unknown demo image"):
        open_image("skimage:nope")


def test_demo_images_open_offline_as_rgb():
    for content, style in demo_specs():
        for spec in (content, style):
            img = open_image(spec)
            assert img.mode == "RGB" and min(img.size) >= MIN_IMAGE_SIDE
    assert demo_image("brick").mode == "RGB"  # a grayscale texture, converted


def test_preprocess_postprocess_round_trip():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    x = preprocess(img, (40, 48))
    assert x.shape == (1, 3, 40, 48) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 1.0  # ImageNet-normalised
    back = np.asarray(postprocess(x), dtype=int)
    assert np.abs(back - np.asarray(img, dtype=int)).max() <= 1
    assert postprocess(torch.full((3, 8, 8), 100.0)).getpixel((0, 0)) == (255, 255, 255)  # clamped
    assert preprocess(img, (32, 64)).shape == (1, 3, 32, 64)  # resized without keeping the aspect ratio


# ------------------------------------------------------------------------------------------------- VGG features

def test_vgg_layers_match_torchvision_and_are_truncated(tmp_path):
    ours = torch.nn.Sequential(*vgg.vgg19_feature_layers())
    theirs = make_layers(cfgs["E"])
    assert len(ours) == len(theirs) == vgg.NUM_FEATURE_LAYERS
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    state = {f"features.{k}": v for k, v in theirs.state_dict().items()}  # as in a full vgg19 state dict
    torch.save(state, tmp_path / "vgg.pth")
    extractor = vgg.build_vgg_features(str(tmp_path / "vgg.pth"))
    assert extractor.pretrained and extractor.weights_description.startswith("file:")
    assert len(extractor.layers) == 29  # up to conv5_1 (index 28), nothing after it
    assert torch.equal(extractor.layers[28].weight, theirs[28].weight)
    contents, styles = extractor.extract(torch.zeros(1, 3, 32, 32))
    assert [y.shape[1] for y in styles] == [64, 128, 256, 512, 512] and contents[0].shape == (1, 512, 4, 4)
    with pytest.raises(ValueError, match="VGG-19 feature layers are 0..36"):
        vgg.VGGFeatures(style_layers=(0, 40))


def test_random_init_is_loud_seeded_and_calibrated(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    state, description = vgg.resolve_vgg_weights("auto")
    assert state is None and description.startswith("random-init") and "vgg19-dcbb9e9d.pth is missing" in description
    with pytest.raises(DataFormatError, match="no such weights file"):
        vgg.resolve_vgg_weights(str(tmp_path / "none.pth"))
    cfg = StyleConfig(size=(32, 32), weights="random")
    a, b = seeded_extractor(cfg), seeded_extractor(cfg)
    assert not a.pretrained and torch.equal(a.layers[28].weight, b.layers[28].weight)
    torch.manual_seed(1)
    _, styles = a.extract(torch.randn(1, 3, 64, 64))
    # calibrated: every style layer's output near RANDOM_FEATURE_STD (uncalibrated conv5_1 would be ~100x smaller)
    assert all(0.5 < y.std().item() / vgg.RANDOM_FEATURE_STD < 2.0 for y in styles)


def test_stylize_yields_every_step_images_every_k_and_is_deterministic():
    cfg = StyleConfig(size=(32, 32), steps=5, log_every=2, weights="random", lr_step=2, lr_gamma=0.5)
    content, style = demo_image("chelsea"), demo_image("brick")
    extractor = seeded_extractor(cfg)
    results = list(stylize(content, style, cfg, extractor=extractor))
    assert [r.step for r in results] == [1, 2, 3, 4, 5]
    assert [r.image is not None for r in results] == [False, True, False, True, True]
    assert [r.lr for r in results] == [0.3, 0.3, 0.15, 0.15, 0.075]  # StepLR every lr_step steps
    first = results[0]
    assert first.terms["content"] == 0.0  # the synthesised image starts as the content image
    assert first.losses["style"] == pytest.approx(1e4 * first.terms["style"])
    assert first.losses["total"] == pytest.approx(sum(first.losses[k] for k in ("content", "style", "tv")))
    again = list(stylize(content, style, cfg, extractor=extractor))
    assert [r.losses for r in again] == [r.losses for r in results]


def test_contact_sheet_lays_out_captioned_tiles():
    images = [Image.new("RGB", (96, 64), c) for c in ("red", "green", "blue")]
    sheet = contact_sheet(images, [["a 1"], ["b 2"], ["c 3"]], columns=2)
    assert sheet.width > 2 * 96 and sheet.height > 2 * 64


# ------------------------------------------------------------------------------------------ pipeline (no Ray)

def test_cli_pairs_and_names():
    from pipelines.style import absolute_spec, cli_pairs, configured_pairs, pair_name

    assert cli_pairs(["a.png", "b.png"], ["s.png"], demo=False) == [["a.png", "s.png"], ["b.png", "s.png"]]
    assert cli_pairs(["a.png"], ["s.png", "t.png"], demo=False) == [["a.png", "s.png"], ["a.png", "t.png"]]
    assert len(cli_pairs([], [], demo=True)) == 3
    with pytest.raises(ConfigError, match="together"):
        cli_pairs(["a.png"], [], demo=False)
    with pytest.raises(ConfigError, match="equal numbers"):
        cli_pairs(["a", "b"], ["s", "t", "u"], demo=False)
    assert pair_name("skimage:chelsea", "/x/y/brick.jpg") == "chelsea-x-brick"
    assert absolute_spec("skimage:brick") == "skimage:brick" and absolute_spec("s3://b/k.png") == "s3://b/k.png"
    assert absolute_spec("rel/a.png").startswith("/")
    cfg = load_config("style")
    cfg = cfg.with_values({"style.pairs": [["only-one"]]})
    with pytest.raises(ConfigError, match=r"\[content, style\]"):
        configured_pairs(cfg)


def test_step_metrics_score_with_the_reference_weights():
    from cvtasks.style import StepResult
    from pipelines.style import step_metrics

    cfg = StyleConfig(loss=LossWeights(5.0, 5.0, 5.0))  # the trial's own weights do not enter ref_loss
    result = StepResult(3, {"content": 1.0, "style": 1e-4, "tv": 0.1}, {"content": 5.0, "style": 5e-4, "tv": 0.5,
                                                                       "total": 5.5005}, 0.3, None)
    metrics = step_metrics(result, cfg, first_style=1e-3)
    assert metrics["ref_loss"] == pytest.approx(1.0 + 1.0 + 1.0)  # reference 1, 1e4, 10
    assert metrics["style_reduction"] == pytest.approx(10.0)
    assert metrics["total_loss"] == 5.5005 and metrics["raw_style"] == 1e-4 and metrics["lr"] == 0.3


def test_sweep_plan_comes_from_the_runner_the_task_declares():
    from pipelines.runners import runner_for
    from pipelines.style import style_trial
    from pipelines.tune import sweep_trial

    cfg = load_config("style", overrides=["style.steps=120", "style.log_every=50", "scaling.cpus_per_worker=2"])
    plan = runner_for("style").sweep_plan(cfg)
    assert plan.trainable is style_trial and (plan.metric, plan.mode) == ("ref_loss", "min")
    assert plan.max_t == 3 and plan.resources == {"CPU": 2.0} and not plan.register_model
    assert plan.log_extras is not None
    train_plan = runner_for("cifar10").sweep_plan(load_config("cifar10"))  # Ray Train tasks keep their path
    assert train_plan.trainable is sweep_trial and train_plan.mode == "max" and train_plan.register_model


def test_raycv_train_style_refuses_epochs(capsys):
    from pipelines.cli import main

    assert main(["train", "style", "--epochs", "3"]) == 2
    assert "style.steps" in capsys.readouterr().err
