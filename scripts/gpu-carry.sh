#!/usr/bin/env bash
# Packs what bench/gpu-check.sh needs to run the Node addon's GPU tests on a machine without Node:
# .node-bin/node.xz (this machine's node binary) and .node-bin/node_modules.tar.xz (the project's
# installed node_modules). Run from the repository root after `npm install`; .node-bin/ is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules/jest ] || { echo "gpu-carry: node_modules is missing; run npm install first" >&2; exit 1; }
mkdir -p .node-bin
xz -9 -T0 -c "$(command -v node)" > .node-bin/node.xz.tmp && mv .node-bin/node.xz.tmp .node-bin/node.xz
tar -cJf .node-bin/node_modules.tar.xz.tmp node_modules && mv .node-bin/node_modules.tar.xz.tmp .node-bin/node_modules.tar.xz
ls -l .node-bin
