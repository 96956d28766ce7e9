"""README.md documents exactly the flags the commands have."""

from __future__ import annotations

from pathlib import Path

from koupleless.clidoc import BEGIN, END, reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_reference_matches_the_commands() -> None:
    text = README.read_text()
    assert BEGIN in text and END in text, "README.md lost its generated configuration reference"
    documented = text[text.index(BEGIN): text.index(END) + len(END)]
    assert documented == reference(), (
        "README.md's configuration reference is out of date: regenerate it with "
        "`python -m koupleless.clidoc` and paste it between the markers"
    )
