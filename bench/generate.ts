// Generation speed for models shaped like mamba-130m and mamba2-130m (random weights made here, so
// nothing is downloaded): prefill tokens/s (512-token prompt), decode tokens/s (128 tokens, batch 1),
// aggregate decode tokens/s for 16 sequences, and peak RSS, at f32, bf16 and q8_0. Decode speed is
// also given as a fraction of the read-bandwidth bound (weight bytes per token / measured bandwidth).
// Each configuration runs in its own process so its peak RSS is its own.
//
//   npm run bench:generate [-- --quick] [-- --threads N]
// Prints a table and one JSON line. Not part of `npm test`.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { getThreads, setThreads, Tensor } from "../lib";
import { loadModel } from "../lib/models/model";
import { ARCHS, Arch, argmaxRow, formatTable, makeBenchModel, measureBandwidth, promptIds, WEIGHT_TYPES, WeightType } from "./common";

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

async function runOne(arch: Arch, dtype: WeightType, file: string, bandwidth: number): Promise<Result> {
  // Loaded as a user would: memory-mapped, in the stored dtype.
  const model = await loadModel(file);
  const config = model.config;
  // Every weight once; a tied head is the embedding table, read in full (the gathered rows are negligible).
  const bytesPerToken = model.weightBytes;
  const ids = promptIds(PROMPT, config.vocabSize);

  // Prefill: one native call over the prompt (warm once with a short prompt).
  let state = model.createState(1);
  (await model.prefill(state, [ids.slice(0, 16)])).dispose();
  state.dispose();
  state = model.createState(1);
  let t0 = performance.now();
  let logits = await model.prefill(state, [ids]);
  const prefillMs = performance.now() - t0;

  // Decode: greedy steps from the prefilled state.
  const argmax = (l: Tensor) => argmaxRow(l.data as Float32Array, 0, config.vocabSize);
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
  const prompts = Array.from({ length: BATCH }, (_, b) => promptIds(BATCH_PROMPT, config.vocabSize, b + 1));
  logits = await model.prefill(batchState, prompts);
  let tokens = Array.from({ length: BATCH }, (_, b) => argmaxRow(logits.data as Float32Array, b, config.vocabSize));
  logits.dispose();
  t0 = performance.now();
  for (let i = 0; i < BATCH_STEPS; i++) {
    logits = await model.step(batchState, tokens);
    tokens = tokens.map((_, b) => argmaxRow(logits.data as Float32Array, b, config.vocabSize));
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

async function child(arch: Arch, dtype: WeightType, file: string, bandwidth: number) {
  const r = await runOne(arch, dtype, file, bandwidth);
  process.stdout.write(`RESULT ${JSON.stringify(r)}\n`);
}

async function main() {
  if (threadsArg >= 0) setThreads(Number(argv[threadsArg + 1]));
  const makeIdx = argv.indexOf("--make");
  if (makeIdx >= 0) {
    makeBenchModel(argv[makeIdx + 1] as Arch, argv[makeIdx + 2] as WeightType, argv[makeIdx + 3]);
    return;
  }
  const childIdx = argv.indexOf("--child");
  if (childIdx >= 0) {
    await child(argv[childIdx + 1] as Arch, argv[childIdx + 2] as WeightType, argv[childIdx + 3], Number(argv[childIdx + 4]));
    return;
  }
  const bandwidth = measureBandwidth();
  // The 1 GiB buffer is unmapped by its finaliser on the next turn of the event loop; wait for it, or
  // the children forked below would start with (and report as their peak) this process's RSS.
  for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
  if (process.memoryUsage().rss > 512 * 2 ** 20) process.stderr.write("warning: the parent's RSS is still high; children's peak RSS includes it\n");
  const results: Result[] = [];
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-bench-"));
  process.on("exit", () => fs.rmSync(scratch, { recursive: true, force: true }));
  for (const arch of ARCHS) {
    for (const dtype of WEIGHT_TYPES) {
      const file = path.join(scratch, `${arch}-${dtype}.gguf`);
      const spawnChild = (extra: string[]) =>
        spawnSync(process.execPath, ["-r", "ts-node/register", __filename, ...extra, ...argv], {
          encoding: "utf8",
          cwd: path.resolve(__dirname, ".."),
          env: { ...process.env, TS_NODE_PROJECT: "tsconfig.test.json", TS_NODE_TRANSPILE_ONLY: "1" },
        });
      const made = spawnChild(["--make", arch, dtype, file]);
      if (made.status !== 0) {
        process.stderr.write(`bench ${arch} ${dtype}: making the model failed:\n${made.stderr}\n`);
        process.exitCode = 1;
        continue;
      }
      const r = spawnChild(["--child", arch, dtype, file, String(bandwidth)]);
      fs.rmSync(file, { force: true });
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
  console.log(`mamba-ssm generation benchmark — ${getThreads()} threads, read bandwidth ${(bandwidth / 1e9).toFixed(1)} GB/s; prompt ${PROMPT}, decode ${DECODE}, batch ${BATCH}×${BATCH_STEPS} steps${quick ? " (quick)" : ""}`);
  console.log(formatTable(head, rows));
  console.log(JSON.stringify({ bench: "generate", threads: getThreads(), bandwidthGBs: +(bandwidth / 1e9).toFixed(2), prompt: PROMPT, decode: DECODE, batch: BATCH, results }));
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
