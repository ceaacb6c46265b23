#!/usr/bin/env bash
# benchmarks/gpu_check.py on a GPU machine that reaches no package registry.
#
# The wheels it lacks (diffusers, pydantic, PyAV, ...) come with the call: make them here
# with `.venv/bin/python benchmarks/gpu_check.py --bundle .gpu-bundle` and carry
# `.gpu-bundle`. They are installed into a folder of their own that only this run puts on
# PYTHONPATH, so the machine's own packages stay as they are. farm and benchmarks are
# read from this source tree. Arguments go to gpu_check.py. Where $OUT is set (the
# device tool's folder of files that come back), the results file and the log go there.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${GPU_CHECK_PYTHON:-python3}
bundle=${GPU_CHECK_BUNDLE:-.gpu-bundle}
site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}

if compgen -G "$bundle/*.whl" > /dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$bundle"/*.whl
    echo "installed into $site: $(cd "$bundle" && ls ./*.whl | sed 's|^\./||' | tr '\n' ' ')"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in $bundle: running on what $python has" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ -n "${OUT:-}" ]]; then
    "$python" benchmarks/gpu_check.py --results-dir "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
    exec "$python" benchmarks/gpu_check.py "$@"
fi
