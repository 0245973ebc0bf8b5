#!/usr/bin/env node
// Makes prebuilds/<platform>-<arch>/node.napi.node (the prebuildify layout) from a fresh release build.
"use strict";
const { spawnSync } = require("child_process");
const fs = require("fs");
const path = require("path");

const root = path.resolve(__dirname, "..");
const built = path.join(root, "build", "Release", "mamba_ssm.node");

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: "inherit" });
  if (r.status !== 0) {
    console.error(`mamba-ssm prebuild: ${cmd} ${args.join(" ")} failed`);
    process.exit(r.status ?? 1);
  }
}

if (!fs.existsSync(built) || process.argv.includes("--rebuild")) {
  run("node-gyp", ["rebuild", "-j", String(require("os").cpus().length)]);
}
const dir = path.join(root, "prebuilds", `${process.platform}-${process.arch}`);
fs.mkdirSync(dir, { recursive: true });
const target = path.join(dir, "node.napi.node");
const tmp = `${target}.tmp-${process.pid}`;
fs.copyFileSync(built, tmp);
if (process.platform === "linux") spawnSync("strip", ["--strip-debug", tmp], { stdio: "inherit" });
fs.renameSync(tmp, target);
console.log(`mamba-ssm prebuild: wrote ${path.relative(root, target)} (${fs.statSync(target).size} bytes)`);
