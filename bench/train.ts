// Training speed and memory of a small byte-level model (default: Mamba-1, 4 layers, d_model 256,
// expand 2, state 16, vocabulary 256; sequences of 1024 tokens, batch 4):
//   1. tokens/s of full optimizer steps (forward + backward + AdamW), the model FLOP/s this means as a
//      fraction of the machine's fp32 FMA peak and of its bf16 dot-product peak, and where the time goes
//      (forward only, forward + backward, optimizer step);
//   2. the same step in PyTorch (bench/train_torch.py: a plain nn.Module with the reference's
//      sequential scan loop) in fp32 and bf16 autocast, when /usr/bin/python3 has torch;
//   3. memory against sequence length (batch 1, 1k … 64k tokens), each length in a fresh process, with
//      a least-squares fit bytes = a + b·L set beside the trainer's own statement of b.
//
// Model FLOPs per token: 6 × parameters (forward 2, backward 4, every weight in one multiply-add a
// token; the tied head counted once) plus the scan, per layer: the forward's recurrence and output are
// ≈ 6·di·N (exp(Δ·A), Δ·x·B, the state update's multiply-add, s·C), and the backward with the states
// recomputed from the chunk boundaries ≈ 3× the forward, so ≈ 24·di·N in all (Mamba-2: di·N = H·P·N).
//
//   npm run bench:train [-- --quick] [-- --arch mamba1|mamba2] [-- --d-model 256] [-- --layers 4]
//     [-- --state N] [-- --length 1024] [-- --batch 4] [-- --steps 10] [-- --warmup-steps 2]
//     [-- --scan-chunk 64] [-- --threads N] [-- --max-length 65536] [-- --torch-length L] [-- --no-torch]
// --quick: fewer steps, the memory sweep stops at 8k tokens, PyTorch at 256 tokens.
// Prints a table and one JSON line. Not part of `npm test`.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { getThreads, setThreads } from "../lib";
import { MambaConfig } from "../lib/models/config";
import { initWeights } from "../lib/models/init";
import { trainConfig } from "../lib/training/train";
import { Trainer } from "../lib/training/trainer";
import { formatTable, measurePeak, median, promptIds } from "./common";

const argv = process.argv.slice(2);
const quick = argv.includes("--quick");
function option(name: string, fallback: number): number {
  const i = argv.indexOf(name);
  if (i < 0) return fallback;
  const v = Number(argv[i + 1]);
  if (!Number.isInteger(v) || v < 0) throw new RangeError(`bench/train: ${name} needs a non-negative integer, got ${argv[i + 1]}`);
  return v;
}
function textOption(name: string, fallback: string): string {
  const i = argv.indexOf(name);
  return i < 0 ? fallback : argv[i + 1];
}

const arch = textOption("--arch", "mamba1");
if (arch !== "mamba1" && arch !== "mamba2") throw new RangeError(`bench/train: --arch must be mamba1 or mamba2, got ${arch}`);
const D_MODEL = option("--d-model", 256);
const LAYERS = option("--layers", 4);
const STATE = option("--state", arch === "mamba1" ? 16 : 64);
const LENGTH = option("--length", 1024);
const BATCH = option("--batch", 4);
const STEPS = Math.max(1, option("--steps", quick ? 3 : 10));
const WARMUP = option("--warmup-steps", quick ? 1 : 2);
const SCAN_CHUNK = Math.max(1, option("--scan-chunk", 64));
const MAX_LENGTH = option("--max-length", quick ? 8192 : 65536);
const TORCH_LENGTH = option("--torch-length", quick ? Math.min(256, LENGTH) : LENGTH);
const TORCH_STEPS = option("--torch-steps", quick ? 1 : 2);
const threadsArg = argv.indexOf("--threads");
if (threadsArg >= 0) setThreads(Number(argv[threadsArg + 1]));
const PYTHON = "/usr/bin/python3";

const config: MambaConfig = trainConfig({ architecture: arch, hiddenSize: D_MODEL, numLayers: LAYERS, stateSize: STATE });

function newTrainer(): Trainer {
  const trainer = new Trainer(config, { scanChunk: SCAN_CHUNK });
  const weights = initWeights(config, { seed: 1 });
  trainer.loadWeights(weights);
  for (const t of weights.values()) t.dispose();
  return trainer;
}

/** ids and next-token targets [batch, length] from one deterministic byte stream. */
function batchOf(batch: number, length: number): { ids: Int32Array; targets: Int32Array } {
  const ids = new Int32Array(batch * length);
  const targets = new Int32Array(batch * length);
  for (let b = 0; b < batch; b++) {
    const stream = promptIds(length + 1, config.vocabSize, b);
    ids.set(stream.slice(0, length), b * length);
    targets.set(stream.slice(1), b * length);
  }
  return { ids, targets };
}

// ---- 3. memory: one forward + backward at batch 1 in a fresh process ----------------------------

interface MemorySample {
  length: number;
  /** RSS with the trainer made and its weights loaded, right before the step. */
  rssBeforeBytes: number;
  /** Peak RSS during the step. */
  peakBytes: number;
  /** peak − before */
  stepBytes: number;
  seconds: number;
}

/** /proc/self/status's VmHWM in bytes (this process's own peak RSS), or null off Linux. */
function highWaterMark(): number | null {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync("/proc/self/status", "utf8"));
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

async function childMemory(length: number): Promise<void> {
  const trainer = newTrainer();
  const { ids, targets } = batchOf(1, length);
  // Linux carries the parent's peak RSS into a spawned child's maxRSS (across fork and exec), so a
  // small step's peak would hide under it. Resetting the mm's high-water mark (clear_refs "5") makes
  // VmHWM this step's own peak; maxRSS (KiB) is the fallback where that is not possible.
  let hwm = false;
  try {
    fs.writeFileSync("/proc/self/clear_refs", "5");
    hwm = highWaterMark() !== null;
  } catch {
    hwm = false;
  }
  const before = process.memoryUsage().rss;
  const t0 = performance.now();
  await trainer.forwardBackward(ids, targets, 1, length, { lossScale: 1 / length });
  const seconds = (performance.now() - t0) / 1000;
  const peak = hwm ? highWaterMark()! : process.resourceUsage().maxRSS * 1024;
  const sample: MemorySample = { length, rssBeforeBytes: before, peakBytes: peak, stepBytes: Math.max(0, peak - before), seconds };
  trainer.dispose();
  process.stdout.write(`MEMORY ${JSON.stringify({ ...sample, method: hwm ? "VmHWM" : "maxRSS" })}\n`);
}

function spawnSelf(extra: string[]) {
  return spawnSync(process.execPath, ["-r", "ts-node/register", __filename, ...argv, ...extra], {
    encoding: "utf8",
    cwd: path.resolve(__dirname, ".."),
    env: { ...process.env, TS_NODE_PROJECT: "tsconfig.test.json", TS_NODE_TRANSPILE_ONLY: "1" },
    maxBuffer: 1 << 24,
  });
}

/** Least squares of y = a + b·x. */
function fitLine(xs: number[], ys: number[]): { a: number; b: number; r2: number } {
  const n = xs.length;
  const mx = xs.reduce((s, x) => s + x, 0) / n, my = ys.reduce((s, y) => s + y, 0) / n;
  let sxy = 0, sxx = 0, syy = 0;
  for (let i = 0; i < n; i++) {
    sxy += (xs[i] - mx) * (ys[i] - my);
    sxx += (xs[i] - mx) ** 2;
    syy += (ys[i] - my) ** 2;
  }
  const b = sxx > 0 ? sxy / sxx : 0;
  return { a: my - b * mx, b, r2: syy > 0 ? (b * sxy) / syy : 1 };
}

// ---- 2. PyTorch ------------------------------------------------------------------------------

interface TorchRun {
  dtype: string;
  stepSeconds: number;
  samples: number[];
  tokensPerSecond: number;
  firstLoss: number;
}
interface TorchReport {
  torch: string;
  threads: number;
  parameters: number;
  batch: number;
  length: number;
  results: TorchRun[];
}

function runTorch(threads: number): { report?: TorchReport; skipped?: string } {
  if (argv.includes("--no-torch")) return { skipped: "--no-torch" };
  const probe = spawnSync(PYTHON, ["-c", "import torch"], { encoding: "utf8" });
  if (probe.error) return { skipped: `${PYTHON}: ${probe.error.message}` };
  if (probe.status !== 0) return { skipped: `${PYTHON} -c "import torch" failed: ${probe.stderr.trim().split("\n").pop()}` };
  const args = [
    path.join(__dirname, "train_torch.py"),
    ...["--arch", arch, "--d-model", String(D_MODEL), "--layers", String(LAYERS), "--state", String(STATE)],
    ...["--head-dim", String(config.headDim || 32), "--length", String(TORCH_LENGTH), "--batch", String(BATCH)],
    ...["--steps", String(TORCH_STEPS), "--warmup-steps", "1", "--threads", String(threads)],
  ];
  process.stderr.write(`PyTorch: ${PYTHON} ${args.join(" ")}\n`);
  const r = spawnSync(PYTHON, args, { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"], maxBuffer: 1 << 24 });
  const line = (r.stdout ?? "").trim().split("\n").pop() ?? "";
  if (r.status !== 0 || !line.startsWith("{")) return { skipped: `bench/train_torch.py failed (status ${r.status})` };
  return { report: JSON.parse(line) as TorchReport };
}

// ---- 1. throughput -----------------------------------------------------------------------------

async function main() {
  const childIdx = argv.indexOf("--child-memory");
  if (childIdx >= 0) {
    await childMemory(Number(argv[childIdx + 1]));
    return;
  }
  const threads = getThreads();
  const di = config.intermediateSize, N = config.stateSize;

  // Sizes first, so a run that cannot fit says so before the long parts.
  const probe = new Trainer(config, { scanChunk: SCAN_CHUNK });
  const parameters = probe.parameterCount;
  const activationFloatsPerToken = probe.activationFloatsPerToken;
  const workingFloatsPerToken = probe.workingFloatsPerToken;
  probe.dispose();
  const statedBytesPerToken = (activationFloatsPerToken + workingFloatsPerToken) * 4 + (LAYERS * di * N * 4) / SCAN_CHUNK;
  const perStepStateBytesPerToken = LAYERS * di * N * 4;
  const memoryLengths: number[] = [];
  for (let L = 1024; L <= MAX_LENGTH; L *= 2) memoryLengths.push(L);
  const MB = 2 ** 20;
  // The trainer's own statement decides which lengths are tried: a step must fit in half the free memory.
  while (memoryLengths.length && statedBytesPerToken * memoryLengths[memoryLengths.length - 1] > os.freemem() / 2) {
    const dropped = memoryLengths.pop()!;
    process.stderr.write(`memory sweep: skipping ${dropped} tokens (≈ ${((statedBytesPerToken * dropped) / MB).toFixed(0)} MB, ${(os.freemem() / MB).toFixed(0)} MB free)\n`);
  }
  const longest = memoryLengths[memoryLengths.length - 1] ?? 0;
  process.stderr.write(
    `model ${arch}: ${parameters} parameters, ${activationFloatsPerToken} activation + ${workingFloatsPerToken} working floats/token; ` +
      `expected step memory at ${longest} tokens ≈ ${((statedBytesPerToken * longest) / MB).toFixed(0)} MB\n`,
  );

  // 3. Memory children first, while this process is small (its RSS is every child's maxRSS floor).
  const memory: (MemorySample & { method: string })[] = [];
  for (const L of memoryLengths) {
    const r = spawnSelf(["--child-memory", String(L)]);
    const line = r.stdout.split("\n").find((l) => l.startsWith("MEMORY "));
    if (!line) {
      process.stderr.write(`memory at ${L} tokens failed (status ${r.status}):\n${r.stderr}\n`);
      process.exitCode = 1;
      break;
    }
    memory.push(JSON.parse(line.slice(7)));
    process.stderr.write(`memory ${L} tokens: ${(memory[memory.length - 1].stepBytes / MB).toFixed(1)} MB\n`);
  }
  const fit = memory.length >= 2 ? fitLine(memory.map((m) => m.length), memory.map((m) => m.stepBytes)) : null;

  const peakBefore = measurePeak("fp32", quick);
  const fmaPeak = peakBefore.median;
  const bf16Peak = measurePeak("bf16", quick).median;
  const ofBf16 = (flops: number) => (bf16Peak > 0 ? `${((100 * flops) / bf16Peak).toFixed(1)}%` : "n/a");

  const trainer = newTrainer();
  const { ids, targets } = batchOf(BATCH, LENGTH);
  const tokens = BATCH * LENGTH;
  const adamw = { lr: 1e-3, beta1: 0.9, beta2: 0.95, weightDecay: 0.1, maxGradNorm: 1 };
  const full: number[] = [], fb: number[] = [], opt: number[] = [], fwd: number[] = [];
  let firstLoss = NaN, lastLoss = NaN;
  for (let s = 0; s < WARMUP + STEPS; s++) {
    const t0 = performance.now();
    const loss = await trainer.forwardBackward(ids, targets, BATCH, LENGTH, { lossScale: 1 / tokens });
    const t1 = performance.now();
    trainer.optimizerStep(adamw);
    const t2 = performance.now();
    if (s === 0) firstLoss = loss.sum / loss.count;
    lastLoss = loss.sum / loss.count;
    if (s < WARMUP) continue;
    full.push((t2 - t0) / 1000);
    fb.push((t1 - t0) / 1000);
    opt.push((t2 - t1) / 1000);
  }
  for (let s = 0; s < Math.max(2, Math.ceil(STEPS / 2)); s++) {
    const t0 = performance.now();
    await trainer.forwardBackward(ids, targets, BATCH, LENGTH, { backward: false });
    fwd.push((performance.now() - t0) / 1000);
  }
  trainer.dispose();
  process.stderr.write(`mamba-ssm: ${full.length} timed steps\n`);
  // Measured again after the steps: on a shared machine the ceiling itself moves (vCPUs sharing a core or not).
  const peakAfter = measurePeak("fp32", quick);

  const stepSeconds = median(full);
  const tokensPerSecond = tokens / stepSeconds;
  const scanFlopsPerToken = 24 * di * N * LAYERS;
  const flopsPerToken = 6 * parameters + scanFlopsPerToken;
  const modelFlops = flopsPerToken * tokensPerSecond;
  const ofPeak = modelFlops / fmaPeak;

  const torch = runTorch(threads);

  // ---- report ----
  const sizes = `${arch}, ${LAYERS} layers, d_model ${D_MODEL}, d_inner ${di}, N ${N}${arch === "mamba2" ? `, ${config.numHeads} heads of ${config.headDim}` : ""}; ${(parameters / 1e6).toFixed(2)}M parameters`;
  console.log(`mamba-ssm training benchmark — ${threads} threads, fp32 FMA peak ${(fmaPeak / 1e9).toFixed(1)} GFLOP/s (median; best ${(peakBefore.best / 1e9).toFixed(1)}, ${(peakAfter.median / 1e9).toFixed(1)} after the steps), bf16 dot-product peak ${bf16Peak > 0 ? `${(bf16Peak / 1e9).toFixed(1)} GFLOP/s` : "n/a (no bf16 dot products at this CPU level)"}${quick ? " (quick)" : ""}`);
  console.log(`model: ${sizes}; batch ${BATCH} × ${LENGTH} tokens, scan chunk ${SCAN_CHUNK}; median of ${STEPS} steps after ${WARMUP} warm-up`);
  console.log(`FLOPs/token: 6 × ${parameters} parameters + scan 24·d_inner·N·layers = ${scanFlopsPerToken} → ${(flopsPerToken / 1e6).toFixed(2)} MFLOP`);
  console.log(`loss: ${firstLoss.toFixed(4)} at the first step, ${lastLoss.toFixed(4)} at the last\n`);
  const ms = (s: number) => (s * 1e3).toFixed(1);
  console.log(
    formatTable(
      ["phase", "ms", "share of step"],
      [
        ["forward only", ms(median(fwd)), `${((100 * median(fwd)) / stepSeconds).toFixed(0)}%`],
        ["forward + backward", ms(median(fb)), `${((100 * median(fb)) / stepSeconds).toFixed(0)}%`],
        ["optimizer step (AdamW)", ms(median(opt)), `${((100 * median(opt)) / stepSeconds).toFixed(0)}%`],
        ["full step", ms(stepSeconds), "100%"],
      ],
      1,
    ),
  );
  console.log();

  const rows: string[][] = [
    ["mamba-ssm", "fp32", `${BATCH}×${LENGTH}`, ms(stepSeconds), tokensPerSecond.toFixed(0), (modelFlops / 1e9).toFixed(1), `${(100 * ofPeak).toFixed(1)}%`, ofBf16(modelFlops), "1.00"],
  ];
  const torchRatios: Record<string, number> = {};
  if (torch.report) {
    for (const r of torch.report.results) {
      const ratio = tokensPerSecond / r.tokensPerSecond;
      torchRatios[r.dtype] = +ratio.toFixed(2);
      const torchFlops = (6 * torch.report.parameters + scanFlopsPerToken) * r.tokensPerSecond;
      rows.push([
        `PyTorch ${torch.report.torch}`,
        r.dtype === "bf16" ? "bf16 autocast" : r.dtype,
        `${torch.report.batch}×${torch.report.length}${torch.report.length !== LENGTH ? "*" : ""}`,
        ms(r.stepSeconds),
        r.tokensPerSecond.toFixed(0),
        (torchFlops / 1e9).toFixed(1),
        `${((100 * torchFlops) / fmaPeak).toFixed(1)}%`,
        ofBf16(torchFlops),
        `${(1 / ratio).toFixed(3)}`,
      ]);
    }
  }
  console.log(formatTable(["trainer", "dtype", "batch×length", "ms/step", "tokens/s", "GFLOP/s", "of fp32 peak", "of bf16 peak", "vs mamba-ssm"], rows));
  if (torch.report) {
    const ratios = Object.entries(torchRatios).map(([k, v]) => `${v}× PyTorch ${k}`).join(", ");
    console.log(`mamba-ssm trains ${ratios} (tokens/s; PyTorch: sequential scan loop, ${torch.report.threads} threads, median of ${TORCH_STEPS} step(s)).`);
    if (torch.report.length !== LENGTH) console.log(`* PyTorch ran ${torch.report.length}-token sequences (--torch-length) to keep its steps short; tokens/s compared as is.`);
    if (torch.report.parameters !== parameters) console.log(`  (PyTorch model: ${torch.report.parameters} parameters.)`);
  } else {
    console.log(`PyTorch comparison skipped: ${torch.skipped}`);
  }
  console.log();

  if (memory.length) {
    console.log(`memory of one forward + backward, batch 1 (peak RSS of the step − RSS before it, fresh process each; ${memory[0].method}):`);
    console.log(
      formatTable(
        ["tokens", "step MB", "bytes/token", "seconds"],
        memory.map((m) => [String(m.length), (m.stepBytes / MB).toFixed(1), (m.stepBytes / m.length).toFixed(0), m.seconds.toFixed(2)]),
        0,
      ),
    );
    if (fit) {
      console.log(`fit: bytes = ${(fit.a / MB).toFixed(1)} MB + ${fit.b.toFixed(0)} B × tokens (r² ${fit.r2.toFixed(4)})`);
    }
    console.log(
      `trainer's statement: (${activationFloatsPerToken} activation + ${workingFloatsPerToken} working floats) × 4 + ${LAYERS}·${di}·${N}·4 / ${SCAN_CHUNK} boundary-state bytes = ${statedBytesPerToken.toFixed(0)} B/token` +
        (fit ? ` (measured/stated ${(fit.b / statedBytesPerToken).toFixed(2)})` : ""),
    );
    console.log(
      `per-step scan states would cost ${perStepStateBytesPerToken} B/token on their own` +
        (fit ? ` (${(perStepStateBytesPerToken / fit.b).toFixed(1)}× the measured slope)` : ""),
    );
  }

  console.log(
    JSON.stringify({
      bench: "train",
      quick,
      threads,
      fmaPeakGflops: +(fmaPeak / 1e9).toFixed(2),
      fmaPeakBestGflops: +(peakBefore.best / 1e9).toFixed(2),
      fmaPeakAfterGflops: +(peakAfter.median / 1e9).toFixed(2),
      bf16PeakGflops: +(bf16Peak / 1e9).toFixed(2),
      model: { arch, dModel: D_MODEL, layers: LAYERS, dInner: di, stateSize: N, numHeads: config.numHeads, headDim: config.headDim, vocab: config.vocabSize, parameters },
      batch: BATCH,
      length: LENGTH,
      scanChunk: SCAN_CHUNK,
      steps: STEPS,
      warmupSteps: WARMUP,
      flopsPerToken,
      scanFlopsPerToken,
      stepMs: +(stepSeconds * 1e3).toFixed(2),
      forwardMs: +(median(fwd) * 1e3).toFixed(2),
      forwardBackwardMs: +(median(fb) * 1e3).toFixed(2),
      optimizerMs: +(median(opt) * 1e3).toFixed(2),
      stepSamplesMs: full.map((s) => +(s * 1e3).toFixed(2)),
      tokensPerSecond: +tokensPerSecond.toFixed(1),
      modelGflops: +(modelFlops / 1e9).toFixed(2),
      fractionOfPeak: +ofPeak.toFixed(4),
      fractionOfBf16Peak: bf16Peak > 0 ? +(modelFlops / bf16Peak).toFixed(4) : null,
      loss: { first: +firstLoss.toFixed(4), last: +lastLoss.toFixed(4) },
      torch: torch.report ? { ...torch.report, ratios: torchRatios } : { skipped: torch.skipped },
      memory: {
        samples: memory,
        fit: fit ? { interceptBytes: Math.round(fit.a), bytesPerToken: Math.round(fit.b), r2: +fit.r2.toFixed(5) } : null,
        activationFloatsPerToken,
        workingFloatsPerToken,
        statedBytesPerToken: Math.round(statedBytesPerToken),
        perStepStateBytesPerToken,
      },
    }),
  );
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
