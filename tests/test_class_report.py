import numpy as np
import pytest
from pydantic import ValidationError

from wsss.class_report import (
    ClassAreas,
    ClassReportParams,
    class_report,
    format_class_report,
    presence_rates,
)

CLASSES = ["background", "skin", "bag", "dress"]


def test_areas_average_over_the_images_labelled_with_each_class():
    areas = ClassAreas(4)
    mask = np.zeros((4, 5), np.uint8)
    mask[:, :4] = 1  # skin paints 80% of the image
    mask[0, 4] = 2  # bag 5%
    areas.update(mask, [1, 2])
    areas.update(np.full((2, 2), 1, np.uint8), [1])  # skin: the whole image
    areas.update(np.zeros((2, 2), np.uint8), [])  # no labels: not counted anywhere
    mean = areas.mean_area()
    assert mean[1] == pytest.approx((0.8 + 1.0) / 2)
    assert mean[2] == pytest.approx(0.05)
    assert np.isnan(mean[3])  # never labelled
    halves = ClassAreas(4)
    halves.update(mask, [1, 2])
    rest = ClassAreas(4)
    rest.update(np.full((2, 2), 1, np.uint8), [1])
    np.testing.assert_allclose(halves.merge(rest).sums, areas.sums)
    with pytest.raises(ValueError, match="shape"):
        ClassAreas(4, np.zeros((2, 3)))


def test_presence_rates_count_each_image_once():
    rates = presence_rates([[1, 2, 2], [1], [1, 3], []], 4)
    np.testing.assert_allclose(rates, [0, 0.75, 0.25, 0.25])


def test_report_flags_a_class_in_nearly_every_image_and_one_painted_everywhere():
    presence = np.array([0, 0.99, 0.5, 0.3])
    final = ClassAreas(4, [[0, 99, 50, 30], [0, 20, 35, 3]])  # bag: 70% of its images
    cam = ClassAreas(4, [[0, 99, 50, 30], [0, 50, 40, 6]])
    rows = class_report(
        CLASSES, presence, {"cam": cam, "crf": final}, ClassReportParams(), final="crf"
    )
    by_class = {row["class"]: row for row in rows}
    assert [row["class"] for row in rows] == CLASSES[1:]
    assert by_class["skin"]["flagged"] and "labelled in 99% of images" in by_class["skin"]["why"]
    assert by_class["bag"]["flagged"] and "covers 70%" in by_class["bag"]["why"]
    assert not by_class["dress"]["flagged"] and by_class["dress"]["why"] == ""
    assert by_class["dress"]["area"] == {"cam": 0.2, "crf": 0.1}
    table = format_class_report(rows)
    assert "| class | labelled in | area (cam) | area (crf) | localisable? |" in table
    assert "| dress | 30% | 20% | 10% | yes |" in table
    assert "| skin | 99% | 51% | 20% | NO: labelled in 99% of images" in table
    # Looser limits flag nothing.
    loose = ClassReportParams(max_presence=1.0, max_area=0.9)
    assert not any(
        r["flagged"] for r in class_report(CLASSES, presence, {"crf": final}, loose, "crf")
    )


def test_report_params_are_fractions():
    with pytest.raises(ValidationError, match="max_presence"):
        ClassReportParams(max_presence=1.5)
