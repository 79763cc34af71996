"""The generated and hand-written reference pages stay true to the code."""

from pathlib import Path

from pipelines import config_reference, shards
from pipelines.config import RunConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_config_reference_is_current():
    # Regenerate with: wsss config --reference > docs/config.md
    assert (DOCS / "config.md").read_text() == config_reference.markdown()


def test_config_reference_lists_every_field_with_its_bounds():
    page = config_reference.markdown()
    assert "| `classifier.optim.epochs` | int | `5` | > 0 |" in page
    assert "| `ray.gpus_per_actor` | float | `1.0` | > 0, <= 1 |" in page
    assert '| `cam.background.method` | "threshold" \\| "power" \\| "otsu" |' in page
    # A family's union: the member names, then each member's settings marked with its name.
    assert '| `classifier.model.pooling` | "gap" \\| "gmp" \\| "top_k" | `"gap"` |' in page
    assert "| `classifier.model.pooling.kmax` | float | `0.2` | > 0 | (top_k) " in page


def test_output_schema_page_names_every_column():
    page = (DOCS / "output.md").read_text()
    for schema in (shards.labels_schema(RunConfig().stages), shards.ERRORS_SCHEMA):
        for name in schema.names:
            assert f"`{name}`" in page, name
    assert f"`{shards.META_SCHEMA_VERSION.decode()}`" in page
