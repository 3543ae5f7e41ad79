"""Check an executed report notebook against the report's HTML.

    python3 .ci/notebook_check.py EXECUTED.ipynb report.html

Every code cell must have run without an error output, and every cell that shows a table, figure
or claim (metadata `reprise.shows`) must display exactly the markup report.html contains for it.
Works for notebooks written by tools/nbexec and by Jupyter (which stores text as lists of lines).
"""
import json
import re
import sys


def text(value):
    return "".join(value) if isinstance(value, list) else value


def main(executed, html_path):
    nb = json.load(open(executed))
    html = open(html_path).read()
    checked = 0
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                sys.exit(f"{executed}: code cell {i} failed: {out.get('ename')}: {out.get('evalue')}")
        shows = cell.get("metadata", {}).get("reprise", {}).get("shows", "")
        if shows.split(":")[0] not in ("table", "figure", "claim"):
            continue
        results = [o for o in cell["outputs"] if o.get("output_type") == "execute_result"]
        shown = text(results[0]["data"].get("text/html", "")) if results else ""
        # The display is the report's own markup inside a styled wrapper.
        m = re.fullmatch(r'<div class="reprise"><style>.*?</style>(.*)</div>', shown, re.S)
        if not m or m.group(1) not in html:
            sys.exit(f"{executed}: {shows} does not show what {html_path} shows")
        checked += 1
    if checked == 0:
        sys.exit(f"{executed}: no table, figure or claim was displayed")
    print(f"notebook: {checked} tables, figures and claims shown as in {html_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
