// Loads the compiled addon: a prebuilt binary for this platform first (prebuilds/<platform>-<arch>/,
// the prebuildify layout), then a local build (build/Release via `bindings`). When none loads, one
// Error says what was tried and how to fix it.
import * as fs from "fs";
import * as path from "path";

/** Arguments of the native bindings: ArrayBuffers and sizes, named as in native/napi/ops.cpp. */
type Args = Record<string, unknown>;

export interface NativeCpuInfo {
  level: string;
  best: string;
  supported: string[];
  envError: string;
  features: Record<string, boolean>;
}

export interface NativeAddon {
  abiVersion: number;
  alloc(byteLength: number): ArrayBuffer;
  free(buffer: ArrayBuffer): void;
  isDetached(buffer: ArrayBuffer): boolean;
  cpuInfo(): NativeCpuInfo;
  setCpuLevel(level: string): void;
  threads(): number;
  setThreads(n: number): void;
  defaultThreads(): number;
  matmul(args: Args): void;
  convert(args: Args): void;
  rmsnorm(args: Args): void;
  gatedRmsnorm(args: Args): void;
  embedding(args: Args): void;
  conv1d(args: Args): void;
  conv1dStep(args: Args): void;
  selectiveScan(args: Args): void;
  selectiveStateUpdate(args: Args): void;
  ssdChunked(args: Args): void;
  ssdStep(args: Args): void;
  moeRoute(args: Args): void;
  moeExperts(args: Args): void;
  argmax(args: Args): void;
  sample(args: Args): { token: number; rngState?: bigint };
  samplingDraw(args: Args): { draw: number; rngState: bigint };
  fmaPeak(args: Args): number;
  bf16Peak(args: Args): number;
  readSum(args: Args): number;
}

const EXPECTED_ABI = 1;

/** The package root: the folder holding package.json, from dist/ or lib/ alike. */
export const packageRoot = path.resolve(__dirname, "..");

function prebuildCandidates(): string[] {
  const dir = path.join(packageRoot, "prebuilds", `${process.platform}-${process.arch}`);
  if (!fs.existsSync(dir)) return [dir];
  const files = fs.readdirSync(dir).filter((f) => f.endsWith(".node"));
  // node.napi.node first (what prebuildify names an N-API build), then any other.
  files.sort((a, b) => (a === "node.napi.node" ? -1 : b === "node.napi.node" ? 1 : a.localeCompare(b)));
  return files.length ? files.map((f) => path.join(dir, f)) : [dir];
}

function loadAddon(): NativeAddon {
  const tried: string[] = [];
  const override = process.env.MAMBA_SSM_BINARY;
  const candidates: Array<{ label: string; load: () => unknown }> = [];
  if (override) {
    candidates.push({ label: `MAMBA_SSM_BINARY=${override}`, load: () => require(path.resolve(override)) });
  }
  for (const file of prebuildCandidates()) {
    candidates.push({
      label: `prebuilt ${path.relative(packageRoot, file) || file}`,
      load: () => {
        if (!file.endsWith(".node")) throw new Error("no prebuilt binary for this platform");
        return require(file);
      },
    });
  }
  candidates.push({
    label: "local build (build/Release/mamba_ssm.node via bindings)",
    load: () => require("bindings")({ bindings: "mamba_ssm", module_root: packageRoot }),
  });
  for (const c of candidates) {
    try {
      const addon = c.load() as NativeAddon;
      if (addon.abiVersion !== EXPECTED_ABI) {
        tried.push(`${c.label}: built for addon ABI ${addon.abiVersion}, this code needs ${EXPECTED_ABI}`);
        continue;
      }
      return addon;
    } catch (err) {
      const msg = (err as Error).message.split("\n")[0];
      tried.push(`${c.label}: ${msg}`);
    }
  }
  throw new Error(
    `mamba-ssm: could not load the native addon for ${process.platform}-${process.arch} (Node ${process.version}).\n` +
      `Tried:\n${tried.map((t) => `  - ${t}`).join("\n")}\n` +
      `To fix: run \`npm rebuild mamba-ssm\` (needs python3, make and a C++17 compiler), or in a clone ` +
      "`npm run build:native`; or install a package that ships prebuilds for this platform.",
  );
}

let cached: NativeAddon | undefined;

/** The native addon, loaded on first use. */
export function native(): NativeAddon {
  if (!cached) cached = loadAddon();
  return cached;
}
