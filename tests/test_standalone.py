"""A fresh clone stands on its own: no tracked text file points outside the repository, and
docs/method.md links every step of the method to a function that exists."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("../" + "shared", "FSLORA" + ".md")  # written in two parts so this file passes


def tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    texts = {}
    for name in names:
        try:
            texts[name] = (ROOT / name).read_text()
        except (UnicodeDecodeError, OSError):  # images, binary data, a file deleted but tracked
            continue
    return texts


def test_no_tracked_file_refers_to_a_file_outside_the_repository():
    texts = tracked_text_files()
    assert "docs/method.md" in texts and "README.md" in texts
    hits = [f"{name}:{n}: {line.strip()[:80]}" for name, text in texts.items()
            for n, line in enumerate(text.splitlines(), 1) if any(s in line for s in OUTSIDE)]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_every_function_the_method_document_links_to_exists():
    text = (ROOT / "docs" / "method.md").read_text()
    links = re.findall(r"\[`([\w.]+)`\]\(\.\./([\w/]+\.py)\)", text)
    assert len(links) >= 20
    for name, path in links:
        if name.endswith(".py"):  # a link to a whole file
            continue
        source = (ROOT / path).read_text()
        *owner, leaf = name.split(".")
        assert re.search(rf"^\s*(def|class) {leaf}\b", source, re.MULTILINE), (name, path)
        for cls in owner:  # Class.method: the class is defined in that file too
            assert re.search(rf"^class {cls}\b", source, re.MULTILINE), (name, path)
