"""
The blocks of the docs that tests generate from the code, so that they cannot drift:
each sits between two HTML comments in a Markdown file,

    <!-- generated: NAME (tests/... ; CODER1_REGENERATE_DOCS=1 rewrites it) -->
    ```
    ...
    ```
    <!-- end: NAME -->

A test renders the block's text and compares it with the file's; with the environment
variable C{CODER1_REGENERATE_DOCS=1} it writes its rendering into the file instead.
"""

from __future__ import annotations

import os
import re

from twisted.python.filepath import FilePath

DOCS = FilePath(__file__).parent().parent().child("docs")
#: Whether tests rewrite the blocks they generate (then check what they wrote).
REGENERATE = os.environ.get("CODER1_REGENERATE_DOCS") == "1"


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated: {re.escape(name)} [^\n]*-->\n```\n)(.*?)(```\n<!-- end: "
        rf"{re.escape(name)} -->)",
        re.DOTALL,
    )


def read_block(doc: str, name: str) -> str:
    """The text of block C{name} of C{docs/doc}."""
    found = _pattern(name).search(DOCS.child(doc).getContent().decode())
    if found is None:
        raise LookupError(f"docs/{doc} has no generated block {name!r}")
    return found.group(2)


def write_block(doc: str, name: str, text: str) -> None:
    """Put C{text} in block C{name} of C{docs/doc}."""
    path = DOCS.child(doc)
    content = path.getContent().decode()
    read_block(doc, name)
    path.setContent(_pattern(name).sub(lambda m: m.group(1) + text + m.group(3), content).encode())


def check_block(doc: str, name: str, text: str) -> str:
    """
    What block C{name} of C{docs/doc} says, once it says C{text} (written first when
    regenerating).
    """
    if REGENERATE:
        write_block(doc, name, text)
    return read_block(doc, name)
