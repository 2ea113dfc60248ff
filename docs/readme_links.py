"""README's Paper -> code links name a definition and its line: [`name`](intuitor.py#L123). After an edit moves
the code, `python docs/readme_links.py` rewrites every such link to the line that defines the name now
(intuitor.py and ablations.py); `--check` only lists the stale ones and exits 1 when there are any."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[`(\w+)`\]\((intuitor|ablations)\.py#L(\d+)\)")


def defined_at(name, module):
    """The line (1-based) where `module`.py defines `name` at top level (def, class or assignment)."""
    source = open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read().splitlines()
    starts = (f"def {name}(", f"class {name}(", f"class {name}:", f"{name} = ", f"{name}: ")
    return next((i + 1 for i, line in enumerate(source) if line.startswith(starts)), None)


def stale_links(readme):
    """{name: (linked line, defining line)} for every link that points elsewhere (None: no definition)."""
    links = {(name, module, int(line)) for name, module, line in LINK.findall(readme)}
    return {name: (line, defined_at(name, module)) for name, module, line in links if defined_at(name, module) != line}


def main(argv):
    path = os.path.join(ROOT, "README.md")
    readme = open(path, encoding="utf-8").read()
    stale = stale_links(readme)
    if "--check" in argv:
        print("\n".join(f"{name}: L{a} -> L{b}" for name, (a, b) in sorted(stale.items())) or "every link is current")
        return 1 if stale else 0
    missing = [name for name, (_, line) in stale.items() if line is None]
    if missing:
        print(f"error: README links names no longer defined: {', '.join(sorted(missing))}", file=sys.stderr)
        return 1

    def current(m):
        return f"[`{m[1]}`]({m[2]}.py#L{defined_at(m[1], m[2])})"

    with open(path, "w", encoding="utf-8") as f:
        f.write(LINK.sub(current, readme))
    print(f"README.md: {len(stale)} link(s) moved")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
