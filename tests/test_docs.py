"""The README and the reference docs stay true: short README with the two commands, links that resolve, and the
configuration and command references naming exactly what the code reads and offers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backend.cli import main
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 10_000
SETUP_AND_SERVE = "bash scripts/setup.sh && .venv/bin/xdecoder-ls serve --port 9090"
SETUP_AND_TEST = "bash scripts/test.sh"
# Pages whose links are checked: the README, the docs index and the reference pages written with it. Pages written
# elsewhere in the session (deploy, learning, operations, ...) are linked from here, so their existence is checked too.
LINKING_PAGES = [
    "README.md",
    "docs/README.md",
    "docs/configuration.md",
    "docs/commands.md",
    "docs/design.md",
    "docs/benchmarks.md",
    "label_config/README.md",
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
ENV_NAME = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")


def setting_variables() -> set[str]:
    """Every environment variable backend/settings.py reads (each field's names, aliases included)."""
    names = set()
    for field in Settings.model_fields.values():
        names.update(field.validation_alias.choices)
    return names


def outside_variables() -> set[str]:
    """The variables docs/commands.md lists as read by something other than the settings."""
    text = (ROOT / "docs/commands.md").read_text()
    section = text.split("## Environment outside the settings", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in ENV_NAME.findall(row)}


def without_code_blocks(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", without_code_blocks(markdown), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_readme_is_short():
    assert README.stat().st_size < README_MAX_BYTES, f"README.md is {README.stat().st_size} bytes; move detail to docs/"


def test_readme_shows_the_two_commands_each_in_its_own_block():
    blocks = re.findall(r"^```bash\n(.*?)\n```", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert blocks == [SETUP_AND_SERVE, SETUP_AND_TEST]


def test_the_two_commands_exist():
    assert (ROOT / "scripts/setup.sh").is_file() and (ROOT / "scripts/test.sh").is_file()
    assert 'xdecoder-ls = "backend.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_serve_takes_a_port(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    assert "--port" in capsys.readouterr().out


@pytest.mark.parametrize("page", LINKING_PAGES)
def test_links_point_to_existing_files_and_headings(page):
    path = ROOT / page
    broken = []
    for target in LINK.findall(without_code_blocks(path.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page}: broken links: {', '.join(sorted(set(broken)))}"


def test_configuration_names_exactly_the_settings():
    documented = set(ENV_NAME.findall((ROOT / "docs/configuration.md").read_text()))
    settings = setting_variables()
    assert not documented - settings, f"documented but not read by backend/settings.py: {documented - settings}"
    assert not settings - documented, f"read by backend/settings.py but not documented: {settings - documented}"


def test_variables_named_in_the_docs_are_settings_or_listed_as_outside_them():
    known = setting_variables() | outside_variables()
    assert not setting_variables() & outside_variables()
    for page in LINKING_PAGES:
        named = {name for name in ENV_NAME.findall((ROOT / page).read_text()) if name.startswith("XDECODER_")}
        assert not named - known, f"{page} names variables nothing reads: {named - known}"


def choices(capsys, *argv: str) -> list[str]:
    """The choices `xdecoder-ls ...` offers for its next argument, from argparse's refusal of one it does not know."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "no-such-choice"])
    assert exit_.value.code == 2
    offered = re.search(r"\(choose from (.*)\)", capsys.readouterr().err).group(1)
    return [name.strip(" '") for name in offered.split(",")]


def test_commands_page_lists_every_command_and_benchmark(capsys):
    text = (ROOT / "docs/commands.md").read_text()
    commands = choices(capsys)
    assert {"serve", "worker", "bench"} <= set(commands)
    assert [name for name in commands if f"| `{name}" not in text] == []
    bench_row = next(line for line in text.splitlines() if line.startswith("| `bench "))
    benchmarks = choices(capsys, "bench")
    assert "model" in benchmarks
    assert [name for name in benchmarks if name not in bench_row] == []
