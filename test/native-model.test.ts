// The native model runner through its TypeScript wrapper: a prefill equals the same tokens fed one
// decode step at a time, states carry a prefill into decoding, and wrong weights are refused by name.
// (native/tests/test_model.cpp compares the runner with a float64 reference in depth.)
import { Tensor } from "../lib/tensor";
import { expectedShapes, MambaConfig } from "../lib/models/config";
import { createNativeModel, createStates, forward, release, stateSizes, step } from "../lib/models/native-model";
import { maxRelError, rmsOf, Rng } from "./reference";

function config(architecture: "mamba1" | "mamba2"): MambaConfig {
  const m1 = architecture === "mamba1";
  return {
    architecture,
    hiddenSize: 12,
    numLayers: 2,
    vocabSize: 19,
    intermediateSize: m1 ? 22 : 18,
    stateSize: 5,
    convKernel: 4,
    timeStepRank: 3,
    numHeads: m1 ? 0 : 6,
    headDim: m1 ? 0 : 3,
    numGroups: m1 ? 1 : 2,
    chunkSize: 4,
    useBias: m1,
    useConvBias: true,
    normEps: 1e-5,
    timeStepLimit: [0, Infinity],
    normBeforeGate: false,
    tieEmbeddings: !m1,
  };
}

function randomWeights(c: MambaConfig, seed: number): Map<string, Tensor> {
  const rng = new Rng(seed);
  const weights = new Map<string, Tensor>();
  for (const [name, shape] of expectedShapes(c)) {
    const n = shape.reduce((a, b) => a * b, 1);
    let values: Float32Array;
    if (name.endsWith(".A")) values = rng.uniform(n, -4, -0.3); // A = -exp(A_log) < 0
    else if (name.endsWith("norm") || name.endsWith("norm_f") || name.endsWith(".D")) values = rng.uniform(n, 0.5, 1.5);
    else if (name.endsWith("dt_bias")) values = rng.uniform(n, -4, -1); // softplus ≈ 0.02 … 0.3
    else values = rng.normal(n, shape.length === 2 ? 1 / Math.sqrt(shape[1]) : 0.2);
    weights.set(name, Tensor.from(values, shape));
  }
  return weights;
}

describe.each(["mamba1", "mamba2"] as const)("native %s model", (architecture) => {
  const c = config(architecture);
  const weights = randomWeights(c, architecture === "mamba1" ? 3 : 4);
  const model = createNativeModel(c, weights);
  const ids = [3, 17, 0, 9, 9, 12, 5];
  afterAll(() => release(model));

  test("forward logits equal step-by-step decoding", async () => {
    const all = await forward(model, { ids });
    expect(all.shape).toEqual([ids.length, c.vocabSize]);
    const { conv, ssm } = createStates(model, 1);
    const stepped = new Float32Array(ids.length * c.vocabSize);
    for (let t = 0; t < ids.length; t++) {
      const logits = await step(model, { ids: [ids[t]], convState: conv, ssmState: ssm });
      stepped.set(logits.data as Float32Array, t * c.vocabSize);
    }
    const want = all.data as Float32Array;
    expect(rmsOf(want)).toBeGreaterThan(0.1); // not a degenerate all-zero model
    expect(maxRelError(stepped, want, 0.1 * rmsOf(want))).toBeLessThan(1e-4);
  });

  test("a prefill's states carry into decoding, and lastOnly is the last row", async () => {
    const whole = (await forward(model, { ids })).data as Float32Array;
    const sizes = stateSizes(model, 1);
    expect(sizes.conv).toBe(c.numLayers * (c.convKernel - 1) * (c.intermediateSize + (architecture === "mamba1" ? 0 : 2 * c.numGroups * c.stateSize)));
    const { conv, ssm } = createStates(model, 1);
    const split = 4;
    const last = await forward(model, { ids: ids.slice(0, split), lastOnly: true, convState: conv, ssmState: ssm });
    expect(last.shape).toEqual([1, c.vocabSize]);
    const V = c.vocabSize;
    expect(maxRelError(last.data, whole.subarray((split - 1) * V, split * V), 0.1 * rmsOf(whole))).toBeLessThan(1e-5);
    const next = await step(model, { ids: [ids[split]], convState: conv, ssmState: ssm });
    expect(maxRelError(next.data, whole.subarray(split * V, (split + 1) * V), 0.1 * rmsOf(whole))).toBeLessThan(1e-4);
    const rest = await forward(model, { ids: ids.slice(split + 1), convState: conv, ssmState: ssm, useInitialState: true });
    expect(maxRelError(rest.data, whole.subarray((split + 1) * V), 0.1 * rmsOf(whole))).toBeLessThan(1e-4);
  });

  test("two sequences padded into [sequences, longest, vocab] equal each alone", async () => {
    const other = [1, 2, 18];
    const padded = Tensor.zeros([2, ids.length, c.vocabSize]);
    await forward(model, { ids: [...ids, ...other], lengths: [ids.length, other.length], logits: padded });
    const a = (await forward(model, { ids })).data as Float32Array;
    const b = (await forward(model, { ids: other })).data as Float32Array;
    const got = padded.data as Float32Array;
    const V = c.vocabSize;
    expect(maxRelError(got.subarray(0, ids.length * V), a, 0.1 * rmsOf(a))).toBeLessThan(1e-6);
    expect(maxRelError(got.subarray(ids.length * V, (ids.length + other.length) * V), b, 0.1 * rmsOf(b))).toBeLessThan(1e-6);
    expect(Array.from(got.subarray((ids.length + other.length) * V)).every((v) => v === 0)).toBe(true);
  });
});

describe("native model errors", () => {
  const c = config("mamba1");

  test("a weight of the wrong shape is refused by name", () => {
    const weights = randomWeights(c, 9);
    weights.set("layers.1.in_proj", Tensor.zeros([44, 11]));
    expect(() => createNativeModel(c, weights)).toThrow(
      /weight "layers\.1\.in_proj": expected shape \[44, 12\], got \[44, 11\]/,
    );
  });

  test("a missing weight and a token outside the vocabulary are named", async () => {
    const weights = randomWeights(c, 10);
    weights.delete("layers.0.D");
    expect(() => createNativeModel(c, weights)).toThrow(/missing weight "layers\.0\.D"/);
    const model = createNativeModel(c, randomWeights(c, 11));
    await expect(forward(model, { ids: [1, 19] })).rejects.toThrow(/token id 19 at position 1 is outside the vocabulary \[0, 19\)/);
    const { conv, ssm } = createStates(model, 2);
    await expect(step(model, { ids: [1], convState: conv, ssmState: ssm })).rejects.toThrow(/convState: expected shape \[2, 1, 3, 22\]/);
    release(model);
    await expect(forward(model, { ids: [1] })).rejects.toThrow(/released/);
  });

  test("a live model's weights cannot be disposed under it; after release they can", async () => {
    const weights = randomWeights(c, 12);
    const model = createNativeModel(c, weights);
    const w = weights.get("layers.1.out_proj")!;
    expect(() => w.dispose()).toThrow(/in use by a running model call \(or a live model's weights\)/);
    expect(w.disposed).toBe(false);
    await forward(model, { ids: [1, 2] });
    release(model);
    w.dispose();
    expect(w.disposed).toBe(true);
  });

  test("a state cannot be disposed while a call that writes it is running", async () => {
    const model = createNativeModel(c, randomWeights(c, 13));
    const { conv, ssm } = createStates(model, 1);
    const pending = step(model, { ids: [1], convState: conv, ssmState: ssm });
    expect(() => ssm.dispose()).toThrow(/in use by a running model call/);
    await pending;
    ssm.dispose();
    conv.dispose();
    release(model);
  });
});
