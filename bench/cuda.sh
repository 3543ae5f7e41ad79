#!/usr/bin/env bash
# The training benchmark on an NVIDIA GPU: our training (a reprise built with `--features cuda`)
# against PyTorch on the same GPU, then the CPU benchmark at all of the machine's cores.
#
# Usage, from the project root:  bench/cuda.sh REPRISE [OUTDIR]
#   REPRISE  the binary, or a gzip of it (`*.gz`), built with `cargo build --features cuda`
#            (docs/cuda.md); it may come from another machine
#   OUTDIR   where the tables and JSON go (default: the current folder): bench-cuda.txt,
#            bench-cpu.txt (each table followed by its JSON line) and gpu.txt
# Environment: PYTHON (default python3) must have a CUDA build of PyTorch; CPU_BENCH=0 skips the
# CPU benchmark.
#
# The binary is linked against CUDA 13's libraries (libcublas, libcublasLt, libcudart, libcurand,
# libnvrtc) and the driver's libcuda.so.1 (R580 or newer). Those the loader does not find are
# looked up in the nvidia-* packages beside PyTorch (a CUDA 13 PyTorch brings them).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
bin=$1
out=${2:-.}
python=${PYTHON:-python3}
if [ ! -f "$bin" ]; then
    echo "bench/cuda.sh: $bin: no such file" >&2
    exit 2
fi
if [ ! -f bench/pytorch_reference.py ]; then
    echo "bench/cuda.sh: run it from the project root (bench/pytorch_reference.py not found)" >&2
    exit 2
fi
mkdir -p "$out"
if [[ $bin == *.gz ]]; then
    unpacked=$(mktemp)
    trap 'rm -f "$unpacked"' EXIT
    gunzip -c "$bin" > "$unpacked"
    chmod +x "$unpacked"
    bin=$unpacked
fi

# Folders holding the libraries the binary needs that the loader does not know.
extra=()
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64; do
    [ -d "$d" ] && extra+=("$d")
done
for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13; do
    if ldconfig -p 2>/dev/null | grep -q "$lib "; then
        continue
    fi
    dir=$("$python" - "$lib" <<'EOF' || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for path in sorted(glob.glob(os.path.join(root, "nvidia", "**", sys.argv[1]), recursive=True)):
        print(os.path.dirname(path))
        sys.exit(0)
EOF
)
    if [ -n "$dir" ] && [[ " ${extra[*]} " != *" $dir "* ]]; then
        extra+=("$dir")
    fi
done
if [ ${#extra[@]} -gt 0 ]; then
    LD_LIBRARY_PATH=$(IFS=:; echo "${extra[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
fi
missing=$(ldd "$bin" | grep 'not found' || true)
if [ -n "$missing" ]; then
    echo "bench/cuda.sh: libraries the binary needs were not found:" >&2
    echo "$missing" >&2
    echo "install CUDA 13 (or a CUDA 13 PyTorch with its nvidia-* packages) and an R580+ driver" >&2
    exit 1
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' 2>&1 || true
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} | tee "$out/gpu.txt"

status=0
"$bin" bench --device cuda --python "$python" --hash-mib 0 --json | tee "$out/bench-cuda.txt" || status=1
if [ "${CPU_BENCH:-1}" != 0 ]; then
    "$bin" bench --python "$python" --hash-mib 1024 --json | tee "$out/bench-cpu.txt" || status=1
fi
exit $status
