#!/usr/bin/env bash
# Run a generated notebook headless under evcxr (the engine of the evcxr Jupyter kernel) and in
# Jupyter with the evcxr_jupyter kernel; fail on any cell error or any display that differs from
# the report's HTML.
#
#   bash .ci/notebook.sh            # the tiny fixture report: run it, write its notebook, execute
#   bash .ci/notebook.sh SPEC...    # the notebooks of these reports (their cells must be cached)
#
# tools/nbexec (not a workspace member, so plain `cargo test` never builds evcxr) runs each code
# cell through evcxr's CommandContext, from the notebook's folder as a kernel would. What is slow
# is kept under $REPRISE_CI_CACHE (default ~/.cache/reprise-ci) between runs:
#   nbexec-target/  the nbexec build (evcxr and rust-analyzer's crates: 6 min on 2 cores, once)
#   evcxr/          EVCXR_TMPDIR: evcxr's own build folder, where the notebook's `:dep` compiles
#                   reprise with candle and polars (11 min the first time; later runs rebuild
#                   only reprise itself)
#   bin/, jupyter/  evcxr_jupyter (the Jupyter kernel) and a Python environment with nbconvert
# Each notebook runs twice: through nbexec, then in Jupyter with the evcxr_jupyter kernel
# (`jupyter nbconvert --execute`). After each, .ci/notebook_check.py compares every table, figure
# and claim the notebook displayed with the report's HTML.
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

# Jupyter and the evcxr kernel, under the cache folder (the kernel spec too, via JUPYTER_PATH, so
# nothing is registered in the user's own Jupyter). evcxr_jupyter is the release matching the
# evcxr of tools/nbexec and builds in the same target folder (about a minute after nbexec).
if [ ! -x "$cache/bin/evcxr_jupyter" ]; then
  phase "installing evcxr_jupyter"
  CARGO_TARGET_DIR="$cache/nbexec-target" cargo install --quiet --locked --root "$cache" evcxr_jupyter@0.22.0
fi
if [ ! -x "$cache/jupyter/bin/jupyter" ]; then
  phase "installing nbconvert"
  python3 -m venv "$cache/jupyter"
  "$cache/jupyter/bin/pip" install --quiet nbconvert==7.17.2 nbclient==0.11.0 jupyter_client==8.10.0
fi
JUPYTER_PATH="$cache/jupyter-data" "$cache/bin/evcxr_jupyter" --install >/dev/null

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
  python3 "$repo/.ci/notebook_check.py" "$executed" "$(dirname "$nb")/report.html" || status=1

  # The same notebook in Jupyter itself: the evcxr_jupyter kernel driven by nbconvert, as a
  # user runs it. The kernel shares evcxr's build folder, so the `:dep` is already compiled.
  phase "executing $nb in Jupyter (evcxr_jupyter, nbconvert)"
  jupyter_out="${nb%.ipynb}.jupyter.ipynb"
  # LD_LIBRARY_PATH: with EVCXR_TMPDIR and rustup's home both under $HOME the kernel's child
  # cannot find libstd ("dlopen failed"; see docs/notebooks.md).
  if ! LD_LIBRARY_PATH="$(rustc --print target-libdir)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
      JUPYTER_PATH="$cache/jupyter-data" EVCXR_TMPDIR="$cache/evcxr" REPRISE_CACHE= \
      "$cache/jupyter/bin/jupyter" nbconvert --to notebook --execute --log-level WARN \
      --ExecutePreprocessor.kernel_name=rust --ExecutePreprocessor.timeout=3600 \
      --output-dir "$(dirname "$jupyter_out")" --output "$(basename "$jupyter_out")" "$nb"; then
    status=1
    continue
  fi
  python3 "$repo/.ci/notebook_check.py" "$jupyter_out" "$(dirname "$nb")/report.html" || status=1
done
phase "done"
exit $status
