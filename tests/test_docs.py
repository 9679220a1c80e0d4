"""The README and docs/ stay usable: every relative link resolves (its anchor too), every
``rayprune ...`` command line in their shell blocks is accepted by the CLI's parser, every docs
page is in the index, and the README fits on a screen (at most 150 lines)."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from rayprune.cli import build_parser
from rayprune.errors import RaypruneError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 150
SUBCOMMANDS = ("inspect", "run", "teacher", "sweep", "front", "pick")

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
#: Fenced blocks whose lines are shell commands: ```bash, ```sh and plain ```.
SHELL_BLOCKS = {"", "bash", "sh"}
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
#: A command line may be shown with a prompt (``$ ``) or run from the venv (``.venv/bin/``).
COMMAND = re.compile(r"^(?:\$\s+)?(?:\.venv/bin/)?rayprune\s+(.*)$")


def doc_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def split_markdown(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """``text`` as (its prose outside fenced blocks, its fenced blocks as (info word, lines))."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if current is None and fence:
            current = []
            blocks.append((fence.group(2).lower(), current))
        elif current is not None and fence and not fence.group(2):
            current = None
        elif current is not None:
            current.append(line)
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: link syntax reduced to its text, lower case, punctuation
    but ``-`` and ``_`` dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings; repeated slugs get ``-1``, ``-2``, ... as on GitHub."""
    prose, _ = split_markdown(text)
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(text: str) -> Iterator[str]:
    """The targets of a Markdown text's links that are not URLs, outside code blocks and code spans."""
    prose, _ = split_markdown(text)
    for match in LINK.finditer(INLINE_CODE.sub("", prose)):
        if not SCHEME.match(match.group(1)):
            yield match.group(1)


def link_problems(doc: Path, root: Path) -> list[str]:
    """Every relative link of ``doc`` whose file (inside ``root``) or heading anchor does not exist."""
    root, doc = root.resolve(), doc.resolve()
    problems = []
    for target in relative_links(doc.read_text()):
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        where = f"{doc.relative_to(root)}: ({target})"
        if file != root and root not in file.parents:
            problems.append(f"{where} points outside the repository")
        elif not file.exists():
            problems.append(f"{where}: no such file")
        elif anchor and file.suffix != ".md":
            problems.append(f"{where}: an anchor on a file that is not Markdown")
        elif anchor and anchor not in anchors(file.read_text()):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {file.name}")
    return problems


def command_lines(text: str) -> Iterator[str]:
    """The ``rayprune ...`` commands of a Markdown text's shell blocks, continuation lines joined."""
    _, blocks = split_markdown(text)
    for info, lines in blocks:
        if info not in SHELL_BLOCKS:
            continue
        parts: list[str] = []
        for line in lines:
            parts.append(line.strip().removesuffix("\\").strip())
            if line.rstrip().endswith("\\"):
                continue
            logical, parts = " ".join(parts), []
            if COMMAND.match(logical):
                yield logical


def command_problems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """Every command line of ``text`` that the parser refuses, with argparse's reason."""
    problems = []
    for line in command_lines(text):
        match = COMMAND.match(line)
        assert match is not None
        try:
            parser.parse_args(shlex.split(match.group(1), comments=True))
        except (RaypruneError, SystemExit) as e:
            problems.append(f"{line!r}: {e}")
    return problems


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


# --------------------------------------------------------------------------------------------
# The repository's docs
# --------------------------------------------------------------------------------------------


def test_the_readme_fits_on_a_screen():
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


def test_every_relative_link_resolves_to_a_file_and_heading():
    problems = [problem for doc in doc_files() for problem in link_problems(doc, ROOT)]
    assert problems == []


def test_every_docs_page_is_linked_from_the_index():
    index = DOCS / "README.md"
    linked = {(DOCS / target.partition("#")[0]).resolve() for target in relative_links(index.read_text())}
    assert [page.name for page in DOCS.glob("*.md") if page != index and page.resolve() not in linked] == []


def test_every_command_line_is_accepted_by_the_parser(parser):
    problems = [
        f"{doc.relative_to(ROOT)}: {problem}"
        for doc in doc_files()
        for problem in command_problems(doc.read_text(), parser)
    ]
    assert problems == []


def test_the_docs_show_every_subcommand():
    shown = {COMMAND.match(line).group(1).split()[0] for doc in doc_files() for line in command_lines(doc.read_text())}
    assert shown >= set(SUBCOMMANDS)


# --------------------------------------------------------------------------------------------
# The checks themselves catch what they are for
# --------------------------------------------------------------------------------------------


def test_github_slugs():
    assert github_slug("`cifar_resnet` (fixed format)") == "cifar_resnet-fixed-format"
    assert github_slug("GPU kit, 2026-11-28, NVIDIA H200") == "gpu-kit-2026-11-28-nvidia-h200"
    assert github_slug("Choosing an operating point: efficient or robust") == (
        "choosing-an-operating-point-efficient-or-robust"
    )
    assert github_slug("See [the engine](engine.md)") == "see-the-engine"
    assert anchors("# A\n## A\n```bash\n# A\n```\n## A b\n") == {"a", "a-1", "a-b"}


def test_broken_links_and_anchors_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Two words\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Top\n"
        "[ok](docs/page.md#two-words) [self](#top) [web](https://example.com/x#y)\n"
        "[missing](docs/nope.md) [bad anchor](docs/page.md#three)\n"
        "[wrapped\ntext](#nowhere) `[in code](docs/nope.md)` [out](../elsewhere.md)\n"
        "```bash\n[in a block](docs/nope.md)\n```\n"
    )
    assert link_problems(doc, tmp_path) == [
        "README.md: (docs/nope.md): no such file",
        "README.md: (docs/page.md#three): no heading with the anchor #three in page.md",
        "README.md: (#nowhere): no heading with the anchor #nowhere in README.md",
        "README.md: (../elsewhere.md) points outside the repository",
    ]


def test_refused_command_lines_are_reported(parser):
    text = (
        "```bash\n"
        "rayprune front --experiment e   # a comment\n"
        "$ .venv/bin/rayprune pick --experiment e --mode fastest \\\n"
        "    --out x\n"
        "echo rayprune front\n"
        "```\n"
        "```python\nrayprune nonsense\n```\n"
        "```\nrayprune teacher --model cifar_resnet:20 --out t\n```\n"
    )
    assert list(command_lines(text)) == [
        "rayprune front --experiment e   # a comment",
        "$ .venv/bin/rayprune pick --experiment e --mode fastest --out x",
        "rayprune teacher --model cifar_resnet:20 --out t",
    ]
    problems = command_problems(text, parser)
    assert len(problems) == 2
    assert "--mode" in problems[0] and "'fastest'" in problems[0]
    assert "--epochs" in problems[1]
