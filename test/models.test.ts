// Real checkpoints end to end: every fixture written by scripts/make_fixtures.py (an independent
// float64 PyTorch reference) loads in each of its formats and gives the reference's logits and
// greedy continuation; the recurrent, batched and saved-state paths agree with the sequence path;
// saving and reloading keeps the logits.
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { loadModel, MambaModel, Tensor } from "../lib";
import { parsePythonJson } from "../lib/io/json";
import { maxRelError } from "./reference";

const root = path.join(__dirname, "fixtures", "models");
const names = fs.readdirSync(root).filter((n) => fs.existsSync(path.join(root, n, "expected.json")));

interface Expected {
  config: Record<string, unknown>;
  files: Record<string, string>;
  prompts: number[][];
  logits: number[][];
  greedy: number[][];
  logits_q8_0?: number[][];
  greedy_q8_0?: number[][];
  texts?: string[];
}

function expected(name: string): Expected {
  return parsePythonJson(fs.readFileSync(path.join(root, name, "expected.json"), "utf8")) as Expected;
}

/** Logits of prompt rows [L, vocab] from a [1, L, vocab] tensor. */
function rows(t: Tensor): Float32Array {
  return (t.data as Float32Array).slice();
}

// fp32 kernels against the float64 reference: 1e-4 relative to |want| + 0.1 (logits are O(1)).
const TOLERANCE = 1e-4;
const FLOOR = 0.1;

describe.each(names)("fixture %s", (name) => {
  const exp = expected(name);

  test.each(Object.entries(exp.files))("%s loads and gives the reference logits and greedy tokens", async (file, key) => {
    const model = await loadModel(path.join(root, name, file));
    try {
      for (const [k, v] of Object.entries(exp.config)) {
        expect([k, (model.config as unknown as Record<string, unknown>)[k]]).toEqual([k, v]);
      }
      const wantLogits = (exp as unknown as Record<string, number[][]>)[key];
      const wantGreedy = key === "logits_q8_0" ? exp.greedy_q8_0! : exp.greedy;
      for (let p = 0; p < exp.prompts.length; p++) {
        const logits = await model.forward(exp.prompts[p]);
        expect(logits.shape).toEqual([1, exp.prompts[p].length, model.config.vocabSize]);
        expect(maxRelError(rows(logits), wantLogits[p], FLOOR)).toBeLessThan(TOLERANCE);
        logits.dispose();
        const done = await model.complete(exp.prompts[p], { temperature: 0, maxTokens: wantGreedy[p].length, ignoreEos: true });
        expect(done.tokens).toEqual(wantGreedy[p]);
        expect(done.stats.generatedTokens).toBe(wantGreedy[p].length);
        expect(done.stats.finishReason).toBe("length");
      }
    } finally {
      model.dispose();
    }
  });
});

describe("the recurrent, batched and stateful paths agree with the sequence path", () => {
  let model: MambaModel;
  const exp = expected("mamba2-tiny");
  beforeAll(async () => {
    model = await loadModel(path.join(root, "mamba2-tiny", "hf"));
  });
  afterAll(() => model.dispose());

  test("step-by-step logits equal forward()", async () => {
    const prompt = exp.prompts[2];
    const full = rows(await model.forward(prompt));
    const vocab = model.config.vocabSize;
    const state = model.createState(1);
    for (let i = 0; i < prompt.length; i++) {
      const l = await model.step(state, [prompt[i]]);
      expect(maxRelError(l.data, full.subarray(i * vocab, (i + 1) * vocab), FLOOR)).toBeLessThan(TOLERANCE);
      l.dispose();
    }
    expect(state.positions).toEqual([prompt.length]);
    state.dispose();
  });

  test("a batch of different-length prompts equals each prompt alone", async () => {
    const batch = await model.forward(exp.prompts);
    const vocab = model.config.vocabSize;
    const longest = Math.max(...exp.prompts.map((p) => p.length));
    expect(batch.shape).toEqual([3, longest, vocab]);
    for (let p = 0; p < 3; p++) {
      const alone = rows(await model.forward(exp.prompts[p]));
      const n = exp.prompts[p].length * vocab;
      const part = (batch.data as Float32Array).subarray(p * longest * vocab, p * longest * vocab + n);
      expect(maxRelError(part, alone, FLOOR)).toBeLessThan(1e-6);
      // positions past the prompt's end are zero
      expect((batch.data as Float32Array).subarray(p * longest * vocab + n, (p + 1) * longest * vocab).every((v) => v === 0)).toBe(true);
    }
    // batched decode equals single-sequence decode
    const state = model.createState(3);
    const last = await model.prefill(state, exp.prompts);
    const steps = await model.step(state, [5, 6, 7]);
    for (let p = 0; p < 3; p++) {
      const s1 = model.createState(1);
      const l1 = await model.prefill(s1, [exp.prompts[p]]);
      expect(maxRelError(last.data.subarray(p * vocab, (p + 1) * vocab), l1.data, FLOOR)).toBeLessThan(1e-6);
      const st = await model.step(s1, [5 + p]);
      expect(maxRelError(steps.data.subarray(p * vocab, (p + 1) * vocab), st.data, FLOOR)).toBeLessThan(1e-5);
      s1.dispose();
    }
    state.dispose();
  });

  test("state save → load → continue equals continuing directly, and clones are independent", async () => {
    const [a, b] = [exp.prompts[1], exp.prompts[2]];
    const state = model.createState(1);
    (await model.prefill(state, [a])).dispose();
    const saved = state.save();
    const copy = state.clone();
    const direct = rows(await model.prefill(state, [b]));
    const restored = model.loadState(saved);
    expect(restored.positions).toEqual([a.length]);
    const resumed = rows(await model.prefill(restored, [b]));
    expect(maxRelError(resumed, direct, FLOOR)).toBe(0);
    const fromClone = rows(await model.prefill(copy, [b]));
    expect(maxRelError(fromClone, direct, FLOOR)).toBe(0);
    // the prefix then the rest equals the whole sequence's last logits
    const whole = rows(await model.forward([...a, ...b]));
    const vocab = model.config.vocabSize;
    expect(maxRelError(direct, whole.subarray((a.length + b.length - 1) * vocab), FLOOR)).toBeLessThan(1e-5);
    expect(() => model.loadState(saved.subarray(0, saved.length - 4))).toThrow(/loadState: expected \d+ bytes of state/);
    const other = await loadModel(path.join(root, "mamba1-tiny", "hf"));
    expect(() => other.loadState(saved)).toThrow(/loadState: the state was saved by a model with architecture = "mamba2"/);
    other.dispose();
    for (const s of [state, copy, restored]) s.dispose();
  });
});

describe("saving", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-save-"));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  test.each(["mamba1-tiny", "mamba2-tiny"])("%s saved as GGUF and as a HF folder reloads with the same logits", async (name) => {
    const exp = expected(name);
    const model = await loadModel(path.join(root, name, "hf"));
    const gguf = path.join(dir, `${name}.gguf`);
    const folder = path.join(dir, `${name}-hf`);
    await model.save(gguf, { format: "gguf" });
    await model.save(folder, { format: "safetensors" });
    expect(fs.readdirSync(dir).filter((f) => f.includes(".tmp"))).toEqual([]);
    for (const p of [gguf, folder]) {
      const again = await loadModel(p);
      const l = rows(await again.forward(exp.prompts[2]));
      expect(maxRelError(l, exp.logits[2], FLOOR)).toBeLessThan(TOLERANCE);
      again.dispose();
    }
    model.dispose();
  });

  test("a bf16 GGUF reloads in bf16 and moves the logits only by bf16's rounding", async () => {
    const exp = expected("mamba2-tiny");
    const model = await loadModel(path.join(root, "mamba2-tiny", "hf"));
    const file = path.join(dir, "bf16.gguf");
    await model.save(file, { format: "gguf", dtype: "bf16" });
    model.dispose();
    const bf = await loadModel(file);
    expect(bf.weights.get("layers.0.in_proj")!.dtype).toBe("bf16");
    const l = rows(await bf.forward(exp.prompts[2]));
    // Rounding every matrix of this small random model to bf16 (2^-9 relative) moves its O(1) logits
    // by a few hundredths: within 5e-2 of |want| + 1, and not identical (the weights really are bf16).
    const err = maxRelError(l, exp.logits[2], 1);
    expect(err).toBeLessThan(5e-2);
    expect(err).toBeGreaterThan(1e-5);
    bf.dispose();
  });
});

describe("text in, text out", () => {
  const exp = expected("mamba1-bytebpe");
  test("the tokenizer beside the checkpoint encodes the prompts, and generation streams the greedy text", async () => {
    for (const file of ["hf", "model.gguf"]) {
      const model = await loadModel(path.join(root, "mamba1-bytebpe", file));
      for (let p = 0; p < exp.texts!.length; p++) {
        expect(model.tokenizer.encode(exp.texts![p])).toEqual(exp.prompts[p]);
        let streamed = "";
        const tokens: number[] = [];
        for await (const chunk of model.generate(exp.texts![p], { temperature: 0, maxTokens: 8, ignoreEos: true })) {
          streamed += chunk.text;
          if (chunk.token !== null) tokens.push(chunk.token);
        }
        expect(tokens).toEqual(exp.greedy[p]);
        expect(streamed).toBe(model.tokenizer.decode(exp.greedy[p]));
      }
      model.dispose();
    }
  });

  test("the same seed gives the same text; stop strings end generation; a signal aborts", async () => {
    const model = await loadModel(path.join(root, "mamba1-bytebpe", "hf"));
    const a = await model.complete("the", { seed: 7, maxTokens: 20, temperature: 1, ignoreEos: true });
    const b = await model.complete("the", { seed: 7, maxTokens: 20, temperature: 1, ignoreEos: true });
    expect(a.text).toBe(b.text);
    expect(a.tokens).toEqual(b.tokens);
    const c = await model.complete("the", { seed: 8, maxTokens: 20, temperature: 1, ignoreEos: true });
    expect(c.tokens).not.toEqual(a.tokens);
    // stop at the first character of the seeded text: nothing of it is emitted
    const first = a.text.trim()[0];
    if (first) {
      const stopped = await model.complete("the", { seed: 7, maxTokens: 20, temperature: 1, ignoreEos: true, stop: first });
      expect(stopped.stats.finishReason).toBe("stop");
      expect(stopped.text).toBe(a.text.slice(0, a.text.indexOf(first)));
    }
    const controller = new AbortController();
    controller.abort();
    const aborted = await model.complete("the", { maxTokens: 20, signal: controller.signal });
    expect(aborted.stats.finishReason).toBe("abort");
    expect(aborted.tokens).toEqual([]);
    await expect(model.complete("the", { topP: 2 })).rejects.toThrow("generate: topP must be in (0, 1], got 2");
    model.dispose();
  });
});
