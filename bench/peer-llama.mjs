// The llama.cpp side of bench/peer.ts: runs one GGUF file in node-llama-cpp (CPU only) and prints
// one line "RESULT {json}" with prefill, decode and 16-sequence decode speeds and the greedy tokens.
// The work is the same as the mamba-ssm side's: a prompt evaluated in one batch; then single-token
// evaluations from the last prompt token, greedy; then 16 sequences' prompts and their steps together.
//
//   node bench/peer-llama.mjs <node-llama-cpp entry> <model.gguf> <json options>
import { pathToFileURL } from "url";

const [entry, file, optionsJson] = process.argv.slice(2);
const o = JSON.parse(optionsJson);
const { getLlama } = await import(pathToFileURL(entry).href);
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error", maxThreads: o.threads });
const model = await llama.loadModel({ modelPath: file, gpuLayers: 0 });
const threads = { ideal: o.threads, min: o.threads };

async function single() {
  const context = await model.createContext({ contextSize: 2048, batchSize: o.prompt, sequences: 1, threads });
  const seq = context.getSequence();
  // The prompt once untimed, then prefillReps timed runs, each in a fresh history: the median counts.
  let t0;
  const prefillRuns = [];
  for (let r = 0; r <= o.prefillReps; r++) {
    t0 = performance.now();
    await seq.evaluateWithoutGeneratingNewTokens(o.promptIds);
    if (r > 0) prefillRuns.push(performance.now() - t0);
    await seq.clearHistory();
  }
  const prefillMs = prefillRuns.sort((a, b) => a - b)[prefillRuns.length >> 1];

  await seq.evaluateWithoutGeneratingNewTokens(o.promptIds.slice(0, -1));
  const tokens = [];
  t0 = performance.now();
  for await (const token of seq.evaluate([o.promptIds[o.promptIds.length - 1]], { temperature: 0 })) {
    tokens.push(token);
    if (tokens.length >= o.decode) break;
  }
  const decodeMs = performance.now() - t0;
  await context.dispose();
  return { prefillMs, decodeMs, tokens };
}

async function batched() {
  const n = o.batchPrompts.length;
  const context = await model.createContext({
    contextSize: n * (o.batchPromptLength + o.batchSteps + 64),
    batchSize: n * o.batchPromptLength,
    sequences: n,
    threads,
  });
  const seqs = o.batchPrompts.map(() => context.getSequence());
  await Promise.all(seqs.map((s, b) => s.evaluateWithoutGeneratingNewTokens(o.batchPrompts[b].slice(0, -1))));
  const t0 = performance.now();
  const tokens = await Promise.all(
    seqs.map(async (s, b) => {
      const out = [];
      const prompt = o.batchPrompts[b];
      for await (const token of s.evaluate([prompt[prompt.length - 1]], { temperature: 0 })) {
        out.push(token);
        if (out.length >= o.batchSteps) break;
      }
      return out;
    }),
  );
  const batchMs = performance.now() - t0;
  await context.dispose();
  return { batchMs, tokens };
}

const s = await single();
const b = await batched();
await model.dispose();
await llama.dispose();
process.stdout.write(
  `RESULT ${JSON.stringify({
    prefillTokS: (1000 * o.prompt) / s.prefillMs,
    decodeTokS: (1000 * o.decode) / s.decodeMs,
    batchTokS: (1000 * o.batchPrompts.length * o.batchSteps) / b.batchMs,
    decodeTokens: s.tokens,
    batchTokens: b.tokens,
  })}\n`,
);
