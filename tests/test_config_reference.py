"""docs/configuration.md is what mm1_megatron.config.reference generates from the schema, and
every config field has a comment there to generate it from."""

from pathlib import Path

from mm1_megatron.config.reference import COMMAND, PAGE, documented_fields, field_docs, render


def test_configuration_page_is_generated():
    assert PAGE.exists(), f"{PAGE} is missing: generate it with `{COMMAND}`"
    assert PAGE.read_text() == render(), f"{PAGE} is stale: regenerate it with `{COMMAND}`"


def test_every_field_has_a_doc():
    undocumented = [name for _, _, rows in documented_fields()
                    for name, _, _, doc in rows if not doc]
    assert not undocumented, ("fields without a comment in mm1_megatron/config/schema.py "
                              f"(write one above the field or after it): {undocumented}")


def test_field_docs_reads_the_lines_above_and_the_trailing_comment():
    source = '''
class A:
    # not this one: a blank line follows

    # two lines
    # above
    x: int = 1  # and trailing
    y: str = ""
    z: float = 0.5  # trailing only
'''
    docs = field_docs(source)
    assert docs == {("A", "x"): "two lines above and trailing", ("A", "y"): "",
                    ("A", "z"): "trailing only"}


def test_page_is_under_docs():
    assert PAGE == Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
