#!/usr/bin/env python3
"""Lists the external programs the driver's code starts, one per line, read
from src/: the first argument of `run_tool("NAME", ...)` and of
`Command::new("NAME")`, outside `#[cfg(test)]` modules (their tools, such as
debugfs, run on the test machine, not in the image). A program started any
other way would be missed, so src/ is also searched for the ways this does
not understand (a `Command::new` of a non-literal), which fail the listing.

    tools.py SRC_DIR
"""

import os
import re
import sys

CALL = re.compile(r'(?:\brun_tool|\bCommand::new)\(\s*"([^"]+)"')
ANY = re.compile(r'\bCommand::new\(|\brun_tool\(')


def strip_items(text, start):
    """The file without the items that `start` (a regex) begins (brace-matched)."""
    out, i = [], 0
    for m in re.finditer(start, text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        j = text.find("{", m.end())
        semi = text.find(";", m.end())
        if j < 0 or (0 <= semi < j):  # `#[cfg(test)] use ...;`
            i = semi + 1
            continue
        depth = 0
        for k in range(j, len(text)):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0:
                i = k + 1
                break
        else:
            i = len(text)
    out.append(text[i:])
    return "".join(out)


def main():
    tools, unknown = set(), []
    for dirpath, _, files in os.walk(sys.argv[1]):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            code = open(path, encoding="utf-8").read()
            code = re.sub(r"//[^\n]*", "", code)
            code = strip_items(code, r"#\[cfg\(test\)\]")
            # run_tool's own body starts whatever program its callers name.
            code = strip_items(code, r"\bfn run_tool\(")
            for m in ANY.finditer(code):
                lit = CALL.match(code, m.start())
                if lit:
                    tools.add(lit.group(1))
                else:
                    unknown.append(f"{path}: {code[m.start():m.start() + 60].splitlines()[0]}")
    if unknown:
        for u in unknown:
            print(f"tools.py: cannot tell which program this starts: {u}", file=sys.stderr)
        sys.exit(1)
    print("\n".join(sorted(tools)))


if __name__ == "__main__":
    main()
