#!/usr/bin/env python3
"""Every relative link in the repository's Markdown (README, CONTRIBUTING, docs/, examples/) resolves to a
file or folder inside the repository, anchors included for links into Markdown pages; no link points
outside it or at a machine path. Web links are not fetched (CI has no network for them)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "examples").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            out.add(slug)
        # Explicit anchors (`<a id="name"></a>`), which GitHub renders as link targets too.
        out.update(re.findall(r'<a id="([^"]+)"></a>', line))
    return out


bad = []
for page in PAGES:
    if not page.exists():
        bad.append(f"{page.relative_to(ROOT)}: missing")
        continue
    in_code = False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            where = f"{page.relative_to(ROOT)}:{n}: {target}"
            if path.startswith("/"):
                bad.append(f"{where}: an absolute path")
                continue
            dest = (page.parent / path).resolve() if path else page
            if ROOT not in dest.parents and dest != ROOT:
                bad.append(f"{where}: outside the repository")
            elif not dest.exists():
                bad.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where}: no such heading")
for b in bad:
    print("links:", b)
print(f"links: {len(PAGES)} pages checked, {len(bad)} bad")
sys.exit(1 if bad else 0)
