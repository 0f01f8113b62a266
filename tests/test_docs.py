"""The documentation stays true to the app: the CLI reference is the app's own, the README stays short."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_cli_reference_is_what_the_app_generates(tmp_path: Path) -> None:
    generated = tmp_path / "cli.md"
    result = subprocess.run(
        [sys.executable, "-m", "typer", "vqtool.cli", "utils", "docs", "--name", "vqtool", "--output", str(generated)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    regenerate = "regenerate it with: typer vqtool.cli utils docs --name vqtool --output docs/cli.md"
    assert generated.read_text() == (REPO / "docs" / "cli.md").read_text(), regenerate


def test_every_command_has_its_reference_section() -> None:
    from vqtool.cli import app

    reference = (REPO / "docs" / "cli.md").read_text()
    names = [command.name or command.callback.__name__ for command in app.registered_commands]  # type: ignore[union-attr]
    assert len(names) >= 9
    for name in names:
        assert f"## `vqtool {name}`" in reference, name


def test_the_readme_is_short_and_shows_the_main_path_first() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024
    opening = "\n".join(readme.splitlines()[:120])
    for step in (
        "vqtool train",
        "vqtool export",
        "vqtool encode",
        "vqtool decode",
        "vqtool.load(",
        "bash scripts/test.sh",
    ):
        assert step in opening, step


def test_no_development_history_in_the_user_documentation() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    stale = re.compile(r"\b(issue \d+|previous version|new in this version|versions? ago)\b", re.IGNORECASE)
    for page in pages:
        found = stale.search(page.read_text())
        assert found is None, f"{page.name}: {found and found[0]!r}"
