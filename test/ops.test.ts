// The ops surface: every kernel reached from TypeScript, at every CPU level this machine supports,
// compared with the naive references of reference.ts. (The C++ tests compare far more sizes.)
import { cpuInfo, ops, setCpuLevel, Tensor } from "../lib";
import { native } from "../lib/native";
import { conv1dRef, matmulRef, maxRelError, rmsnormRef, rmsOf, Rng, selectiveScanRef, silu } from "./reference";

const levels = cpuInfo().supported;
const best = cpuInfo().best;
afterAll(() => setCpuLevel(best));

const t = (data: Float32Array | number[], shape: number[]) => Tensor.from(Float32Array.from(data), shape);

describe.each(levels)("ops at CPU level %s", (level) => {
  beforeAll(() => setCpuLevel(level));

  test("matmul matches the reference for f32, f16, bf16 and q8_0 weights at awkward sizes", () => {
    const rng = new Rng(1);
    for (const [M, N, K] of [[1, 37, 64], [3, 5, 96], [17, 33, 32]]) {
      const x = rng.normal(M * K);
      const w = rng.normal(N * K, 0.2);
      const b = rng.normal(N);
      for (const dtype of ["f32", "f16", "bf16", "q8_0"] as const) {
        const wt = Tensor.from(w, [N, K], dtype);
        const wq = wt.toArray(); // the weights as stored, dequantised: the reference uses exactly these
        const y = ops.matmul(t(x, [M, K]), wt, t(b, [N]));
        expect(y.shape).toEqual([M, N]);
        const want = matmulRef(x, wq, b, M, N, K);
        if (level === "avx512bf16" && (dtype === "bf16" || dtype === "q8_0")) {
          // This level rounds the activations too (to bf16 for bf16 products of many rows, to 8 bits per
          // block for q8_0 products of few rows): the error's RMS within 1e-2 and its largest element
          // within 5e-2 of the output's RMS.
          const err = Float64Array.from(want, (v, i) => y.data[i] - v);
          expect(rmsOf(err) / rmsOf(want)).toBeLessThan(1e-2);
          expect(Math.max(...err.map(Math.abs)) / rmsOf(want)).toBeLessThan(5e-2);
        } else {
          // fp32 accumulation over K ≤ 96 terms: 1e-5 relative to |want| + 0.1·RMS (rounding scales with
          // the terms, so an output that cancels to near zero is held to 1e-6 of the RMS in absolute terms).
          expect(maxRelError(y.data, want, 0.1 * rmsOf(want))).toBeLessThan(1e-5);
        }
      }
    }
  });

  test("matmul keeps leading dimensions as a batch of rows", () => {
    const x = t(new Rng(2).normal(2 * 3 * 8), [2, 3, 8]);
    const w = t(new Rng(3).normal(4 * 8), [4, 8]);
    const y = ops.matmul(x, w);
    expect(y.shape).toEqual([2, 3, 4]);
    expect(maxRelError(y.data, matmulRef(x.data, w.data, null, 6, 4, 8), 1e-4)).toBeLessThan(1e-5);
  });

  test("rmsnorm, addRmsnorm and gatedRmsnorm match their definitions", () => {
    const rng = new Rng(4);
    const rows = 3, dim = 37;
    const x = rng.normal(rows * dim), r = rng.normal(rows * dim), w = rng.uniform(dim, 0.5, 1.5), z = rng.normal(rows * dim);
    const out = ops.rmsnorm(t(x, [rows, dim]), t(w, [dim]), 1e-5);
    expect(maxRelError(out.data, rmsnormRef(x, w, rows, dim, 1e-5), 1e-6)).toBeLessThan(1e-5);
    const sum = x.map((v, i) => v + r[i]);
    const fused = ops.addRmsnorm(t(x, [rows, dim]), t(r, [rows, dim]), t(w, [dim]));
    expect(Array.from(fused.residual.data)).toEqual(Array.from(sum));
    expect(maxRelError(fused.out.data, rmsnormRef(sum, w, rows, dim, 1e-5), 1e-6)).toBeLessThan(1e-5);
    // Grouped and gated, gate before the norm (Mamba-2's default).
    const D = 12, G = 3, gs = D / G;
    const xg = rng.normal(2 * D), zg = rng.normal(2 * D), wg = rng.uniform(D, 0.5, 1.5);
    const got = ops.gatedRmsnorm(t(xg, [2, D]), t(wg, [D]), { z: t(zg, [2, D]), groupSize: gs });
    const gated = xg.map((v, i) => v * silu(zg[i]));
    const want = new Float64Array(2 * D);
    for (let row = 0; row < 2; row++)
      for (let g = 0; g < G; g++) {
        const seg = gated.subarray(row * D + g * gs, row * D + (g + 1) * gs);
        const n = rmsnormRef(seg, wg.subarray(g * gs, (g + 1) * gs), 1, gs, 1e-5);
        want.set(n, row * D + g * gs);
      }
    expect(maxRelError(got.data, want, 1e-6)).toBeLessThan(1e-5);
    void z;
  });

  test("embedding gathers rows of any dtype and names an id out of range", () => {
    const table = Tensor.from(new Rng(5).normal(10 * 32), [10, 32], "bf16");
    const rows = table.toArray();
    const e = ops.embedding(table, [3, 0, 9]);
    expect(e.shape).toEqual([3, 32]);
    expect(Array.from(e.data.subarray(32, 64))).toEqual(Array.from(rows.subarray(0, 32)));
    expect(Array.from(e.data.subarray(64, 96))).toEqual(Array.from(rows.subarray(9 * 32, 10 * 32)));
    expect(() => ops.embedding(table, [1, 10])).toThrow("token id 10 at position 1 is outside [0, 10)");
  });

  test("conv1d equals its reference and equals conv1dStep repeated", () => {
    const rng = new Rng(6);
    const B = 2, L = 7, C = 19, K = 4;
    const x = rng.normal(B * L * C), w = rng.normal(C * K, 0.5), b = rng.normal(C), s0 = rng.normal(B * (K - 1) * C);
    const { y, state } = ops.conv1d(t(x, [B, L, C]), t(w, [C, K]), { bias: t(b, [C]), state: t(s0, [B, K - 1, C]), silu: true });
    const ref = conv1dRef(x, w, b, s0, B, L, C, K, true);
    expect(maxRelError(y.data, ref.y, 1e-6)).toBeLessThan(1e-5);
    expect(maxRelError(state.data, ref.state, 0)).toBe(0);
    const st = t(s0, [B, K - 1, C]);
    for (let i = 0; i < L; i++) {
      const xi = new Float32Array(B * C);
      for (let bb = 0; bb < B; bb++) xi.set(x.subarray((bb * L + i) * C, (bb * L + i + 1) * C), bb * C);
      const yi = ops.conv1dStep(t(xi, [B, C]), t(w, [C, 1, K]), st, { bias: t(b, [C]), silu: true });
      for (let bb = 0; bb < B; bb++) {
        const want = y.data.subarray((bb * L + i) * C, (bb * L + i + 1) * C);
        expect(maxRelError(yi.data.subarray(bb * C, (bb + 1) * C), want, 1e-6)).toBeLessThan(1e-5);
      }
    }
    expect(maxRelError(st.data, ref.state, 0)).toBe(0);
  });

  test("selectiveScan equals the recurrence, and selectiveStateUpdate repeated equals it", () => {
    const rng = new Rng(7);
    const batch = 2, length = 9, channels = 6, N = 5, groups = 2;
    const u = rng.normal(batch * length * channels);
    const delta = rng.uniform(batch * length * channels, -4, 1);
    const A = rng.uniform(channels * N, -2, 2).map((v) => -Math.exp(v));
    const Bm = rng.normal(batch * length * groups * N), Cm = rng.normal(batch * length * groups * N);
    const D = rng.normal(channels), z = rng.normal(batch * length * channels), bias = rng.normal(channels, 0.5);
    const s0 = rng.normal(batch * channels * N);
    const res = ops.selectiveScan({
      u: t(u, [batch, length, channels]), delta: t(delta, [batch, length, channels]), A: t(A, [channels, N]),
      B: t(Bm, [batch, length, groups, N]), C: t(Cm, [batch, length, groups, N]), D: t(D, [channels]),
      z: t(z, [batch, length, channels]), deltaBias: t(bias, [channels]), deltaSoftplus: true, state: t(s0, [batch, channels, N]),
    });
    const ref = selectiveScanRef({ u, delta, A, B: Bm, C: Cm, D, z, deltaBias: bias, softplus: true, state: s0, batch, length, channels, N, groups });
    const floor = 0.1 * rmsOf(ref.y); // as for matmul: fp32 rounding scales with the state, not the output
    expect(maxRelError(res.y.data, ref.y, floor)).toBeLessThan(1e-5);
    expect(maxRelError(res.state.data, ref.state, 0.1 * rmsOf(ref.state))).toBeLessThan(1e-5);

    const state = t(s0, [batch, channels, N]);
    const pick = (src: Float32Array, width: number, i: number) => {
      const out = new Float32Array(batch * width);
      for (let b = 0; b < batch; b++) out.set(src.subarray((b * length + i) * width, (b * length + i + 1) * width), b * width);
      return out;
    };
    for (let i = 0; i < length; i++) {
      const y = ops.selectiveStateUpdate({
        u: t(pick(u, channels, i), [batch, channels]), delta: t(pick(delta, channels, i), [batch, channels]), A: t(A, [channels, N]),
        B: t(pick(Bm, groups * N, i), [batch, groups, N]), C: t(pick(Cm, groups * N, i), [batch, groups, N]), D: t(D, [channels]),
        z: t(pick(z, channels, i), [batch, channels]), deltaBias: t(bias, [channels]), deltaSoftplus: true, state,
      });
      expect(maxRelError(y.data, pick(res.y.data as Float32Array, channels, i), floor)).toBeLessThan(1e-5);
    }
    expect(maxRelError(state.data, res.state.data, 0.1 * rmsOf(ref.state))).toBeLessThan(1e-5);
  });

  test("ssdChunked equals the selective scan with a per-head scalar A (the duality), for several chunk sizes", () => {
    const rng = new Rng(8);
    const batch = 2, length = 11, heads = 4, P = 3, N = 6, groups = 2;
    const x = rng.normal(batch * length * heads * P), dt = rng.uniform(batch * length * heads, -3, 1);
    const A = rng.uniform(heads, -1, 1.5).map((v) => -Math.exp(v));
    const Bm = rng.normal(batch * length * groups * N), Cm = rng.normal(batch * length * groups * N);
    const D = rng.normal(heads), dtBias = rng.normal(heads, 0.3);
    const channels = heads * P;
    const expand = (v: Float32Array, per: number) => Float32Array.from({ length: v.length * per }, (_, i) => v[Math.floor(i / per)]);
    const scan = selectiveScanRef({
      u: x, delta: expand(dt, P), A: expand(A, P * N), B: Bm, C: Cm, D: expand(D, P), deltaBias: expand(dtBias, P), softplus: true,
      batch, length, channels, N, groups,
    });
    for (const chunkSize of [1, 4, 11, 64]) {
      const r = ops.ssdChunked({
        x: t(x, [batch, length, heads, P]), dt: t(dt, [batch, length, heads]), A: t(A, [heads]),
        B: t(Bm, [batch, length, groups, N]), C: t(Cm, [batch, length, groups, N]), D: t(D, [heads]),
        dtBias: t(dtBias, [heads]), dtSoftplus: true, chunkSize,
      });
      expect(maxRelError(r.y.data, scan.y, 0.1 * rmsOf(scan.y))).toBeLessThan(1e-5);
      expect(maxRelError(r.state.data, scan.state, 0.1 * rmsOf(scan.state))).toBeLessThan(1e-5);
    }
    // The one-step form, token by token, from the same zero state.
    const state = Tensor.zeros([batch, heads, P, N]);
    const last = new Float32Array(batch * heads * P);
    for (let i = 0; i < length; i++) {
      const take = (src: Float32Array, w: number) => {
        const o = new Float32Array(batch * w);
        for (let b = 0; b < batch; b++) o.set(src.subarray((b * length + i) * w, (b * length + i + 1) * w), b * w);
        return o;
      };
      const y = ops.ssdStep({
        x: t(take(x, heads * P), [batch, heads, P]), dt: t(take(dt, heads), [batch, heads]), A: t(A, [heads]),
        B: t(take(Bm, groups * N), [batch, groups, N]), C: t(take(Cm, groups * N), [batch, groups, N]), D: t(D, [heads]),
        dtBias: t(dtBias, [heads]), dtSoftplus: true, state,
      });
      if (i === length - 1) last.set(y.data);
    }
    const wantLast = new Float64Array(batch * channels);
    for (let b = 0; b < batch; b++) wantLast.set(scan.y.subarray((b * length + length - 1) * channels, (b * length + length) * channels), b * channels);
    expect(maxRelError(last, wantLast, 0.1 * rmsOf(scan.y))).toBeLessThan(1e-5);
    expect(maxRelError(state.data, scan.state, 0.1 * rmsOf(scan.state))).toBeLessThan(1e-5);
  });

  test("ssdChunked with bf16Products: close to the f32 products, and rounded only at avx512bf16", () => {
    const rng = new Rng(9);
    const batch = 2, length = 37, heads = 4, P = 20, N = 33, groups = 2;
    const inputs = {
      x: t(rng.normal(batch * length * heads * P), [batch, length, heads, P]),
      dt: t(rng.uniform(batch * length * heads, -3, 1), [batch, length, heads]),
      A: t(rng.uniform(heads, -1, 1.5).map((v) => -Math.exp(v)), [heads]),
      B: t(rng.normal(batch * length * groups * N), [batch, length, groups, N]),
      C: t(rng.normal(batch * length * groups * N), [batch, length, groups, N]),
      D: t(rng.normal(heads), [heads]), dtSoftplus: true, chunkSize: 16,
      state: t(rng.normal(batch * heads * P * N), [batch, heads, P, N]),
    };
    for (const level of levels) {
      setCpuLevel(level);
      const exact = ops.ssdChunked(inputs);
      const rounded = ops.ssdChunked({ ...inputs, bf16Products: true });
      if (level === "avx512bf16") {
        // Operands rounded to 8 significant bits: about 1e-3 of the values' RMS (the C++ test bounds it).
        expect(Array.from(rounded.y.data)).not.toEqual(Array.from(exact.y.data));
        expect(maxRelError(rounded.y.data, exact.y.data, 0.5 * rmsOf(exact.y.data))).toBeLessThan(6e-2);
        expect(maxRelError(rounded.state.data, exact.state.data, 0.5 * rmsOf(exact.state.data))).toBeLessThan(6e-2);
      } else {
        expect(Array.from(rounded.y.data)).toEqual(Array.from(exact.y.data));
        expect(Array.from(rounded.state.data)).toEqual(Array.from(exact.state.data));
      }
    }
    setCpuLevel(best);
  });

  test("moe routes to the top-k experts and combines their GLU MLPs", () => {
    const rng = new Rng(9);
    const T = 5, d = 8, F = 6, E = 4, k = 2;
    const x = rng.normal(T * d), router = rng.normal(E * d), fc1 = rng.normal(E * 2 * F * d, 0.3), fc2 = rng.normal(E * d * F, 0.3);
    const { out, counts } = ops.moe(t(x, [T, d]), {
      router: t(router, [E, d]), fc1: t(fc1, [E, 2 * F, d]), fc2: t(fc2, [E, d, F]), topK: k, renormalize: true, activation: "silu",
    });
    const logits = matmulRef(x, router, null, T, E, d);
    const want = new Float64Array(T * d);
    const wantCounts = new Array(E).fill(0);
    for (let tok = 0; tok < T; tok++) {
      const row = Array.from(logits.subarray(tok * E, (tok + 1) * E));
      const m = Math.max(...row);
      const p = row.map((v) => Math.exp(v - m));
      const order = p.map((v, i) => [v, i]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, k);
      const total = order.reduce((s, [v]) => s + v, 0);
      for (const [v, e] of order) {
        wantCounts[e]++;
        const h = matmulRef(x.subarray(tok * d, (tok + 1) * d), fc1.subarray(e * 2 * F * d, (e + 1) * 2 * F * d), null, 1, 2 * F, d);
        const g = Float64Array.from({ length: F }, (_, j) => silu(h[j]) * h[F + j]);
        const o = matmulRef(g, fc2.subarray(e * d * F, (e + 1) * d * F), null, 1, d, F);
        for (let j = 0; j < d; j++) want[tok * d + j] += (v / total) * o[j];
      }
    }
    expect(Array.from(counts.data)).toEqual(wantCounts);
    expect(maxRelError(out.data, want, 0.1 * rmsOf(want))).toBeLessThan(1e-5);
  });

  test("argmax and seeded sampling", () => {
    const logits = t([0.5, 3, -1, 3, 2], [1, 5]);
    expect(Array.from(ops.argmax(logits))).toEqual([1]); // tie: the lower index
    expect(ops.sample(logits, { temperature: 0 })).toBe(1);
    expect(ops.sample(logits, { topK: 1, seed: 5 })).toBe(1);
    const a = new ops.Sampler({ seed: 42, temperature: 1 });
    const b = new ops.Sampler({ seed: 42, temperature: 1 });
    const seqA = Array.from({ length: 20 }, () => a.sample(logits));
    const seqB = Array.from({ length: 20 }, () => b.sample(logits));
    expect(seqA).toEqual(seqB);
    expect(new Set(seqA).size).toBeGreaterThan(1); // it does draw, not always the argmax
    // A strong repetition penalty on both maxima moves the greedy choice to token 4.
    expect(ops.sample(logits, { temperature: 0, repetitionPenalty: 10, penaltyTokens: [1, 3] })).toBe(4);
  });

  test("a sampler's draws for a device-side sampler are the stream its own sample() takes", () => {
    // nextDraw() hands out what sample() would use and advances alike: drawing every other token
    // through it (with the native sampler taking the draw directly) leaves the stream unchanged.
    const rng = new Rng(3);
    const logits = rng.normal(97, 1);
    const options = { temperature: 0.8, topK: 30, topP: 0.9, minP: 0.01, repetitionPenalty: 1.2 };
    const penaltyTokens = [4, 8, 15, 16, 23, 42];
    const plain = new ops.Sampler({ seed: 1234, ...options });
    const mixed = new ops.Sampler({ seed: 1234, ...options });
    const want: number[] = [], got: number[] = [];
    for (let i = 0; i < 64; i++) {
      want.push(plain.sample(logits, { penaltyTokens }));
      if (i % 2) {
        got.push(mixed.sample(logits, { penaltyTokens }));
        continue;
      }
      const d = mixed.nextDraw({ penaltyTokens });
      expect(d.draw).toBeGreaterThanOrEqual(0);
      expect(d.draw).toBeLessThan(1);
      expect(Array.from(d.penaltyTokens)).toEqual(penaltyTokens);
      got.push(native().sample({
        logits: logits.slice().buffer, vocab: logits.length, temperature: d.temperature, topK: d.topK, topP: d.topP, minP: d.minP,
        repetitionPenalty: d.repetitionPenalty, penaltyTokens: d.penaltyTokens.buffer, penaltyCount: d.penaltyTokens.length, draw: d.draw,
      }).token);
    }
    expect(got).toEqual(want);
    expect(new Set(want).size).toBeGreaterThan(3);
    expect(() => mixed.nextDraw({ topK: -1 })).toThrow(/topK must be an integer >= 0/);
    const bad = { logits: logits.slice().buffer, vocab: logits.length, topK: 0, draw: 1 };
    expect(() => native().sample(bad)).toThrow(/either rngState \(a BigInt\) or draw \(a number in \[0, 1\)\) is required/);
    expect(() => native().sample({ ...bad, draw: 0.5, rngState: 1n })).toThrow(/rngState and draw exclude each other/);
  });
});

describe("ops reject bad arguments with messages that name them", () => {
  const x = Tensor.zeros([2, 8]);
  test("matmul: wrong inner size", () => {
    expect(() => ops.matmul(x, Tensor.zeros([4, 7]))).toThrow("matmul: x must have shape [2, 7], got [2, 8]");
  });
  test("matmul: wrong dtype and missing tensors", () => {
    expect(() => ops.matmul(Tensor.zeros([2, 8], "i32"), Tensor.zeros([4, 8]))).toThrow("matmul: x must have dtype f32, got i32");
    expect(() => ops.matmul(x, null as never)).toThrow("matmul: weight is required");
    expect(() => ops.matmul(x, Tensor.zeros([4, 8]), Tensor.zeros([5]))).toThrow("matmul: bias must have shape [4], got [5]");
  });
  test("disposed tensors are refused", () => {
    const w = Tensor.zeros([4, 8]);
    w.dispose();
    expect(() => ops.matmul(x, w)).toThrow("matmul: weight has been disposed");
  });
  test("selectiveScan: B's sizes must agree with u", () => {
    const u = Tensor.zeros([1, 5, 4]);
    expect(() =>
      ops.selectiveScan({ u, delta: u, A: Tensor.zeros([4, 16]), B: Tensor.zeros([1, 6, 16]), C: Tensor.zeros([1, 6, 16]) }),
    ).toThrow("selectiveScan: B must have shape [1, 5, 16], got [1, 6, 16] (length = 5 from u)");
  });
  test("ssdChunked: heads must divide into groups; chunkSize must be positive", () => {
    const base = {
      x: Tensor.zeros([1, 3, 3, 2]), dt: Tensor.zeros([1, 3, 3]), A: Tensor.zeros([3]),
      B: Tensor.zeros([1, 3, 2, 4]), C: Tensor.zeros([1, 3, 2, 4]),
    };
    expect(() => ops.ssdChunked(base)).toThrow("ssdChunked: heads 3 must be a multiple of groups 2");
    const ok = { ...base, B: Tensor.zeros([1, 3, 1, 4]), C: Tensor.zeros([1, 3, 1, 4]) };
    expect(() => ops.ssdChunked({ ...ok, chunkSize: 0 })).toThrow("ssdChunked: chunkSize must be a positive integer, got 0");
  });
  test("conv1d: state shape", () => {
    expect(() => ops.conv1d(Tensor.zeros([1, 4, 3]), Tensor.zeros([3, 4]), { state: Tensor.zeros([1, 4, 3]) })).toThrow(
      "conv1d: state must have shape [1, 3, 3], got [1, 4, 3]",
    );
  });
  test("moeRoute: topK larger than the experts", () => {
    expect(() => ops.moeRoute(Tensor.zeros([2, 3]), { topK: 4 })).toThrow("moeRoute: topK 4 exceeds the 3 experts");
    expect(() => ops.moeRoute(Tensor.zeros([2, 3]), { topK: 1, scoring: "max" as never })).toThrow(
      'moeRoute: scoring must be one of "softmax", "sigmoid", got "max"',
    );
  });
  test("sampling options are checked", () => {
    expect(() => ops.sample(new Float32Array([1, 2]), { topP: 0 })).toThrow("sample: topP must be in (0, 1]");
    expect(() => ops.sample(new Float32Array([1, 2]), { penaltyTokens: [2] })).toThrow("penalty token 2 is outside [0, 2)");
  });
});
