#!/usr/bin/env node
// Builds the C++ kernel tests with CMake (no Node needed by the tests themselves) and runs them with ctest.
"use strict";
const { spawnSync } = require("child_process");
const os = require("os");
const path = require("path");

const root = path.resolve(__dirname, "..");
const build = path.join(root, "build-native");
const jobs = String(Math.max(1, os.availableParallelism?.() ?? os.cpus().length));

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: "inherit" });
  if (r.error) {
    console.error(`test:native: could not run ${cmd}: ${r.error.message} (install cmake and a C++17 compiler)`);
    process.exit(1);
  }
  if (r.status !== 0) process.exit(r.status ?? 1);
}

run("cmake", ["-S", root, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DMAMBA_SSM_CUDA=OFF"]);
run("cmake", ["--build", build, "-j", jobs]);
run("ctest", ["--test-dir", build, "--output-on-failure"]);
