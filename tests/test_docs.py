"""README.md is a landing page, and no relative link or anchor in it or in docs/*.md is broken."""
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
MAX_README_BYTES = 16_000

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]\n]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.MULTILINE)
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<a\b[^>]*\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lowercased, keeping letters and marks (any script), digits,
    spaces, hyphens and underscores (connector punctuation), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image counts by its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = "".join(ch for ch in text if ch in " -" or unicodedata.category(ch)[0] in "LM"
                   or unicodedata.category(ch) in ("Nd", "Pc"))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a markdown file: heading slugs, duplicates numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_targets(text: str):
    """(line number, target) of every link, image and <img src> outside code; link text may span lines."""
    lines = [""] * len(text.splitlines())
    for number, line in prose_lines(text):
        lines[number - 1] = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
    prose = "\n".join(lines)
    for pattern in (LINK, REFERENCE, IMG_SRC):
        for match in pattern.finditer(prose):
            yield prose.count("\n", 0, match.start()) + 1, match.group(1)


def broken_links(page: Path) -> list[str]:
    """One message per relative link of `page` whose file or #anchor does not exist."""
    problems = []
    for number, target in link_targets(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        file = (page.parent / unquote(file_part)).resolve() if file_part else page
        where = f"{page.name}:{number}: {target}"
        if not file.exists():
            problems.append(f"{where}: no file {file_part}")
        elif anchor and file.suffix == ".md" and unquote(anchor) not in anchors(file):
            problems.append(f"{where}: no heading #{anchor} in {file.name}")
    return problems


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_slugs_follow_github():
    assert slug("Weight-only int8 / int4 (`--quantize`, THUDM's int4/int8 checkpoints)") == \
        "weight-only-int8--int4---quantize-thudms-int4int8-checkpoints"
    assert slug("`main.py` flags") == "mainpy-flags"
    assert slug("ChatGLM2-6B 模型推理指导") == "chatglm2-6b-模型推理指导"
    assert slug("Sparse quantization (`ENABLE_SPARSE=1`)") == "sparse-quantization-enable_sparse1"


def test_no_broken_relative_links_or_anchors():
    problems = [problem for page in pages() for problem in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Part\n\n## Part\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "[fine](other.md#part-1) [fine too](#title) ![image](missing.png) [gone](other.md#nowhere)\n"
        "[self](#no-such-heading) `[in code](absent.md)` [web](https://example.com/x.md) [two\nlines](gone.md)\n\n"
        "```\n[in a fence](absent.md)\n```\n",
        encoding="utf-8")
    problems = broken_links(page)
    assert sorted(problems) == sorted([
        "page.md:3: missing.png: no file missing.png",
        "page.md:3: other.md#nowhere: no heading #nowhere in other.md",
        "page.md:4: #no-such-heading: no heading #no-such-heading in page.md",
        "page.md:4: gone.md: no file gone.md",
    ]), problems


def test_readme_is_a_landing_page_linking_every_docs_page():
    readme = ROOT / "README.md"
    assert readme.stat().st_size <= MAX_README_BYTES, readme.stat().st_size
    linked = {(ROOT / unquote(target.partition("#")[0])).resolve()
              for _, target in link_targets(readme.read_text(encoding="utf-8")) if target.partition("#")[0]}
    unlinked = [path.name for path in sorted((ROOT / "docs").glob("*.md")) if path.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"
