// The TypeScript side of models on the GPU (lib/models/cuda-model.ts, state.ts, model.ts) against an
// emulated CUDA backend: the addon's cuda* functions replaced, for this file only, by JavaScript that
// keeps "device" states in host buffers and runs the CPU model runner. It checks what needs no GPU:
// that the TypeScript layer passes the arguments the bindings of native/napi/cuda.cpp read (the fake
// refuses any other field), keeps device states apart from host ones, moves them between devices,
// and releases every handle it makes. The numbers themselves are the CPU runner's here, so results
// must equal the CPU model's exactly. test/cuda.test.ts checks the real backend where a GPU is present.
import { initWeights, MambaModel, Tensor } from "../lib";
import type { MambaConfig } from "../lib";
import { native } from "../lib/native";

type Args = Record<string, unknown>;
type Fn = (...args: never[]) => unknown;

interface FakeState {
  kind: "state";
  batch: number;
  conv: ArrayBuffer;
  ssm: ArrayBuffer;
  released: boolean;
}
interface FakeModel {
  kind: "model";
  cpu: object;
  vocab: number;
  released: boolean;
}

const live = { models: 0, states: 0 };

function keys(op: string, args: Args, allowed: string[], required: string[]) {
  for (const k of Object.keys(args)) {
    if (!allowed.includes(k)) throw new Error(`${op}: the binding reads no field "${k}"`);
  }
  for (const k of required) if (args[k] === undefined) throw new Error(`${op}: "${k}" is required`);
}

function fakeBackend(addon: Record<string, Fn>): Record<string, Fn> {
  const cpu = addon as unknown as Record<string, (a: Args) => unknown>;
  const model = (op: string, v: unknown): FakeModel => {
    const m = v as FakeModel;
    if (!m || m.kind !== "model") throw new Error(`${op}: model must be a handle from cudaModelCreate`);
    if (m.released) throw new Error(`${op}: model has been released`);
    return m;
  };
  const state = (op: string, v: unknown): FakeState => {
    const s = v as FakeState;
    if (!s || s.kind !== "state") throw new Error(`${op}: state must be a handle from cudaStateCreate`);
    if (s.released) throw new Error(`${op}: state has been released`);
    return s;
  };
  const copy = (from: ArrayBuffer, to: ArrayBuffer) => new Uint8Array(to).set(new Uint8Array(from));
  return {
    cudaInfo: () => ({ built: true, cublas: false, devices: [{ index: 0, name: "emulated", computeCapability: "9.0", memoryBytes: 2 ** 30 }], error: "" }),
    cudaModelCreate: (a: Args) => {
      keys("cudaModelCreate", a, ["config", "weights", "weightDType", "device"], ["config", "weights"]);
      if (a.weightDType !== "f32" && a.weightDType !== "bf16") throw new Error("cudaModelCreate: weightDType");
      live.models++;
      const vocab = (a.config as MambaConfig).vocabSize;
      return { kind: "model", cpu: cpu.modelCreate({ config: a.config, weights: a.weights }), vocab, released: false } as FakeModel;
    },
    cudaModelInfo: (a: Args) => {
      keys("cudaModelInfo", a, ["model"], ["model"]);
      model("cudaModelInfo", a.model);
      return { device: 0, weightBytes: 1234, weightDType: "f32", cublas: false };
    },
    cudaStateCreate: (a: Args) => {
      keys("cudaStateCreate", a, ["model", "batch"], ["model", "batch"]);
      const m = model("cudaStateCreate", a.model);
      const sizes = cpu.modelStateSizes({ model: m.cpu, batch: a.batch }) as { conv: number; ssm: number };
      live.states++;
      return { kind: "state", batch: a.batch as number, conv: new ArrayBuffer(4 * sizes.conv), ssm: new ArrayBuffer(4 * sizes.ssm), released: false };
    },
    cudaStateRead: (a: Args) => {
      keys("cudaStateRead", a, ["state", "conv", "ssm"], ["state", "conv", "ssm"]);
      const s = state("cudaStateRead", a.state);
      copy(s.conv, a.conv as ArrayBuffer);
      copy(s.ssm, a.ssm as ArrayBuffer);
    },
    cudaStateWrite: (a: Args) => {
      keys("cudaStateWrite", a, ["state", "conv", "ssm"], ["state", "conv", "ssm"]);
      const s = state("cudaStateWrite", a.state);
      copy(a.conv as ArrayBuffer, s.conv);
      copy(a.ssm as ArrayBuffer, s.ssm);
    },
    cudaStateCopy: (a: Args) => {
      keys("cudaStateCopy", a, ["from", "to"], ["from", "to"]);
      const from = state("cudaStateCopy", a.from), to = state("cudaStateCopy", a.to);
      copy(from.conv, to.conv);
      copy(from.ssm, to.ssm);
    },
    cudaModelForward: (a: Args) => {
      keys("cudaModelForward", a, ["model", "ids", "lengths", "lastOnly", "logits", "paddedLength", "state", "useInitialState", "segmentTokens"], ["model", "ids", "lengths", "logits"]);
      const m = model("cudaModelForward", a.model);
      const s = a.state === undefined ? undefined : state("cudaModelForward", a.state);
      return cpu.modelForward({
        model: m.cpu, ids: a.ids, lengths: a.lengths, lastOnly: a.lastOnly, logits: a.logits, paddedLength: a.paddedLength,
        convState: s?.conv, ssmState: s?.ssm, useInitialState: a.useInitialState,
      });
    },
    cudaModelStep: async (a: Args) => {
      const sampling = ["temperature", "topK", "topP", "minP", "repetitionPenalty", "penaltyTokens", "penaltyCount", "draws"];
      if (a.tokens === undefined) keys("cudaModelStep", a, ["model", "ids", "state", "logits"], ["model", "ids", "state", "logits"]);
      else keys("cudaModelStep", a, ["model", "ids", "state", "tokens", ...sampling], ["model", "ids", "state", "tokens", "draws"]);
      const m = model("cudaModelStep", a.model), s = state("cudaModelStep", a.state);
      if ((a.ids as ArrayBuffer).byteLength / 4 !== s.batch) throw new Error("cudaModelStep: ids and the state's batch differ");
      if (a.tokens === undefined) {
        return cpu.modelStep({ model: m.cpu, ids: a.ids, batch: s.batch, convState: s.conv, ssmState: s.ssm, logits: a.logits });
      }
      // A sampling step: the CPU sampler on each row's logits with that row's draw and penalty tokens.
      const vocab = m.vocab;
      const logits = new Float32Array(s.batch * vocab);
      await cpu.modelStep({ model: m.cpu, ids: a.ids, batch: s.batch, convState: s.conv, ssmState: s.ssm, logits: logits.buffer });
      const draws = new Float32Array(a.draws as ArrayBuffer), out = new Int32Array(a.tokens as ArrayBuffer);
      const count = (a.penaltyCount as number) ?? 0;
      for (let r = 0; r < s.batch; r++) {
        const penalty = a.penaltyTokens ? new Int32Array(a.penaltyTokens as ArrayBuffer).slice(r * count, (r + 1) * count) : null;
        out[r] = (cpu.sample({
          logits: logits.slice(r * vocab, (r + 1) * vocab).buffer, vocab, temperature: a.temperature, topK: a.topK, topP: a.topP,
          minP: a.minP, repetitionPenalty: a.repetitionPenalty, penaltyTokens: penalty ? penalty.buffer : null,
          penaltyCount: count, draw: draws[r],
        }) as { token: number }).token;
      }
    },
    cudaModelRelease: (h: unknown) => {
      const m = h as FakeModel;
      if (!m.released) {
        m.released = true;
        live.models--;
        cpu.modelRelease(m.cpu as Args);
      }
    },
    cudaStateRelease: (h: unknown) => {
      const s = h as FakeState;
      if (!s.released) {
        s.released = true;
        live.states--;
      }
    },
  };
}

const addon = native() as unknown as Record<string, Fn>;
const saved: Record<string, Fn> = {};
beforeAll(() => {
  for (const [name, fn] of Object.entries(fakeBackend(addon))) {
    saved[name] = addon[name];
    addon[name] = fn;
  }
});
afterAll(() => {
  for (const [name, fn] of Object.entries(saved)) {
    if (fn === undefined) delete addon[name];
    else addon[name] = fn;
  }
  // Every device model and state the tests made was released by their dispose() calls.
  expect(live).toEqual({ models: 0, states: 0 });
});

function config(architecture: "mamba1" | "mamba2", moe = false): MambaConfig {
  const m1 = architecture === "mamba1";
  return {
    architecture, hiddenSize: 24, numLayers: moe ? 3 : 2, vocabSize: 61, intermediateSize: 48, stateSize: 8, convKernel: 4,
    timeStepRank: m1 ? 3 : 0, numHeads: m1 ? 0 : 4, headDim: m1 ? 0 : 12, numGroups: 1, chunkSize: 8, useBias: false,
    useConvBias: true, normEps: 1e-5, timeStepLimit: [0, Infinity], normBeforeGate: false, tieEmbeddings: true,
    ...(moe ? { moe: { layers: [1], numExperts: 3, topK: 2, hiddenSize: 16, scoring: "softmax" as const, renormalize: true, activation: "silu" as const, bias: false } } : {}),
  };
}

const data = (t: Tensor) => Array.from(t.data as Float32Array);

describe.each([["mamba1", false], ["mamba2", false], ["mamba1", true]] as const)("%s (moe %s) on the emulated backend", (arch, moe) => {
  const c = config(arch, moe);
  let cpu: MambaModel;
  let gpu: MambaModel;
  beforeAll(() => {
    cpu = MambaModel.fromWeights(c, initWeights(c, { seed: 1 }));
    gpu = MambaModel.fromWeights(c, initWeights(c, { seed: 1 }), { device: "cuda", dtype: "f32" });
  });
  afterAll(() => {
    cpu.dispose();
    gpu.dispose();
  });

  test("forward, prefill and steps go through the device calls and give the CPU model's numbers", async () => {
    expect(gpu.device).toBe("cuda");
    expect(gpu.deviceWeightBytes).toBe(1234);
    const batch = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]];
    const want = await cpu.forward(batch);
    const got = await gpu.forward(batch);
    expect(got.shape).toEqual([3, 7, c.vocabSize]);
    expect(data(got)).toEqual(data(want));
    for (const t of [want, got]) t.dispose();

    const a = cpu.createState(2), b = gpu.createState(2);
    expect(b.device).toBe("cuda");
    expect(() => b.ssm).toThrow(/lives on the GPU/);
    expect(b.byteLength).toBe(a.byteLength);
    const la = await cpu.prefill(a, [[1, 2, 3], [7, 8]]);
    const lb = await gpu.prefill(b, [[1, 2, 3], [7, 8]]);
    expect(data(lb)).toEqual(data(la));
    const sa = await cpu.step(a, [4, 9]);
    const sb = await gpu.step(b, [4, 9]);
    expect(data(sb)).toEqual(data(sa));
    expect(b.positions).toEqual([4, 3]);
    for (const t of [la, lb, sa, sb]) t.dispose();
    a.dispose();
    b.dispose();
  });

  test("device states save, load, clone, copy to the CPU and are refused by the other device", async () => {
    const s = gpu.createState(1);
    await (await gpu.prefill(s, [3, 1, 4, 1, 5])).dispose();
    const reloaded = gpu.loadState(s.save());
    expect(reloaded.device).toBe("cuda");
    expect(reloaded.positions).toEqual([5]);
    const clone = s.clone();
    const host = s.toCpu();
    expect(host.device).toBe("cpu");
    const onCpu = cpu.loadState(s.save());
    expect(data(onCpu.ssm)).toEqual(data(host.ssm));
    const x = await gpu.step(s, [9]);
    const y = await gpu.step(reloaded, [9]);
    const z = await gpu.step(clone, [9]);
    const w = await cpu.step(onCpu, [9]);
    expect(data(y)).toEqual(data(x));
    expect(data(z)).toEqual(data(x));
    expect(data(w)).toEqual(data(x));
    // The clone is its own memory: stepping the original again leaves it behind.
    const x2 = await gpu.step(s, [2]);
    const z2 = await gpu.step(clone, [2]);
    expect(data(z2)).toEqual(data(x2));
    expect(() => gpu.step(host, [1])).toThrow(/the state lives on device "cpu", the model on "cuda"/);
    expect(() => cpu.step(reloaded, [1])).toThrow(/the state lives on device "cuda", the model on "cpu"/);
    for (const t of [x, y, z, w, x2, z2]) t.dispose();
    for (const st of [s, reloaded, clone, host, onCpu]) st.dispose();
    expect(s.disposed).toBe(true);
    expect(() => gpu.step(s, [1])).toThrow(/disposed/);
  });

  test("generation on the device gives the CPU model's tokens", async () => {
    const want = await cpu.complete([1, 2, 3], { temperature: 0, maxTokens: 6, ignoreEos: true });
    const got = await gpu.complete([1, 2, 3], { temperature: 0, maxTokens: 6, ignoreEos: true });
    expect(got.tokens).toEqual(want.tokens);
  });

  test("sampled generation draws its tokens in sampling steps, the same stream as the CPU sampler's", async () => {
    const calls: Args[] = [];
    const step = addon.cudaModelStep;
    addon.cudaModelStep = ((a: Args) => (calls.push(a), (step as (a: Args) => unknown)(a))) as Fn;
    try {
      for (const options of [
        { temperature: 1.5, topK: 0, topP: 1, seed: 7 },
        { temperature: 0.9, topK: 12, topP: 0.8, minP: 0.02, repetitionPenalty: 1.3, seed: 99 },
      ]) {
        calls.length = 0;
        const want = await cpu.complete([5, 6, 7], { ...options, maxTokens: 12, ignoreEos: true });
        const got = await gpu.complete([5, 6, 7], { ...options, maxTokens: 12, ignoreEos: true });
        expect(got.tokens).toEqual(want.tokens);
        // Every step after the first token is a sampling step; no logits come back to the host.
        expect(calls.length).toBe(11);
        expect(calls.every((a) => a.tokens !== undefined && a.logits === undefined)).toBe(true);
        const last = calls[calls.length - 1];
        expect(last.penaltyCount).toBe(options.repetitionPenalty ? 3 + 11 : 0);  // the prompt and 11 tokens
      }
    } finally {
      addon.cudaModelStep = step;
    }
  });
});

test("dispose() releases the device model and every device state made from it", async () => {
  const before = { ...live };
  const c = config("mamba2");
  const m = MambaModel.fromWeights(c, initWeights(c), { device: "cuda" });
  const s = m.createState(3);
  await (await m.prefill(s, [[1], [2, 3], [4]])).dispose();
  const copies = [s.clone(), m.loadState(s.save())];
  expect(live).toEqual({ models: before.models + 1, states: before.states + 3 });
  for (const x of [s, ...copies]) x.dispose();
  m.dispose();
  expect(live).toEqual(before);
  expect(() => m.createState(1)).toThrow(/disposed/);
});
