// Runs one GGUF file in mamba-ssm and prints one line "RESULT {json}": prefill, decode and
// 16-sequence decode speeds, the greedy tokens, the weight bytes and the process's peak RSS. The
// mamba-ssm side of bench/peer.ts (the same work as bench/peer-llama.mjs) and the child of
// bench/generate.ts. Plain JavaScript on the compiled package (dist/, which `npm install` and
// `npm run build:ts` write): under ts-node the TypeScript compiler's heap kept V8's garbage-collector
// threads busy on the two cores the steps run on (mamba2-130m q8_0 decode about 4.8-5.7 ms a step
// there, 3.7-3.9 ms in plain node). Greedy tokens come from the package's native argmax (ops.argmax),
// as llama.cpp's side picks them in its native sampler.
//
//   node bench/mamba-run.js <model.gguf> <json options>
"use strict";
const { loadModel, ops, setThreads } = require("..");

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[sorted.length >> 1];
}

// This process's peak resident memory in MB. On Linux, getrusage's maxRSS (process.resourceUsage())
// of a spawned child also counts its parent's resident memory at the fork (the bench's ts-node parent,
// its 1 GiB bandwidth buffer), so the high-water mark of this process's own memory is read instead.
function peakRssMB() {
  try {
    const hwm = /VmHWM:\s+(\d+) kB/.exec(require("fs").readFileSync("/proc/self/status", "utf8"));
    if (hwm) return Number(hwm[1]) / 1024;
  } catch {
    // not Linux
  }
  return process.resourceUsage().maxRSS / 1024;
}

async function main() {
  const [file, optionsJson] = process.argv.slice(2);
  const o = JSON.parse(optionsJson);
  setThreads(o.threads);
  const model = await loadModel(file, { device: o.device ?? "cpu" });

  // The prompt once untimed, then prefillReps timed runs, each in a fresh state: the median counts.
  let state;
  let t0;
  const prefillRuns = [];
  for (let r = 0; r <= o.prefillReps; r++) {
    state = model.createState(1);
    t0 = performance.now();
    (await model.prefill(state, [o.promptIds])).dispose();
    if (r > 0) prefillRuns.push(performance.now() - t0);
    state.dispose();
  }
  const prefillMs = median(prefillRuns);

  state = model.createState(1);
  (await model.prefill(state, [o.promptIds.slice(0, -1)])).dispose();
  let token = o.promptIds[o.promptIds.length - 1];
  const decodeTokens = [];
  t0 = performance.now();
  for (let i = 0; i < o.decode; i++) {
    const logits = await model.step(state, [token]);
    token = ops.argmax(logits)[0];
    logits.dispose();
    decodeTokens.push(token);
  }
  const decodeMs = performance.now() - t0;
  state.dispose();

  const n = o.batchPrompts.length;
  state = model.createState(n);
  (await model.prefill(state, o.batchPrompts.map((p) => p.slice(0, -1)))).dispose();
  let tokens = o.batchPrompts.map((p) => p[p.length - 1]);
  const batchTokens = o.batchPrompts.map(() => []);
  t0 = performance.now();
  for (let s = 0; s < o.batchSteps; s++) {
    const logits = await model.step(state, tokens);
    tokens = Array.from(ops.argmax(logits));
    logits.dispose();
    tokens.forEach((t, b) => batchTokens[b].push(t));
  }
  const batchMs = performance.now() - t0;
  state.dispose();
  // On a GPU, what a step reads is the weights there (bf16 or f32, whatever the file holds).
  const weightBytes = model.device === "cuda" ? model.deviceWeightBytes : model.weightBytes;
  model.dispose();
  const result = {
    prefillTokS: (1000 * o.prompt) / prefillMs,
    decodeTokS: (1000 * o.decode) / decodeMs,
    batchTokS: (1000 * n * o.batchSteps) / batchMs,
    decodeTokens,
    batchTokens,
    weightBytes,
    peakRssMB: peakRssMB(),
  };
  process.stdout.write(`RESULT ${JSON.stringify(result)}\n`);
}

main().catch((e) => {
  process.stderr.write(`${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
