// Process-wide settings of the native core: the CPU kernel level and the thread pool.
import { native } from "./native";

export type CpuLevel = "baseline" | "avx2" | "avx512" | "avx512bf16";

export interface CpuInfo {
  /** The kernel level in use. */
  level: CpuLevel;
  /** The best level this CPU supports. */
  best: CpuLevel;
  /** Every level this CPU (and this binary) can run, lowest first. */
  supported: CpuLevel[];
  /** CPU features the kernels look at. */
  features: Record<string, boolean>;
}

let warnedEnv = false;

export function cpuInfo(): CpuInfo {
  const info = native().cpuInfo();
  if (info.envError && !warnedEnv) {
    warnedEnv = true;
    process.emitWarning(`mamba-ssm: ${info.envError}; using ${info.level}`);
  }
  return {
    level: info.level as CpuLevel,
    best: info.best as CpuLevel,
    supported: info.supported as CpuLevel[],
    features: info.features,
  };
}

/** Uses the kernels of a lower (or the best) level; throws when this CPU cannot run the level. */
export function setCpuLevel(level: CpuLevel): void {
  native().setCpuLevel(level);
}

/** Threads the kernels use. */
export function getThreads(): number {
  return native().threads();
}

/** Resizes the thread pool (MAMBA_SSM_THREADS sets the initial size; default: the cores this process may use). */
export function setThreads(threads: number): void {
  if (!Number.isInteger(threads) || threads < 1) {
    throw new Error(`setThreads: threads must be an integer >= 1, got ${threads}`);
  }
  native().setThreads(threads);
}
