// Pieces shared by the generation benchmarks: the random models in mamba-130m / mamba2-130m shapes
// (written as GGUF by mamba-ssm's own writer), the machine's read bandwidth, prompts, the runs of one
// model file in a child process, and tables.
import { spawnSync } from "child_process";
import * as path from "path";
import { Tensor } from "../lib";
import { saveCheckpoint } from "../lib/io/checkpoint";
import { expectedShapes, isMatrixWeight, MambaConfig } from "../lib/models/config";
import { initWeights, preset } from "../lib/models/init";
import { stateShapes } from "../lib/models/state";
import { native } from "../lib/native";
import { bytesToByteLevel } from "../lib/tokenizers/byte-level";

export type Arch = "mamba-130m" | "mamba2-130m";
export type WeightType = "f32" | "bf16" | "q8_0";
export const ARCHS: readonly Arch[] = ["mamba-130m", "mamba2-130m"];
export const WEIGHT_TYPES: readonly WeightType[] = ["f32", "bf16", "q8_0"];

// The 1 GiB that measureBandwidth reads, kept for the process's later calls: a disposed tensor's memory
// is released by a finaliser on a later turn of the event loop, so a synchronous loop that measured
// with a fresh buffer each time held one more GiB per call (a bench:peer run reached 24 GB and swapped).
let bandwidthBuffer: Tensor | null = null;

/** Read bandwidth in bytes/s: the best of five vectorised sums over 1 GiB, on every pool thread. */
export function measureBandwidth(): number {
  const bytes = 1 << 30;
  if (!bandwidthBuffer) {
    bandwidthBuffer = Tensor.zeros([bytes / 4]);
    (bandwidthBuffer.data as Float32Array).fill(1);
  }
  let best = Infinity;
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    native().readSum({ data: bandwidthBuffer.buffer(), n: bytes / 4 });
    best = Math.min(best, performance.now() - t0);
  }
  return bytes / (best / 1000);
}

/**
 * Writes the random model of `arch` (seeded, so every call writes the same weights) with its matrices
 * in `dtype` as a GGUF file. The file carries a small byte-level "gpt2" vocabulary (the 256 byte tokens
 * and a few merges, padded to the embedding's rows) so that llama.cpp loads it too.
 */
export function makeBenchModel(arch: Arch, dtype: WeightType, file: string): void {
  const config = preset(arch);
  const weights = initWeights(config, { seed: 1 });
  if (dtype !== "f32") {
    for (const [name, t] of weights) {
      if (isMatrixWeight(name)) {
        // As llama.cpp does, a matrix whose rows are not whole q8_0 blocks (dt_proj at rank 48) is kept in f16.
        const rowsFit = t.shape[t.shape.length - 1] % 32 === 0;
        weights.set(name, t.to(dtype === "q8_0" && !rowsFit ? "f16" : dtype));
        t.dispose();
      }
    }
  }
  const tokens = Array.from({ length: 256 }, (_, b) => bytesToByteLevel([b]));
  const merges = ["Ġ t", "Ġ a", "h e", "i n", "r e"];
  for (const m of merges) tokens.push(m.replace(" ", ""));
  saveCheckpoint(file, { config, weights, tokenizer: { kind: "gguf", tokens, merges, model: "gpt2" } }, { format: "gguf" });
  for (const t of weights.values()) t.dispose();
}

/** The median (the mean of the middle two for an even count). */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/**
 * Peak FLOP/s: the addon's independent FMA chains (fp32) or bf16 pair dot products into fp32
 * (VDPBF16PS; 0 where the CPU level has none) on every pool thread, the median of at least five calls
 * lasting ~0.5 s in all (after two warm-up calls); also the best call.
 */
export function measurePeak(kind: "fp32" | "bf16", quick = false): { median: number; best: number } {
  const iterations = quick ? 2e6 : 1e7;
  const run = () => (kind === "fp32" ? native().fmaPeak({ iterations }) : native().bf16Peak({ iterations }));
  run();
  run();
  const rates: number[] = [];
  const start = performance.now();
  while (rates.length < 5 || performance.now() - start < 500) {
    const t0 = performance.now();
    const flops = run();
    if (flops === 0) return { median: 0, best: 0 };
    rates.push(flops / ((performance.now() - t0) / 1000));
  }
  return { median: median(rates), best: Math.max(...rates) };
}

/**
 * FLOPs a prompt token costs in the matrix products of one forward (2 per multiply-add of every
 * weight matrix but the embedding and the head, which a prefill applies to its last token only; a
 * mixture-of-experts layer's experts counted top-k of the experts' share).
 */
export function prefillMatmulFlops(config: MambaConfig): number {
  let flops = 0;
  for (const [name, shape] of expectedShapes(config)) {
    if (name === "embeddings" || name === "lm_head" || !isMatrixWeight(name)) continue;
    const share = config.moe && /\.fc[12]$/.test(name) ? config.moe.topK / config.moe.numExperts : 1;
    flops += 2 * shape.reduce((a, b) => a * b, 1) * share;
  }
  return flops;
}

/**
 * Bytes of recurrent state a decode step of one sequence reads and writes (the conv window and the
 * SSM state of every Mamba layer, fp32, once each way): traffic a step adds to its weights'.
 */
export function stateTrafficBytes(config: MambaConfig): number {
  const { conv, ssm } = stateShapes(config, 1);
  const floats = (shape: number[]) => shape.reduce((a, b) => a * b, 1);
  return 2 * 4 * (floats(conv) + floats(ssm));
}

/** A deterministic prompt of `length` token ids below `vocab` (`salt` makes different prompts). */
export function promptIds(length: number, vocab: number, salt = 0): number[] {
  return Array.from({ length }, (_, i) => (i * 7919 + salt * 977 + 13) % vocab);
}

export function argmaxRow(logits: Float32Array, row: number, vocab: number): number {
  let best = row * vocab;
  for (let i = best + 1; i < (row + 1) * vocab; i++) if (logits[i] > logits[best]) best = i;
  return best - row * vocab;
}

/** A plain-text table: the first `leftColumns` columns left-aligned, the rest right-aligned. */
export function formatTable(head: string[], rows: string[][], leftColumns = 2): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const fmt = (cells: string[]) => cells.map((c, i) => (i < leftColumns ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  return [fmt(head), ...rows.map(fmt)].join("\n");
}

export const repoRoot = path.resolve(__dirname, "..");

/** What a child run does (bench/mamba-run.js for mamba-ssm, bench/peer-llama.mjs for llama.cpp). */
export interface RunOptions {
  threads: number;
  /** loadModel's device ("cpu" when absent). */
  device?: string;
  prompt: number;
  /** Timed evaluations of the prompt (after one untimed), each in a fresh state; the median counts. */
  prefillReps: number;
  decode: number;
  promptIds: number[];
  batchPrompts: number[][];
  batchPromptLength: number;
  batchSteps: number;
}

/** The runs for a model of `vocab` tokens: a 512-token prompt, 128 decode steps, 16 sequences × 32 steps (quick: smaller). */
export function runOptions(vocab: number, threads: number, quick: boolean): RunOptions {
  const prompt = quick ? 128 : 512;
  const batchPromptLength = quick ? 16 : 64;
  return {
    threads,
    prompt,
    prefillReps: 3,
    decode: quick ? 32 : 128,
    promptIds: promptIds(prompt, vocab),
    batchPrompts: Array.from({ length: 16 }, (_, b) => promptIds(batchPromptLength, vocab, b + 1)),
    batchPromptLength,
    batchSteps: quick ? 8 : 32,
  };
}

/** A child run's result: its "RESULT {json}" line. */
export interface RunResult {
  prefillTokS: number;
  decodeTokS: number;
  batchTokS: number;
  decodeTokens: number[];
  batchTokens: number[][];
  /** mamba-ssm runs: the model's weight bytes and the child's peak RSS. */
  weightBytes?: number;
  peakRssMB?: number;
}

/** Runs `node ...command` and returns its RESULT line; throws with the child's stderr when it has none. */
export function runChild(command: string[], what: string): RunResult {
  const r = spawnSync(process.execPath, command, { encoding: "utf8", cwd: repoRoot, maxBuffer: 64 * 2 ** 20 });
  const line = r.stdout.split("\n").find((l) => l.startsWith("RESULT "));
  if (!line) throw new Error(`${what} failed (exit ${r.status}):\n${r.stderr.slice(-4000)}`);
  return JSON.parse(line.slice(7));
}

/** bench/mamba-run.js on one model file: the compiled package (see compileDist) in plain node. */
export function runMamba(file: string, o: RunOptions, what: string): RunResult {
  return runChild([path.join(__dirname, "mamba-run.js"), file, JSON.stringify(o)], what);
}

/** Compiles lib/ into dist/, which bench/mamba-run.js runs. */
export function compileDist(bench: string): void {
  const tsc = spawnSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", "tsconfig.json"], { cwd: repoRoot, encoding: "utf8" });
  if (tsc.status !== 0) throw new Error(`${bench}: compiling lib/ into dist/ failed:\n${tsc.stdout}${tsc.stderr}`);
}

/** Writes the random model of `arch` in `dtype` to `file` in a child (ts-node) process, as bench/generate.ts --make. */
export function makeBenchModelFile(arch: Arch, dtype: WeightType, file: string): void {
  const made = spawnSync(process.execPath, ["-r", "ts-node/register", path.join(__dirname, "generate.ts"), "--make", arch, dtype, file], {
    encoding: "utf8",
    cwd: repoRoot,
    env: { ...process.env, TS_NODE_PROJECT: "tsconfig.test.json", TS_NODE_TRANSPILE_ONLY: "1" },
  });
  if (made.status !== 0) throw new Error(`making ${arch} ${dtype} failed:\n${made.stderr}`);
}
