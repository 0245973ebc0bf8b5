import { execFileSync, spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { cpuInfo, getThreads, setCpuLevel, setThreads, version } from "../lib";

const root = path.resolve(__dirname, "..");
const cli = path.join(root, "dist", "cli.js");

describe("CPU levels", () => {
  test("the best supported level is used by default, and every supported level can be chosen", () => {
    const info = cpuInfo();
    expect(info.supported[0]).toBe("baseline");
    expect(info.supported).toContain(info.best);
    for (const level of info.supported) {
      setCpuLevel(level);
      expect(cpuInfo().level).toBe(level);
    }
    setCpuLevel(info.best);
  });

  test("an unknown level is refused by name", () => {
    expect(() => setCpuLevel("sse9" as never)).toThrow('unknown level "sse9"; expected baseline, avx2, avx512 or avx512bf16');
  });

  test("MAMBA_SSM_CPU forces a lower level in a new process, and a bad value warns and falls back", () => {
    const run = (value: string) =>
      spawnSync(process.execPath, [cli, "info"], { env: { ...process.env, MAMBA_SSM_CPU: value }, encoding: "utf8" });
    const low = run("baseline");
    expect(low.status).toBe(0);
    expect(low.stdout).toMatch(/cpu level: baseline/);
    const bad = run("fastest");
    expect(bad.stdout).toMatch(new RegExp(`cpu level: ${cpuInfo().best}`));
    expect(bad.stderr).toMatch(/MAMBA_SSM_CPU=fastest is not a CPU level/);
  });
});

describe("threads", () => {
  test("the pool can be resized and MAMBA_SSM_THREADS sets it in a new process", () => {
    const n = getThreads();
    expect(n).toBeGreaterThanOrEqual(1);
    setThreads(3);
    expect(getThreads()).toBe(3);
    setThreads(n);
    expect(() => setThreads(0)).toThrow("threads must be an integer >= 1, got 0");
    const out = execFileSync(process.execPath, [cli, "info"], { env: { ...process.env, MAMBA_SSM_THREADS: "5" }, encoding: "utf8" });
    expect(out).toMatch(/threads:\s+5/);
  });
});

describe("CLI", () => {
  test("prints the version, the CPU level and the threads", () => {
    const out = execFileSync(process.execPath, [cli, "--threads", "2"], { encoding: "utf8" });
    expect(out).toContain(`mamba-ssm ${version}`);
    expect(out).toMatch(/cpu level: (baseline|avx2|avx512|avx512bf16)/);
    expect(out).toMatch(/threads:\s+2/);
    expect(execFileSync(process.execPath, [cli, "--version"], { encoding: "utf8" }).trim()).toBe(version);
  });

  test("an unknown command exits 2 with the usage", () => {
    const r = spawnSync(process.execPath, [cli, "fly"], { encoding: "utf8" });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('unknown command "fly"');
    expect(r.stderr).toContain("Usage:");
  });
});

describe("loading the addon", () => {
  test("when no binary loads, one Error lists what was tried and how to fix it", () => {
    // A copy of the compiled TypeScript with no build/ and no prebuilds/ beside it.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-noaddon-"));
    try {
      fs.cpSync(path.join(root, "dist"), path.join(dir, "dist"), { recursive: true });
      fs.copyFileSync(path.join(root, "package.json"), path.join(dir, "package.json"));
      fs.symlinkSync(path.join(root, "node_modules"), path.join(dir, "node_modules"));
      const r = spawnSync(process.execPath, ["-e", `require(${JSON.stringify(path.join(dir, "dist"))}).Tensor.zeros([1])`], {
        encoding: "utf8",
        env: { ...process.env, MAMBA_SSM_BINARY: "" },
      });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain("mamba-ssm: could not load the native addon");
      expect(r.stderr).toMatch(/prebuilt prebuilds\/.*no prebuilt binary for this platform/);
      expect(r.stderr).toContain("local build (build/Release/mamba_ssm.node via bindings)");
      expect(r.stderr).toContain("npm rebuild mamba-ssm");
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test("npm's install step keeps a local build newer than every native source, and builds otherwise", () => {
    // A copy of the package's build inputs with the real binary, and a stand-in node-gyp on the PATH
    // that records being run.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-install-"));
    try {
      fs.mkdirSync(path.join(dir, "scripts"));
      fs.copyFileSync(path.join(root, "scripts", "install.js"), path.join(dir, "scripts", "install.js"));
      fs.copyFileSync(path.join(root, "binding.gyp"), path.join(dir, "binding.gyp"));
      fs.mkdirSync(path.join(dir, "native", "cpu"), { recursive: true });
      const source = path.join(dir, "native", "cpu", "gemm.cpp");
      fs.writeFileSync(source, "// a source\n");
      fs.mkdirSync(path.join(dir, "build", "Release"), { recursive: true });
      const binary = path.join(dir, "build", "Release", "mamba_ssm.node");
      fs.copyFileSync(path.join(root, "build", "Release", "mamba_ssm.node"), binary);
      const bin = path.join(dir, "bin");
      fs.mkdirSync(bin);
      const marker = path.join(dir, "node-gyp-ran");
      fs.writeFileSync(path.join(bin, "node-gyp"), `#!/bin/sh\necho "$@" > ${JSON.stringify(marker)}\n`, { mode: 0o755 });
      const install = (env: NodeJS.ProcessEnv = {}) => {
        fs.rmSync(marker, { force: true });
        const r = spawnSync(process.execPath, [path.join(dir, "scripts", "install.js")], {
          encoding: "utf8",
          env: { ...process.env, MAMBA_SSM_BUILD_FROM_SOURCE: "", PATH: `${bin}${path.delimiter}${process.env.PATH}`, ...env },
        });
        expect(r.status).toBe(0);
        return { built: fs.existsSync(marker), out: r.stdout };
      };
      const past = new Date(Date.now() - 3600e3);
      fs.utimesSync(source, past, past);
      fs.utimesSync(path.join(dir, "binding.gyp"), past, past);
      const kept = install();
      expect(kept.built).toBe(false);
      expect(kept.out).toContain("newer than every native source; keeping it");
      expect(install({ MAMBA_SSM_BUILD_FROM_SOURCE: "1" }).built).toBe(true);
      const future = new Date(Date.now() + 3600e3);
      fs.utimesSync(source, future, future);  // a source edited after the build
      expect(install().built).toBe(true);
      fs.utimesSync(source, past, past);
      fs.writeFileSync(binary, "not an addon");  // a build that does not load
      expect(install().built).toBe(true);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a prebuilt binary in prebuilds/<platform>-<arch>/ is loaded before the local build", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-prebuilt-"));
    try {
      fs.cpSync(path.join(root, "dist"), path.join(dir, "dist"), { recursive: true });
      fs.copyFileSync(path.join(root, "package.json"), path.join(dir, "package.json"));
      fs.symlinkSync(path.join(root, "node_modules"), path.join(dir, "node_modules"));
      const pre = path.join(dir, "prebuilds", `${process.platform}-${process.arch}`);
      fs.mkdirSync(pre, { recursive: true });
      fs.copyFileSync(path.join(root, "build", "Release", "mamba_ssm.node"), path.join(pre, "node.napi.node"));
      const out = execFileSync(
        process.execPath,
        ["-e", `const m = require(${JSON.stringify(path.join(dir, "dist"))}); m.Tensor.zeros([1]); console.log(Object.keys(require.cache).filter(k => k.endsWith(".node")).join())`],
        { encoding: "utf8" },
      );
      expect(out.trim()).toBe(path.join(pre, "node.napi.node"));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
