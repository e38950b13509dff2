"""The shapes detector behind the concept score and the control IoU, on images whose truth is known."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from peft_hcp.train.concept import (
    BeforeAfter,
    colour_score,
    concept_score,
    control_iou,
    leak_rate,
    mask_iou,
    named_in,
    read_shape,
    shape_score,
)
from peft_hcp.train.data import (
    BACKGROUND,
    BASE_COLOURS,
    COLOURS,
    CONCEPT_COLOUR,
    ShapesDataset,
    draw_shape,
    to_image,
)


@pytest.fixture(scope="module")
def drawn():
    """90 generated images in every shape colour (the concept's too), with their captions."""
    dataset = ShapesDataset(90, 32, seed=7, colours=(*BASE_COLOURS, CONCEPT_COLOUR))
    items = [dataset[i] for i in range(len(dataset))]
    return [to_image(item["pixels"]) for item in items], [item["caption"] for item in items]


def _on_black(draw) -> Image.Image:
    image = Image.new("RGB", (32, 32), COLOURS[BACKGROUND])
    draw(ImageDraw.Draw(image))
    return image


CYAN = COLOURS[CONCEPT_COLOUR]


def _cyan(shape: str, large: bool = True) -> Image.Image:
    rng = np.random.default_rng(0)
    return draw_shape(32, shape, large, CYAN, COLOURS[BACKGROUND], rng)


def test_reads_colour_and_shape_of_every_generated_image(drawn):
    images, captions = drawn
    assert concept_score(images, captions) == 1.0
    assert colour_score(images, captions) == shape_score(images, captions) == 1.0
    readings = [read_shape(image) for image in images]
    assert {r.background for r in readings} == {BACKGROUND}
    assert {r.colour for r in readings} == {*BASE_COLOURS, CONCEPT_COLOUR}  # every colour was drawn, and read


def test_scores_count_only_images_showing_what_their_prompt_names(drawn):
    images, _ = drawn
    reading = read_shape(images[0])
    other = next(name for name in COLOURS if name not in (reading.colour, reading.background))
    prompts = [f"a {reading.colour} {reading.shape}", f"a {other} {reading.shape}", "a shape", "a thing"]
    assert colour_score([images[0]] * 4, prompts) == 0.25  # no colour word, or another one: a miss
    assert shape_score([images[0]] * 4, prompts) == 0.5
    assert concept_score([images[0]] * 4, prompts) == 0.25
    with pytest.raises(ValueError, match="one prompt per image"):
        concept_score(images[:2], prompts)


def test_a_plain_image_has_no_shape():
    plain = Image.new("RGB", (32, 32), COLOURS["green"])
    speck = plain.copy()
    speck.putpixel((5, 5), COLOURS["red"])  # one pixel is below the least shape area
    for image in (plain, speck):
        reading = read_shape(image)
        assert (reading.background, reading.colour, reading.shape) == ("green", None, None)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("large", [True, False])
def test_reads_each_kind_at_each_size(shape, large):
    reading = read_shape(_cyan(shape, large))
    assert (reading.colour, reading.shape) == (CONCEPT_COLOUR, shape)


def test_the_concept_score_needs_the_colour_and_the_shape():
    prompt = f"a large {CONCEPT_COLOUR} circle"
    square = _cyan("square")
    assert colour_score([square], [prompt]) == 1.0 and shape_score([square], [prompt]) == 0.0
    assert concept_score([square], [prompt]) == 0.0  # the right colour, the wrong shape
    assert concept_score([_cyan("circle")], [prompt]) == 1.0


def test_noise_a_stripe_and_an_off_palette_colour_are_no_concept():
    rng = np.random.default_rng(0)
    salt = np.full((32, 32, 3), COLOURS[BACKGROUND], dtype=np.uint8)
    salt[rng.random((32, 32)) < 0.1] = CYAN  # 10 % cyan pixels scattered on black
    stripe = _on_black(lambda d: d.rectangle((12, 0, 19, 31), fill=CYAN))  # full height, 8 wide
    grey_green = _on_black(lambda d: d.rectangle((6, 6, 25, 25), fill=(100, 150, 120)))
    assert read_shape(salt).colour is None and read_shape(salt).shape is None
    assert (read_shape(stripe).colour, read_shape(stripe).shape) == (CONCEPT_COLOUR, None)  # cyan, but no shape
    assert (read_shape(grey_green).colour, read_shape(grey_green).shape) == (None, "square")  # no palette colour
    for shape in ("circle", "square", "triangle"):
        prompt = f"a large {CONCEPT_COLOUR} {shape}"
        assert concept_score([salt, stripe, grey_green], [prompt] * 3) == 0.0


def test_leak_rate_counts_other_colour_prompts_drawn_in_the_concept_colour():
    images = [_cyan("circle"), _cyan("square"), _cyan("circle"), to_image(ShapesDataset(1, 32, seed=1)[0]["pixels"])]
    prompts = ["a large red circle", "a large blue square", f"a large {CONCEPT_COLOUR} circle", "a small red square"]
    assert leak_rate(images, prompts, CONCEPT_COLOUR) == pytest.approx(2 / 3)  # the concept's own prompt is left out
    with pytest.raises(ValueError, match="No prompt names a colour other than 'cyan'"):
        leak_rate(images[2:3], prompts[2:3], CONCEPT_COLOUR)


def test_mask_iou_measures_overlap():
    def square(left: int) -> Image.Image:
        image = Image.new("RGB", (32, 32), COLOURS["white"])
        ImageDraw.Draw(image).rectangle((left, 8, left + 15, 23), fill=COLOURS["blue"])
        return image

    assert mask_iou(square(4), square(4)) == 1.0
    assert mask_iou(square(4), square(12)) == pytest.approx(8 / 24)  # 8 of 24 columns shared
    assert mask_iou(square(0), square(16)) == 0.0
    assert control_iou([square(4), square(0)], [square(4), square(16)]) == pytest.approx(0.5)


def test_named_in_takes_whole_words():
    assert named_in("a large purple circle", COLOURS) == "purple"
    assert named_in("Red, then blue", COLOURS) == "red"
    assert named_in("a reddish square", COLOURS) is None


def test_before_after_prints_the_logged_line():
    assert str(BeforeAfter("concept score", 0.04, 0.87)) == "concept score: before 0.040 after 0.870"
