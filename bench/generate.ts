// Generation speed for models shaped like mamba-130m and mamba2-130m (random weights made here, so
// nothing is downloaded): prefill tokens/s (512-token prompt), decode tokens/s (128 tokens, batch 1),
// aggregate decode tokens/s for 16 sequences, and peak RSS, at f32, bf16 and q8_0. Decode speed is
// also given as a fraction of the read-bandwidth bound (weight bytes per token / measured bandwidth).
// Each configuration runs in its own process so its peak RSS is its own.
//
//   npm run bench:generate [-- --quick] [-- --threads N]
// Prints a table and one JSON line. Not part of `npm test`.
import { spawnSync } from "child_process";
import * as path from "path";
import { getThreads, setThreads, Tensor } from "../lib";
import { MambaModel } from "../lib/models/model";
import { initWeights, preset } from "../lib/models/init";
import { isMatrixWeight } from "../lib/models/config";
import { native } from "../lib/native";

type Arch = "mamba-130m" | "mamba2-130m";
type WeightType = "f32" | "bf16" | "q8_0";

interface Result {
  model: Arch;
  dtype: WeightType;
  weightMB: number;
  prefillTokS: number;
  decodeTokS: number;
  batchDecodeTokS: number;
  decodeBoundTokS: number;
  decodeOfBound: number;
  peakRssMB: number;
}

const argv = process.argv.slice(2);
const quick = argv.includes("--quick");
const threadsArg = argv.indexOf("--threads");
const PROMPT = quick ? 128 : 512;
const DECODE = quick ? 32 : 128;
const BATCH = 16;
const BATCH_PROMPT = quick ? 16 : 64;
const BATCH_STEPS = quick ? 8 : 32;

function measureBandwidth(): number {
  const addon = native();
  const bytes = 1 << 30;
  const t = Tensor.zeros([bytes / 4]);
  (t.data as Float32Array).fill(1);
  let best = Infinity;
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    addon.readSum({ data: t.buffer(), n: bytes / 4 });
    best = Math.min(best, performance.now() - t0);
  }
  t.dispose();
  return bytes / (best / 1000);
}

async function runOne(arch: Arch, dtype: WeightType, bandwidth: number): Promise<Result> {
  const config = preset(arch);
  const weights = initWeights(config, { seed: 1 });
  if (dtype !== "f32") {
    for (const [name, t] of weights) {
      if (isMatrixWeight(name)) {
        weights.set(name, t.to(dtype));
        t.dispose();
      }
    }
  }
  const model = MambaModel.fromWeights(config, weights);
  // Bytes a decode step must read: every weight once (the tied head reads the embedding again).
  // Every weight once; a tied head is the embedding table, read in full (the gathered rows are negligible).
  const bytesPerToken = model.weightBytes;
  const ids = Array.from({ length: PROMPT }, (_, i) => (i * 7919 + 13) % config.vocabSize);

  // Prefill: one native call over the prompt (warm once with a short prompt).
  let state = model.createState(1);
  (await model.prefill(state, [ids.slice(0, 16)])).dispose();
  state.dispose();
  state = model.createState(1);
  let t0 = performance.now();
  let logits = await model.prefill(state, [ids]);
  const prefillMs = performance.now() - t0;

  // Decode: greedy steps from the prefilled state.
  const argmax = (l: Tensor) => {
    const d = l.data as Float32Array;
    let best = 0;
    for (let i = 1; i < d.length; i++) if (d[i] > d[best]) best = i;
    return best;
  };
  let token = argmax(logits);
  logits.dispose();
  t0 = performance.now();
  for (let i = 0; i < DECODE; i++) {
    logits = await model.step(state, [token]);
    token = argmax(logits);
    logits.dispose();
  }
  const decodeMs = performance.now() - t0;
  state.dispose();

  // Batched decode: 16 sequences with their own prompts, stepped together.
  const batchState = model.createState(BATCH);
  const prompts = Array.from({ length: BATCH }, (_, b) => Array.from({ length: BATCH_PROMPT }, (_, i) => (i * 31 + b * 977 + 5) % config.vocabSize));
  logits = await model.prefill(batchState, prompts);
  let tokens = Array.from({ length: BATCH }, (_, b) => argmax(sliceRow(logits, b)));
  logits.dispose();
  t0 = performance.now();
  for (let i = 0; i < BATCH_STEPS; i++) {
    logits = await model.step(batchState, tokens);
    tokens = tokens.map((_, b) => argmax(sliceRow(logits, b)));
    logits.dispose();
  }
  const batchMs = performance.now() - t0;
  batchState.dispose();
  const weightMB = model.weightBytes / 2 ** 20;
  model.dispose();

  const decodeTokS = (1000 * DECODE) / decodeMs;
  const bound = bandwidth / bytesPerToken;
  return {
    model: arch,
    dtype,
    weightMB: +weightMB.toFixed(1),
    prefillTokS: +((1000 * PROMPT) / prefillMs).toFixed(1),
    decodeTokS: +decodeTokS.toFixed(2),
    batchDecodeTokS: +((1000 * BATCH * BATCH_STEPS) / batchMs).toFixed(1),
    decodeBoundTokS: +bound.toFixed(1),
    decodeOfBound: +(decodeTokS / bound).toFixed(3),
    peakRssMB: +(process.resourceUsage().maxRSS / 1024).toFixed(0),
  };
}

function sliceRow(t: Tensor, row: number): Tensor {
  const vocab = t.shape[t.shape.length - 1];
  return Tensor.from((t.data as Float32Array).subarray(row * vocab, (row + 1) * vocab));
}

async function child(arch: Arch, dtype: WeightType, bandwidth: number) {
  const r = await runOne(arch, dtype, bandwidth);
  process.stdout.write(`RESULT ${JSON.stringify(r)}\n`);
}

async function main() {
  if (threadsArg >= 0) setThreads(Number(argv[threadsArg + 1]));
  const childIdx = argv.indexOf("--child");
  if (childIdx >= 0) {
    await child(argv[childIdx + 1] as Arch, argv[childIdx + 2] as WeightType, Number(argv[childIdx + 3]));
    return;
  }
  const bandwidth = measureBandwidth();
  const results: Result[] = [];
  for (const arch of ["mamba-130m", "mamba2-130m"] as Arch[]) {
    for (const dtype of ["f32", "bf16", "q8_0"] as WeightType[]) {
      const args = ["-r", "ts-node/register", __filename, "--child", arch, dtype, String(bandwidth), ...argv];
      const r = spawnSync(process.execPath, args, {
        encoding: "utf8",
        cwd: path.resolve(__dirname, ".."),
        env: { ...process.env, TS_NODE_PROJECT: "tsconfig.test.json", TS_NODE_TRANSPILE_ONLY: "1" },
      });
      const line = r.stdout.split("\n").find((l) => l.startsWith("RESULT "));
      if (!line) {
        process.stderr.write(`bench ${arch} ${dtype} failed:\n${r.stderr}\n`);
        process.exitCode = 1;
        continue;
      }
      results.push(JSON.parse(line.slice(7)));
      process.stderr.write(`done ${arch} ${dtype}\n`);
    }
  }
  const head = ["model", "dtype", "weights MB", "prefill tok/s", "decode tok/s", "of bound", "bound tok/s", `batch-${BATCH} tok/s`, "peak RSS MB"];
  const rows = results.map((r) => [r.model, r.dtype, r.weightMB, r.prefillTokS, r.decodeTokS, `${(100 * r.decodeOfBound).toFixed(0)}%`, r.decodeBoundTokS, r.batchDecodeTokS, r.peakRssMB].map(String));
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const fmt = (cells: string[]) => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  console.log(`mamba-ssm generation benchmark — ${getThreads()} threads, read bandwidth ${(bandwidth / 1e9).toFixed(1)} GB/s; prompt ${PROMPT}, decode ${DECODE}, batch ${BATCH}×${BATCH_STEPS} steps${quick ? " (quick)" : ""}`);
  console.log(fmt(head));
  for (const r of rows) console.log(fmt(r));
  console.log(JSON.stringify({ bench: "generate", threads: getThreads(), bandwidthGBs: +(bandwidth / 1e9).toFixed(2), prompt: PROMPT, decode: DECODE, batch: BATCH, results }));
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
