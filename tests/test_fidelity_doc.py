"""docs/fidelity.md exists with the sections the presets and README point to."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["## Engine", "## Mixers", "## Pretexts", "## Evaluations", "## Transfer methods",
            "## Analysis metrics", "## Presets"]


def test_fidelity_doc_has_every_section_and_the_presets_link_to_it():
    text = (ROOT / "docs" / "fidelity.md").read_text()
    lines = text.splitlines()
    for header in SECTIONS:
        assert header in lines, f"docs/fidelity.md lacks the section {header!r}"
    for preset in sorted((ROOT / "config" / "presets").glob("*.yaml")):
        if preset.name == "reference_recipes.yaml":  # the recipe table (tests/test_recipes.py), not a preset
            continue
        assert "docs/fidelity.md" in preset.read_text(), f"{preset.name} does not link to docs/fidelity.md"


def test_fidelity_doc_names_every_mixer_and_pretext():
    from vitablate.models import MIXERS
    from vitablate.objectives import PRETEXTS

    text = (ROOT / "docs" / "fidelity.md").read_text()
    for name in [*MIXERS, *PRETEXTS]:
        assert f"**`{name}`**" in text, f"docs/fidelity.md has no entry for {name!r}"
