"""The README's configuration reference is the one the schema generates (no drift)."""
from __future__ import annotations

from pipeline.config_reference import in_readme, reference_markdown
from tests.conftest import ROOT


def test_readme_reference_matches_the_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert in_readme(readme) == reference_markdown(), (
        "README.md's config reference is stale: run `python -m pipeline.config_reference --write README.md`")


def test_every_key_has_a_meaning():
    """Every key of every section carries a comment that the reference prints as its meaning."""
    blank = [line for line in reference_markdown().splitlines()
             if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not blank, "keys without a `# meaning` comment in their declaration:\n" + "\n".join(blank)
