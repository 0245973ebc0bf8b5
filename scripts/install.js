#!/usr/bin/env node
// npm's install step: keep a prebuilt binary for this platform when one loads, or a local build that
// loads and is newer than every native source; otherwise build the addon from source with node-gyp
// (which npm puts on the PATH of its scripts). MAMBA_SSM_BUILD_FROM_SOURCE=1 always builds.
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

// Newest modification time (ms) of the files the addon is built from; Infinity when they cannot all
// be read (then the build runs, and says what is missing).
function newestSource() {
  try {
    let newest = fs.statSync(path.join(root, "binding.gyp")).mtimeMs;
    const walk = (dir) => {
      for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
        const file = path.join(dir, entry.name);
        if (entry.isDirectory()) walk(file);
        else newest = Math.max(newest, fs.statSync(file).mtimeMs);
      }
    };
    walk(path.join(root, "native"));
    return newest;
  } catch {
    return Infinity;
  }
}

// In a clone, `npx mamba-ssm` installs the clone itself into npx's cache (a link to it) and runs this
// script there again: a build that `npm install` has just made is kept instead of compiled again
// (minutes on two cores).
function localBuildCurrent() {
  if (process.env.MAMBA_SSM_BUILD_FROM_SOURCE) return false;
  const binary = path.join(root, "build", "Release", "mamba_ssm.node");
  if (!fs.existsSync(binary) || fs.statSync(binary).mtimeMs < newestSource()) return false;
  try {
    require(binary);
  } catch {
    return false;
  }
  console.log("mamba-ssm: build/Release/mamba_ssm.node is newer than every native source; keeping it");
  return true;
}

if (!prebuiltLoads() && !localBuildCurrent()) {
  const jobs = String(Math.max(1, require("os").availableParallelism?.() ?? require("os").cpus().length));
  const r = spawnSync("node-gyp", ["rebuild", "-j", jobs], { cwd: root, stdio: "inherit", shell: process.platform === "win32" });
  if (r.error) {
    console.error(`mamba-ssm: could not run node-gyp (${r.error.message}). Install it (npm i -g node-gyp) with python3, make and a C++17 compiler.`);
    process.exit(1);
  }
  process.exit(r.status ?? 1);
}
