#!/usr/bin/env bash
# An S3-compatible server on loopback for the remote store's tests: moto's, from PyPI,
# installed when missing and started here, with the bucket the tests use (`reprise-test`).
# Prints the endpoint to give as REPRISE_TEST_S3. Idempotent: a server already answering on the
# port is kept. Usage: .ci/s3-server.sh [PORT] (default 5057).
set -euo pipefail
port=${1:-5057}
endpoint="http://127.0.0.1:$port"

python3 -c "import moto.server, flask, flask_cors" 2>/dev/null || python3 -m pip install --quiet 'moto[server]' >&2

up() {
    python3 - "$endpoint" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/", timeout=1)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)
PY
}

if ! up; then
    nohup python3 -m moto.server -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/reprise-moto-$port.log" 2>&1 &
    for _ in $(seq 100); do up && break; sleep 0.2; done
    up || { echo "error: the S3 server did not start; its log:" >&2; tail -n 20 "${TMPDIR:-/tmp}/reprise-moto-$port.log" >&2; exit 1; }
fi

# moto keeps everything in memory and accepts any credentials; creating the bucket twice is fine.
python3 - "$endpoint/reprise-test" <<'PY'
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="PUT"), timeout=5)
PY
echo "$endpoint"
