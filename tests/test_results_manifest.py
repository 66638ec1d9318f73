"""The house around the code: benchmarks/results/MANIFEST.json lists every result, every citation and link in the
README and docs/ resolves (file and anchor), and no committed file holds an absolute path of the machine it was
made on. Plain file checks: no model, no network, a second or so."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MANIFEST = RESULTS / "MANIFEST.json"
STATUSES = {"current", "archived"}
KINDS = {"run", "routers"}
# paths of the machines results were made on (home folders, scratch and work dirs); `~/...` and repository paths
# are fine. The lookbehind keeps URLs and relative paths (a/work/b) out.
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|root|home|tmp|Users|mnt|scratch)/[\w.-]")


def tracked(*pathspec: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", *pathspec], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the committed files cannot be listed")
    return [p for p in out.stdout.decode().split("\0") if p]


def manifest() -> list[dict]:
    return json.loads(MANIFEST.read_text())["entries"]


# --- markdown: headings, anchors, links ---------------------------------------------------------------------
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(text: str) -> str:
    """The page without fenced code blocks (a `# comment` there is not a heading, a [x](y) not a link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in _prose(page.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(page: Path) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", _prose(page.read_text()))  # inline code is not a link either
    return [target for target in LINK.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def resolve(reference: str, base: Path) -> str | None:
    """None if `reference` (path[#anchor], relative to the folder of `base`) resolves, else what is wrong."""
    path, _, anchor = reference.partition("#")
    target = (base.parent / path).resolve() if path else base
    if not target.exists():
        return f"{path} does not exist"
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return f"{path or base.name} has no heading with anchor #{anchor}"
    return None


# --- the tests ----------------------------------------------------------------------------------------------
def test_slug_matches_github_anchors():
    assert slug("The evaluation harness (`routertune eval`)") == "the-evaluation-harness-routertune-eval"
    assert slug("What the 10% wins are evidence for") == "what-the-10-wins-are-evidence-for"
    assert (
        slug("Measured at the targets' setting: 2048-token prompts, 1 request")
        == "measured-at-the-targets-setting-2048-token-prompts-1-request"
    )


def test_manifest_entries_are_well_formed():
    entries = manifest()
    paths = [e["path"] for e in entries]
    assert len(paths) == len(set(paths)), "a path is listed twice"
    for e in entries:
        assert {"path", "kind", "status", "what", "command", "commit", "routers", "cited_by"} <= set(e), e["path"]
        assert e["status"] in STATUSES and e["kind"] in KINDS, e["path"]
        assert re.fullmatch(r"[0-9a-f]{7,40}", e["commit"]), f"{e['path']}: commit {e['commit']!r}"
        assert e["command"].strip() and e["what"].strip(), e["path"]
        assert e["cited_by"], f"{e['path']} is cited nowhere: cite it or remove it"
        if e["kind"] == "run":  # superseded runs live under archive/, current ones outside it
            assert ("/archive/" in e["path"]) == (e["status"] == "archived"), e["path"]
        if e["status"] == "archived":
            assert all(c.startswith("docs/history.md#") for c in e["cited_by"]), (
                f"{e['path']} is archived: only docs/history.md may cite it"
            )


def test_every_listed_path_exists_and_every_result_is_listed():
    listed = [e["path"] for e in manifest()]
    for path in listed:
        assert (ROOT / path).exists(), f"MANIFEST.json lists {path}, which does not exist"
        assert path.startswith("benchmarks/results/"), path
    unlisted = [
        f
        for f in tracked("benchmarks/results")
        if f != "benchmarks/results/MANIFEST.json"
        and not any(f == p or (p.endswith("/") and f.startswith(p)) for p in listed)
    ]
    assert not unlisted, f"results not in benchmarks/results/MANIFEST.json: {unlisted}"


def test_router_inputs_are_listed_router_sets():
    entries = manifest()
    router_sets = {e["path"] for e in entries if e["kind"] == "routers"}
    for e in entries:
        for r in e["routers"]:
            if r.startswith("benchmarks/results/"):
                assert r in router_sets, f"{e['path']} names routers {r} that are not a listed router set"


def test_every_citation_names_an_existing_section():
    for e in manifest():
        for citation in e["cited_by"]:
            page, _, anchor = citation.partition("#")
            assert anchor, f"{e['path']}: cite a section (page#anchor), not {citation!r}"
            problem = resolve(citation, ROOT / "x")
            assert problem is None, f"{e['path']} cited by {citation}: {problem}"


def test_every_link_in_readme_and_docs_resolves():
    broken = [
        f"{page.relative_to(ROOT)}: ({target}) {problem}"
        for page in pages()
        for target in links(page)
        if (problem := resolve(target, page))
    ]
    assert not broken, "\n".join(broken)


def test_code_cites_existing_method_sections():
    """Comments and docstrings cite docs pages by anchor (docs/method.md#objectives); each must exist."""
    pattern = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")
    broken = []
    for name in tracked("src", "tests", "benchmarks/*.py"):
        if not name.endswith(".py"):
            continue
        for page, anchor in pattern.findall((ROOT / name).read_text()):
            if resolve(f"docs/{page}#{anchor}", ROOT / "x"):
                broken.append(f"{name}: docs/{page}#{anchor}")
    assert not broken, broken


def test_link_checker_catches_broken_links(tmp_path):
    """The checker itself: a missing file and a missing anchor are reported, good ones are not."""
    (tmp_path / "a.md").write_text("# Title\n\n## A section\n\n```\n# not a heading\n```\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#a-section) [gone](missing.md) [bad](a.md#not-a-heading) [web](https://x.y/z)\n`[code](nowhere.md)`\n"
    )
    problems = [resolve(t, page) for t in links(page)]
    assert problems[0] is None and "does not exist" in problems[1] and "no heading" in problems[2]
    assert len(problems) == 3


def test_no_committed_file_holds_a_machine_path():
    found = []
    for name in tracked():
        path = ROOT / name
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary (weights, plots) or gone from the working tree
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "absolute machine paths (use repository-relative paths):\n" + "\n".join(found)


def test_the_shipped_static_order_is_the_committed_search():
    """routertune ships the default model's searched order (train/orders/) for `train --prior searched` and
    `export --static`: it must be the measured search in benchmarks/results, not a drifted copy."""
    shipped = ROOT / "src" / "routertune" / "train" / "orders" / "SmolLM2-135M-Instruct.json"
    committed = ROOT / "benchmarks" / "results" / "static-order" / "static_order.json"
    assert json.loads(shipped.read_text()) == json.loads(committed.read_text())
