"""The shapes detector behind the concept score and the control IoU, on images whose truth is known."""

import pytest
from PIL import Image, ImageDraw

from peft_hcp.train.concept import (
    BeforeAfter,
    concept_score,
    control_iou,
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
    to_image,
)


@pytest.fixture(scope="module")
def drawn():
    """90 generated images in every shape colour (the concept's too), with their captions."""
    dataset = ShapesDataset(90, 32, seed=7, colours=(*BASE_COLOURS, CONCEPT_COLOUR))
    items = [dataset[i] for i in range(len(dataset))]
    return [to_image(item["pixels"]) for item in items], [item["caption"] for item in items]


def test_reads_colour_and_shape_of_every_generated_image(drawn):
    images, captions = drawn
    assert concept_score(images, captions) == 1.0
    assert shape_score(images, captions) == 1.0
    readings = [read_shape(image) for image in images]
    assert {r.background for r in readings} == {BACKGROUND}
    assert {r.colour for r in readings} == {*BASE_COLOURS, CONCEPT_COLOUR}  # every colour was drawn, and read


def test_scores_count_only_images_showing_what_their_prompt_names(drawn):
    images, _ = drawn
    reading = read_shape(images[0])
    other = next(name for name in COLOURS if name not in (reading.colour, reading.background))
    prompts = [f"a {reading.colour} {reading.shape}", f"a {other} {reading.shape}", "a shape", "a thing"]
    assert concept_score([images[0]] * 4, prompts) == 0.25  # no colour word, or another one: a miss
    assert shape_score([images[0]] * 4, prompts) == 0.5
    with pytest.raises(ValueError, match="one prompt per image"):
        concept_score(images[:2], prompts)


def test_a_plain_image_has_no_shape():
    plain = Image.new("RGB", (32, 32), COLOURS["green"])
    speck = plain.copy()
    speck.putpixel((5, 5), COLOURS["red"])  # one pixel is below the least shape area
    for image in (plain, speck):
        reading = read_shape(image)
        assert (reading.background, reading.colour, reading.shape) == ("green", None, None)


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
