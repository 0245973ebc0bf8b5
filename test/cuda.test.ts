// Models on the GPU from TypeScript (lib/models/cuda-model.ts over native/napi/cuda.cpp).
//
// Every run checks what needs no GPU: cudaInfo() says why no device is usable, and loading a model on
// "cuda" then fails with that reason; bad device strings and dtypes are refused by name. The cases
// that need a GPU (an addon built by `npm run build:cuda`, loaded with MAMBA_SSM_BINARY=<path to its
// mamba_ssm.node>, on a machine with an NVIDIA GPU and driver) are skipped with a message otherwise,
// and fail instead under MAMBA_SSM_REQUIRE_GPU=1.
// They compare the GPU model with the CPU model on the same weight values, as
// native/cuda/tests/test_cuda_model.cpp does, relative to |want| + 0.1·RMS(want): f32 matrices within
// 1e-3 (the GPU sums in other orders, and its Mamba-2 prefill runs the SSD on bf16 tensor cores with
// split operands, about 1e-4 of the output's scale), bf16 matrices within 1e-3 of the CPU model on the
// same bf16 weights at the baseline CPU level (which multiplies them with exact f32 activations).
// On the GPU alone: prefill + steps against one forward, batched against single steps, saved,
// reloaded and cloned states, states moved between the devices, greedy tokens, sampled tokens drawn
// on the GPU against the host sampler on the GPU's logits; and a mixture-of-experts model against the
// CPU model.
import * as path from "path";
import { cpuInfo, cudaInfo, initWeights, loadModel, MambaModel, ops, setCpuLevel, Tensor } from "../lib";
import type { MambaConfig } from "../lib";
import { isMatrixWeight } from "../lib/models/config";
import { createCudaModel, cudaForward, CudaState, releaseCudaModel } from "../lib/models/cuda-model";
import { maxRelError, rmsOf } from "./reference";

const info = cudaInfo();
const gpu = info.devices.length > 0;
const gpuTest = gpu ? test : test.skip;
const noGpuTest = gpu ? test.skip : test;
if (!gpu) {
  // Shown once in the test output, so a run on a GPU machine that skipped these by mistake is visible.
  process.stdout.write(`cuda.test.ts: the GPU cases are skipped: ${info.error}\n`);
}

const fixture = path.join(__dirname, "fixtures", "models", "mamba1-tiny", "hf");

// Awkward sizes: nothing a multiple of a warp or a tile; Mamba-2 with two groups and a chunk of 16.
function config(architecture: "mamba1" | "mamba2"): MambaConfig {
  const m1 = architecture === "mamba1";
  return {
    architecture,
    hiddenSize: m1 ? 37 : 48,
    numLayers: 3,
    vocabSize: m1 ? 101 : 97,
    intermediateSize: m1 ? 74 : 96,
    stateSize: m1 ? 5 : 12,
    convKernel: 4,
    timeStepRank: m1 ? 3 : 0,
    numHeads: m1 ? 0 : 6,
    headDim: m1 ? 0 : 16,
    numGroups: m1 ? 1 : 2,
    chunkSize: 16,
    useBias: m1,
    useConvBias: true,
    normEps: 1e-5,
    timeStepLimit: [0, Infinity],
    normBeforeGate: false,
    tieEmbeddings: !m1,
  };
}

function prompt(n: number, vocab: number, seed: number): number[] {
  return Array.from({ length: n }, (_, i) => (seed * 31 + i * 17 + ((i * i) % 7)) % vocab);
}

function values(t: Tensor): Float32Array {
  return (t.data as Float32Array).slice();
}

/** Largest error relative to |want| + 0.1·RMS(want) (the native CUDA tests' measure). */
function relError(got: ArrayLike<number>, want: ArrayLike<number>): number {
  return maxRelError(got, want, 0.1 * rmsOf(want));
}

describe("cudaInfo and errors", () => {
  test("cudaInfo says whether the backend is built and which devices it sees", () => {
    expect(typeof info.built).toBe("boolean");
    expect(typeof info.cublas).toBe("boolean");
    expect(Array.isArray(info.devices)).toBe(true);
    if (info.devices.length === 0) expect(info.error.length).toBeGreaterThan(0);
    else expect(info.error).toBe("");
    if (!info.built) expect(info.error).toMatch(/npm run build:cuda/);
  });

  // bench/gpu-check.sh sets MAMBA_SSM_REQUIRE_GPU=1: there, skipping the GPU cases is a failure.
  (process.env.MAMBA_SSM_REQUIRE_GPU === "1" ? test : test.skip)("a GPU is present where one is required", () => {
    expect(info.error).toBe("");
    expect(info.devices.length).toBeGreaterThan(0);
  });

  noGpuTest("loading on cuda without a usable GPU fails with the reason", async () => {
    await expect(loadModel(fixture, { device: "cuda" })).rejects.toThrow(info.error);
    await expect(loadModel(fixture, { device: "cuda:1" })).rejects.toThrow(/loadModel: device "cuda"/);
    const c = config("mamba1");
    const weights = initWeights(c);
    expect(() => MambaModel.fromWeights(c, weights, { device: "cuda" })).toThrow(info.error);
    weights.forEach((t) => t.dispose());
  });

  test("bad devices and dtypes are refused by name", async () => {
    await expect(loadModel(fixture, { device: "gpu" as never })).rejects.toThrow(/device must be "cpu", "cuda" or "cuda:N", got "gpu"/);
    await expect(loadModel(fixture, { device: "cuda", dtype: "q8_0" })).rejects.toThrow(/dtype "q8_0" runs on the CPU only/);
    const c = config("mamba2");
    const weights = initWeights(c);
    expect(() => MambaModel.fromWeights(c, weights, { device: "cuda:x" as never })).toThrow(/device must be/);
    weights.forEach((t) => t.dispose());
  });

  test("a mixture-of-experts model's state saves and loads (its layer list compared by value)", async () => {
    const c: MambaConfig = {
      ...config("mamba2"),
      numLayers: 3,
      moe: { layers: [1], numExperts: 3, topK: 1, hiddenSize: 16, scoring: "sigmoid", renormalize: false, activation: "gelu", bias: false },
    };
    const model = MambaModel.fromWeights(c, initWeights(c, { seed: 2 }));
    try {
      const state = model.createState(1);
      await (await model.prefill(state, prompt(9, c.vocabSize, 4))).dispose();
      const again = model.loadState(state.save());
      const a = await model.step(state, [5]);
      const b = await model.step(again, [5]);
      expect(values(b)).toEqual(values(a));
      // The same sizes with the MoE block elsewhere: a state of the other layout is refused.
      const moved: MambaConfig = { ...c, moe: { ...c.moe!, layers: [2] } };
      const other = MambaModel.fromWeights(moved, initWeights(moved));
      expect(() => other.loadState(state.save())).toThrow(/moeLayers = \[1\], this model has \[2\]/);
      other.dispose();
      for (const t of [a, b]) t.dispose();
      for (const s of [state, again]) s.dispose();
    } finally {
      model.dispose();
    }
  });

  test("a CPU state: conv and ssm are its tensors; toCpu() is an independent copy", async () => {
    const model = await loadModel(fixture);
    try {
      expect(model.device).toBe("cpu");
      const state = model.createState(1);
      expect(state.device).toBe("cpu");
      expect(state.byteLength).toBe(state.conv.byteLength + state.ssm.byteLength);
      await (await model.prefill(state, [1, 2, 3])).dispose();
      const copy = state.toCpu();
      expect(values(copy.ssm)).toEqual(values(state.ssm));
      (copy.ssm.data as Float32Array)[0] += 1;
      expect(values(copy.ssm)).not.toEqual(values(state.ssm));
      copy.dispose();
      state.dispose();
    } finally {
      model.dispose();
    }
  });
});

describe.each(["mamba1", "mamba2"] as const)("%s on the GPU", (architecture) => {
  const c = config(architecture);
  let cpu: MambaModel;
  let gpuF32: MambaModel;
  beforeAll(() => {
    if (!gpu) return;
    cpu = MambaModel.fromWeights(c, initWeights(c, { seed: 3 }));
    gpuF32 = MambaModel.fromWeights(c, initWeights(c, { seed: 3 }), { device: "cuda", dtype: "f32" });
  });
  afterAll(() => {
    cpu?.dispose();
    gpuF32?.dispose();
  });

  gpuTest("forward matches the CPU model on the same weight values (1e-3)", async () => {
    expect(gpuF32.device).toBe("cuda");
    expect(gpuF32.deviceWeightBytes).toBeGreaterThan(0);
    const batch = [prompt(1, c.vocabSize, 1), prompt(37, c.vocabSize, 2), prompt(13, c.vocabSize, 3)];
    const want = await cpu.forward(batch);
    const got = await gpuF32.forward(batch);
    expect(got.shape).toEqual(want.shape);
    expect(relError(values(got), values(want))).toBeLessThan(1e-3);
    // Padding rows past a sequence's end stay zero.
    const g = got.data as Float32Array;
    for (let v = 0; v < c.vocabSize; v++) expect(g[5 * c.vocabSize + v]).toBe(0);
    want.dispose();
    got.dispose();

    // bf16 matrices: against the CPU model on the same bf16 weights, at the baseline level.
    const bf16Weights = () => {
      const w = initWeights(c, { seed: 3 });
      for (const [name, t] of w) {
        if (isMatrixWeight(name)) {
          w.set(name, t.to("bf16"));
          t.dispose();
        }
      }
      return w;
    };
    const level = cpuInfo().level;
    const cpuBf16 = MambaModel.fromWeights(c, bf16Weights());
    const gpuBf16 = MambaModel.fromWeights(c, bf16Weights(), { device: "cuda" });
    try {
      setCpuLevel("baseline");
      const want16 = await cpuBf16.forward(batch);
      setCpuLevel(level);
      const got16 = await gpuBf16.forward(batch);
      expect(relError(values(got16), values(want16))).toBeLessThan(1e-3);
      want16.dispose();
      got16.dispose();
    } finally {
      setCpuLevel(level);
      cpuBf16.dispose();
      gpuBf16.dispose();
    }
  });

  gpuTest("prefill then steps give the forward's logits; a batch step equals single steps", async () => {
    const ids = prompt(29, c.vocabSize, 5);
    const full = await gpuF32.forward(ids);
    const f = full.data as Float32Array;
    const V = c.vocabSize;
    const state = gpuF32.createState(1);
    expect(state.device).toBe("cuda");
    expect(() => state.conv).toThrow(/lives on the GPU/);
    // Mamba-2's prefill SSD (bf16 tensor cores, split operands) against its fp32 step: 1e-3.
    const tol = architecture === "mamba1" ? 1e-4 : 1e-3;
    const head = 17;
    const last = await gpuF32.prefill(state, ids.slice(0, head));
    expect(relError(values(last), f.subarray((head - 1) * V, head * V))).toBeLessThan(tol);
    last.dispose();
    for (let t = head; t < ids.length; t++) {
      const logits = await gpuF32.step(state, [ids[t]]);
      expect(relError(values(logits), f.subarray(t * V, (t + 1) * V))).toBeLessThan(tol);
      logits.dispose();
    }
    expect(state.positions).toEqual([ids.length]);
    state.dispose();
    full.dispose();

    // Three sequences stepped together, against each stepped alone.
    const seqs = [prompt(3, V, 7), prompt(9, V, 8), prompt(1, V, 9)];
    const together = gpuF32.createState(3);
    await (await gpuF32.prefill(together, seqs)).dispose();
    const next = [4, 50 % V, 77 % V];
    const batched = await gpuF32.step(together, next);
    for (let s = 0; s < 3; s++) {
      const alone = gpuF32.createState(1);
      await (await gpuF32.prefill(alone, [seqs[s]])).dispose();
      const one = await gpuF32.step(alone, [next[s]]);
      expect(relError(values(one), (batched.data as Float32Array).subarray(s * V, (s + 1) * V))).toBeLessThan(1e-5);
      one.dispose();
      alone.dispose();
    }
    batched.dispose();
    together.dispose();
  });

  gpuTest("states save, reload, clone and move between the devices", async () => {
    const ids = prompt(21, c.vocabSize, 11);
    const state = gpuF32.createState(1);
    await (await gpuF32.prefill(state, ids)).dispose();
    const saved = state.save();
    const reloaded = gpuF32.loadState(saved);
    expect(reloaded.device).toBe("cuda");
    expect(reloaded.positions).toEqual([21]);
    const clone = state.clone();
    const a = await gpuF32.step(state, [5]);
    const b = await gpuF32.step(reloaded, [5]);
    const d = await gpuF32.step(clone, [5]);
    expect(values(b)).toEqual(values(a));
    expect(values(d)).toEqual(values(a));
    // Stepping the original did not move the clone: a second step on each still agrees.
    const a2 = await gpuF32.step(state, [6]);
    const d2 = await gpuF32.step(clone, [6]);
    expect(values(d2)).toEqual(values(a2));
    // The GPU state continues on the CPU model, and a CPU state on the GPU model.
    const onCpu = cpu.loadState(state.save());
    expect(onCpu.device).toBe("cpu");
    const fromCpu = state.toCpu();
    const cpuNext = await cpu.step(onCpu, [7]);
    const cpuNext2 = await cpu.step(fromCpu, [7]);
    const gpuNext = await gpuF32.step(state, [7]);
    expect(relError(values(gpuNext), values(cpuNext))).toBeLessThan(1e-3);
    expect(values(cpuNext2)).toEqual(values(cpuNext));
    expect(() => gpuF32.step(onCpu, [1])).toThrow(/the state lives on device "cpu", the model on "cuda"/);
    for (const t of [a, b, d, a2, d2, cpuNext, cpuNext2, gpuNext]) t.dispose();
    for (const s of [state, reloaded, clone, onCpu, fromCpu]) s.dispose();
  });

  gpuTest("greedy generation agrees with the CPU model where the choice is clear", async () => {
    const ids = prompt(12, c.vocabSize, 13);
    const n = 10;
    const want = await cpu.complete(ids, { temperature: 0, maxTokens: n, ignoreEos: true });
    const got = await gpuF32.complete(ids, { temperature: 0, maxTokens: n, ignoreEos: true });
    expect(got.tokens.length).toBe(n);
    // The tokens agree up to the first position whose top two CPU logits are closer than the
    // runners' differences (1e-3 of the scale); past such a near tie the sequences may part.
    const logits = await cpu.forward([...ids, ...want.tokens]);
    const L = logits.data as Float32Array;
    const V = c.vocabSize;
    for (let i = 0; i < n; i++) {
      const row = L.subarray((ids.length - 1 + i) * V, (ids.length + i) * V);
      const sorted = [...row].sort((x, y) => y - x);
      if (sorted[0] - sorted[1] < 1e-3 * (Math.abs(sorted[0]) + 0.1 * rmsOf(row))) break;
      expect([i, got.tokens[i]]).toEqual([i, want.tokens[i]]);
      const rowTensor = Tensor.from(row.slice(), [1, V]);
      expect(want.tokens[i]).toBe(ops.argmax(rowTensor)[0]);
      rowTensor.dispose();
    }
    logits.dispose();
  });

  gpuTest("sampled generation draws each step's token on the GPU: a host loop over its logits gives the same", async () => {
    const ids = prompt(9, c.vocabSize, 17);
    const n = 12;
    for (const options of [
      { temperature: 1.2, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 5 },
      { temperature: 0.7, topK: 9, topP: 0.85, minP: 0.02, repetitionPenalty: 1.4, seed: 11 },
    ]) {
      const got = await gpuF32.complete(ids, { ...options, maxTokens: n, ignoreEos: true });
      // The same sampler on the host, fed the logits of the GPU's own steps.
      const sampler = new ops.Sampler(options);
      const history = [...ids];
      const state = gpuF32.createState(1);
      let logits = await gpuF32.prefill(state, [ids]);
      const want: number[] = [];
      for (let i = 0; i < n; i++) {
        const token = sampler.sample(logits, options.repetitionPenalty !== 1 ? { penaltyTokens: history } : {});
        logits.dispose();
        want.push(token);
        history.push(token);
        if (i + 1 < n) logits = await gpuF32.step(state, [token]);
      }
      state.dispose();
      // The device's exp may differ from the host's by an ulp, which moves a draw's boundary by about
      // 1e-7 of the total: a difference that early is a one-in-a-million event.
      expect(got.tokens).toEqual(want);
      expect(new Set(want).size).toBeGreaterThan(2);
    }
  });
});

describe("a mixture-of-experts model on the GPU", () => {
  gpuTest("matches the CPU model, prefill and steps", async () => {
    const c: MambaConfig = {
      ...config("mamba1"),
      numLayers: 4,
      moe: { layers: [1, 3], numExperts: 4, topK: 2, hiddenSize: 24, scoring: "softmax", renormalize: true, activation: "silu", bias: true },
    };
    const cpuMoe = MambaModel.fromWeights(c, initWeights(c, { seed: 5 }));
    const gpuMoe = MambaModel.fromWeights(c, initWeights(c, { seed: 5 }), { device: "cuda", dtype: "f32" });
    try {
      const ids = prompt(40, c.vocabSize, 17);
      const want = await cpuMoe.forward(ids);
      const got = await gpuMoe.forward(ids);
      expect(relError(values(got), values(want))).toBeLessThan(1e-3);
      const a = cpuMoe.createState(1), b = gpuMoe.createState(1);
      await (await cpuMoe.prefill(a, ids)).dispose();
      await (await gpuMoe.prefill(b, ids)).dispose();
      for (const token of [3, 9, 27]) {
        const x = await cpuMoe.step(a, [token]);
        const y = await gpuMoe.step(b, [token]);
        expect(relError(values(y), values(x))).toBeLessThan(1e-3);
        x.dispose();
        y.dispose();
      }
      // The GPU state moves to the CPU model and continues there as the CPU's own state does.
      const moved = cpuMoe.loadState(b.save());
      const x = await cpuMoe.step(a, [4]);
      const y = await cpuMoe.step(moved, [4]);
      expect(relError(values(y), values(x))).toBeLessThan(1e-3);
      for (const t of [x, y]) t.dispose();
      moved.dispose();
      a.dispose();
      b.dispose();
      want.dispose();
      got.dispose();
    } finally {
      cpuMoe.dispose();
      gpuMoe.dispose();
    }
  });
});

describe("native handles released while a call runs", () => {
  gpuTest("the model and the state stay alive until the call ends, then go", async () => {
    const c = config("mamba2");
    const weights = initWeights(c, { seed: 6 });
    const ref = MambaModel.fromWeights(c, initWeights(c, { seed: 6 }));
    const model = createCudaModel(c, weights, { weightDType: "f32" });
    const state = CudaState.create(model, 1);
    const ids = Int32Array.from(prompt(33, c.vocabSize, 8));
    const logits = Tensor.zeros([1, c.vocabSize]);
    // The call is queued before the releases: it must still see both and finish.
    const call = cudaForward(model, { ids, lengths: [ids.length], lastOnly: true, logits, state, useInitialState: false });
    state.dispose();
    releaseCudaModel(model);
    await call;
    const refState = ref.createState(1);
    const want = await ref.prefill(refState, Array.from(ids));
    expect(relError(values(logits), values(want))).toBeLessThan(1e-3);
    expect(() => CudaState.create(model, 1)).toThrow(/released/);
    expect(() => state.handle("step")).toThrow(/disposed/);
    for (const t of [logits, want]) t.dispose();
    refState.dispose();
    ref.dispose();
    weights.forEach((t) => t.dispose());
  });
});

describe("a disposed GPU model", () => {
  gpuTest("refuses calls by name", async () => {
    const c = config("mamba1");
    const model = MambaModel.fromWeights(c, initWeights(c), { device: "cuda" });
    const state = model.createState(1);
    model.dispose();
    expect(() => model.createState(1)).toThrow(/disposed/);
    expect(() => model.forward([1, 2])).toThrow(/disposed/);
    state.dispose();
  });
});
