#!/usr/bin/env bash
# Run a generated notebook headless under evcxr (the engine of the evcxr Jupyter kernel) and
# fail on any cell error.
#
#   bash .ci/notebook.sh            # the tiny fixture report: run it, write its notebook, execute
#   bash .ci/notebook.sh SPEC...    # the notebooks of these reports (their cells must be cached)
#
# tools/nbexec (not a workspace member, so plain `cargo test` never builds evcxr) runs each code
# cell through evcxr's CommandContext, from the notebook's folder as a kernel would. What is slow
# is kept under $REPRISE_CI_CACHE (default ~/.cache/reprise-ci) between runs:
#   nbexec-target/  the nbexec build (evcxr and rust-analyzer's crates: ~10 min on 2 cores, once)
#   evcxr/          EVCXR_TMPDIR: evcxr's own build folder, where the notebook's `:dep` compiles
#                   reprise with candle and polars (~15 min the first time; later runs rebuild
#                   only reprise itself)
# Then a Python check compares every table, figure and claim the notebook displayed with the
# report's HTML.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${REPRISE_CI_CACHE:-$HOME/.cache/reprise-ci}
mkdir -p "$cache/evcxr"
t0=$SECONDS
phase() { echo "notebook.sh: $1 ($((SECONDS - t0)) s so far)"; }

# rust-src: evcxr's analysis (variable types, completions) reads the standard library's sources.
if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
  rustup component add rust-src
fi

# nbexec: cargo builds it only when it is missing or its sources changed. --locked: evcxr's
# rust-analyzer crates need the exact versions of tools/nbexec/Cargo.lock (newer salsa releases
# break them).
phase "building tools/nbexec"
CARGO_TARGET_DIR="$cache/nbexec-target" cargo build --release --locked --quiet --manifest-path "$repo/tools/nbexec/Cargo.toml"
nbexec="$cache/nbexec-target/release/nbexec"

phase "building reprise"
(cd "$repo" && cargo build --quiet)
reprise="$repo/target/debug/reprise"

# The reports whose notebooks run: the named specs, or the tiny fixture copied into a project
# inside the repository (so the notebook's `:dep` path is relative, as in a user's clone).
notebooks=()
if [ $# -gt 0 ]; then
  for spec in "$@"; do
    p=$("$reprise" notebook "$spec")
    case $p in /*) ;; *) p="$PWD/$p" ;; esac
    notebooks+=("$p")
  done
else
  proj="$repo/target/notebook-ci"
  rm -rf "$proj"
  mkdir -p "$proj"/{reports,templates,data-manifests,data}
  cp "$repo/tests/fixtures/tiny/reports/tiny.toml" "$proj/reports/"
  cp "$repo/tests/fixtures/tiny/templates/tiny.md.j2" "$repo/templates/base.html.j2" "$proj/templates/"
  cp "$repo/data-manifests/optdigits-8x8.toml" "$proj/data-manifests/"
  cp "$repo/data/optdigits_8x8.csv.gz" "$proj/data/"
  phase "running the tiny report"
  (cd "$proj" && REPRISE_CACHE= "$reprise" run reports/tiny.toml)
  notebooks+=("$proj/$(cd "$proj" && REPRISE_CACHE= "$reprise" notebook reports/tiny.toml)")
fi

# evcxr resolves the notebook's `:dep` in its own crate; starting its lock file from ours builds
# the versions `cargo test` builds (it keeps its lock file between runs after that).
[ -f "$cache/evcxr/Cargo.lock" ] || cp "$repo/Cargo.lock" "$cache/evcxr/Cargo.lock"

status=0
for nb in "${notebooks[@]}"; do
  executed="${nb%.ipynb}.executed.ipynb"
  phase "executing $nb"
  if ! EVCXR_TMPDIR="$cache/evcxr" REPRISE_CACHE= "$nbexec" "$nb" --out "$executed"; then
    status=1
    continue
  fi
  phase "comparing its displays with the HTML report"
  python3 - "$executed" "$(dirname "$nb")/report.html" <<'PY' || status=1
import json, re, sys
nb = json.load(open(sys.argv[1]))
html = open(sys.argv[2]).read()
checked = 0
for cell in nb["cells"]:
    shows = cell.get("metadata", {}).get("reprise", {}).get("shows", "")
    if not shows.split(":")[0] in ("table", "figure", "claim"):
        continue
    out = [o for o in cell["outputs"] if o.get("output_type") == "execute_result"]
    shown = out[0]["data"]["text/html"] if out else ""
    # The display is the report's own markup inside a styled wrapper.
    m = re.fullmatch(r'<div class="reprise"><style>.*?</style>(.*)</div>', shown, re.S)
    if not m or m.group(1) not in html:
        sys.exit(f"{sys.argv[1]}: {shows} does not show what {sys.argv[2]} shows")
    checked += 1
print(f"notebook.sh: {checked} tables, figures and claims shown as in {sys.argv[2]}")
PY
done
phase "done"
exit $status
