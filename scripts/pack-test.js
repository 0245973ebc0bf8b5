#!/usr/bin/env node
// Shows the published package works without building: makes the prebuilt binary, packs the package,
// installs the tarball into a fresh temporary project with install scripts disabled, and uses it there.
"use strict";
const { execFileSync } = require("child_process");
const fs = require("fs");
const os = require("os");
const path = require("path");

const root = path.resolve(__dirname, "..");
const npm = process.platform === "win32" ? "npm.cmd" : "npm";
const sh = (cmd, args, cwd) => execFileSync(cmd, args, { cwd, stdio: ["ignore", "pipe", "inherit"] }).toString();

// The prebuilt binary made here is removed again afterwards (unless one was there already), so it
// never shadows a later local build in this checkout.
const prebuildDir = path.join(root, "prebuilds");
const hadPrebuilds = fs.existsSync(prebuildDir);
execFileSync(process.execPath, [path.join(__dirname, "prebuild.js")], { cwd: root, stdio: "inherit" });
const work = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-pack-"));
try {
  const packed = JSON.parse(sh(npm, ["pack", "--json", "--pack-destination", work], root))[0];
  const tarball = path.join(work, packed.filename);
  const files = packed.files.map((f) => f.path);
  for (const needed of ["dist/index.js", "dist/index.d.ts", "dist/cli.js", "models/default/config.json", "models/default/model.safetensors", `prebuilds/${process.platform}-${process.arch}/node.napi.node`]) {
    if (!files.includes(needed)) throw new Error(`the package lacks ${needed}`);
  }
  const app = path.join(work, "app");
  fs.mkdirSync(app);
  fs.writeFileSync(path.join(app, "package.json"), JSON.stringify({ name: "app", version: "1.0.0", private: true }));
  sh(npm, ["install", "--ignore-scripts", "--no-audit", "--no-fund", tarball], app);
  if (fs.existsSync(path.join(app, "node_modules", "mamba-ssm", "build"))) throw new Error("a build folder appeared: scripts ran");
  const script = `
    const m = require("mamba-ssm");
    const x = m.Tensor.from([1, 2, 3, 4], [2, 2]);
    const w = m.Tensor.from([1, 0, 0, 1, 1, 1], [3, 2]);
    const y = m.ops.matmul(x, w);
    const got = Array.from(y.data).join(",");
    if (got !== "1,2,3,3,4,7") throw new Error("matmul gave " + got);
    console.log("loaded mamba-ssm " + m.version + " from the tarball; cpu " + m.cpuInfo().level + "; matmul ok");
  `;
  process.stdout.write(sh(process.execPath, ["-e", script], app));
  process.stdout.write(sh(path.join(app, "node_modules", ".bin", "mamba-ssm"), ["--version"], app));
  // The README's first command: generate from the embedded default model, nothing else needed.
  const generated = JSON.parse(
    sh(path.join(app, "node_modules", ".bin", "mamba-ssm"), ["generate", "The Python ", "--max-tokens", "16", "--seed", "1", "--json"], app),
  );
  if (generated.tokens.length !== 16 || typeof generated.text !== "string") throw new Error(`generate gave ${JSON.stringify(generated)}`);
  console.log(`npx mamba-ssm generate from the tarball: ${JSON.stringify("The Python " + generated.text)}`);
  console.log("pack test: ok");
} finally {
  fs.rmSync(work, { recursive: true, force: true });
  if (!hadPrebuilds) fs.rmSync(prebuildDir, { recursive: true, force: true });
}
