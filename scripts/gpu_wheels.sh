#!/usr/bin/env bash
# On a CPU machine with PyPI: put into .whl/ exactly the wheels the GPU check needs that the GPU image lacks
# (scripts/gpu_check/wheels.txt), for CPython 3.12 on manylinux x86-64, and check the set
# (scripts/gpu_check/wheel_imports.py wheels: one version each, under the device tool's 64 MiB, every
# Requires-Dist carried or on the image). docs/gpu_check.md says how they travel (carry=[".whl"]).
#
#   bash scripts/gpu_wheels.sh          # .whl/ is emptied first
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
dest=.whl
rm -rf "$dest"
mkdir -p "$dest"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
target=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}")
build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT
grep -v '^\s*#' scripts/gpu_check/wheels.txt | sed 's/#.*//' | while read -r spec how _; do
  [ -n "$spec" ] || continue
  if [ "${how:-download}" = build ]; then
    # PyPI has only a source archive (deepspeed): build a pure-Python wheel, no compiled ops (DS_BUILD_OPS=0).
    echo "[gpu_wheels] build    $spec"
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-binary :all: -w "$build_dir" "$spec"
    mv "$build_dir"/*.whl "$dest"/
  else
    echo "[gpu_wheels] download $spec"
    "$py" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$dest" "$spec"
  fi
done
# A wheel the build tagged for another interpreter would not install there: every wheel must be cp312 or py3.
for w in "$dest"/*.whl; do
  case "$(basename "$w")" in
    *-cp312-cp312-manylinux*x86_64*.whl | *-py3-none-any.whl | *-py2.py3-none-any.whl) ;;
    *) echo "[gpu_wheels] $(basename "$w") does not install on CPython 3.12 / x86-64" >&2; exit 1 ;;
  esac
done
du -cb "$dest"/*.whl | tail -1 | awk '{printf "[gpu_wheels] %d wheels, %.1f MiB in .whl/\n", n, $1 / 1048576}' n="$(ls "$dest"/*.whl | wc -l)"
report="$build_dir/check.json"
if ! "$py" scripts/gpu_check/wheel_imports.py wheels --dir "$dest" >"$report"; then
  cat "$report" >&2
  exit 1
fi
"$py" - "$report" <<'PY'
import json, sys

report = json.load(open(sys.argv[1]))
for note in report["unverified_versions"]:
    print(f"[gpu_wheels] to see on the GPU machine (install stage): {note}")
PY
echo "[gpu_wheels] checked: wheels.txt matched, every Requires-Dist carried or on the image"
