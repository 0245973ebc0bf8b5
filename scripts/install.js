#!/usr/bin/env node
// npm's install step: keep a prebuilt binary for this platform when one loads, otherwise build the
// addon from source with node-gyp (which npm puts on the PATH of its scripts).
"use strict";
const { spawnSync } = require("child_process");
const fs = require("fs");
const path = require("path");

const root = path.resolve(__dirname, "..");
const dir = path.join(root, "prebuilds", `${process.platform}-${process.arch}`);

function prebuiltLoads() {
  if (process.env.MAMBA_SSM_BUILD_FROM_SOURCE) return false;
  if (!fs.existsSync(dir)) return false;
  for (const f of fs.readdirSync(dir).filter((n) => n.endsWith(".node"))) {
    try {
      require(path.join(dir, f));
      console.log(`mamba-ssm: using prebuilt ${path.join("prebuilds", path.basename(dir), f)}`);
      return true;
    } catch (err) {
      console.log(`mamba-ssm: prebuilt ${f} does not load here (${err.message.split("\n")[0]}); building from source`);
    }
  }
  return false;
}

if (!prebuiltLoads()) {
  const jobs = String(Math.max(1, require("os").availableParallelism?.() ?? require("os").cpus().length));
  const r = spawnSync("node-gyp", ["rebuild", "-j", jobs], { cwd: root, stdio: "inherit", shell: process.platform === "win32" });
  if (r.error) {
    console.error(`mamba-ssm: could not run node-gyp (${r.error.message}). Install it (npm i -g node-gyp) with python3, make and a C++17 compiler.`);
    process.exit(1);
  }
  process.exit(r.status ?? 1);
}
