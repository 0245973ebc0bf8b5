// Kernel benchmarks against the machine's own ceilings. Measures read bandwidth (a vectorised sum
// over 1 GiB) and peak fp32 FMA throughput (independent FMA chains on every thread) with the
// kernels' own code, then times each kernel on model-shaped inputs (mamba-130m / mamba2-130m layer
// sizes) and reports GB/s or GFLOP/s as a fraction of the ceiling that bounds it.
//
//   npm run bench:kernels [-- --threads N] [-- --quick]
// Prints a table and one JSON line. Not part of `npm test`: these machines are shared and noisy.
import { cpuInfo, getThreads, setThreads, Tensor } from "../lib";
import { DType, dtypeCode } from "../lib/dtype";
import { native } from "../lib/native";

const argv = process.argv.slice(2);
const quick = argv.includes("--quick");
const ti = argv.indexOf("--threads");
if (ti >= 0) setThreads(Number(argv[ti + 1]));

const addon = native();

/** Median seconds of one call, after warm-up, over enough repetitions to last ~minSeconds. */
function timeIt(fn: () => void, minSeconds = quick ? 0.15 : 0.6): number {
  fn();
  fn();
  const samples: number[] = [];
  const start = performance.now();
  while (samples.length < 5 || (performance.now() - start) / 1000 < minSeconds) {
    const t0 = performance.now();
    fn();
    samples.push((performance.now() - t0) / 1000);
    if (samples.length >= 2000) break;
  }
  samples.sort((a, b) => a - b);
  return samples[Math.floor(samples.length / 2)];
}

function randomF32(n: number, scale = 1, offset = 0): Tensor {
  const t = Tensor.zeros([n]);
  const d = t.data as Float32Array;
  let s = 12345 + n;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    d[i] = offset + ((s / 2 ** 32) * 2 - 1) * scale;
  }
  return t;
}

// ---- ceilings -------------------------------------------------------------------------------
const bwBytes = (quick ? 256 : 1024) * 2 ** 20;
const big = randomF32(bwBytes / 4);
const bwSeconds = timeIt(() => addon.readSum({ data: big.buffer(), n: bwBytes / 4 }));
const bandwidth = bwBytes / bwSeconds; // bytes/s
big.dispose();
const fmaIters = quick ? 2e6 : 1e7;
let flops = 0;
const fmaSeconds = timeIt(() => {
  flops = addon.fmaPeak({ iterations: fmaIters });
});
const peak = flops / fmaSeconds; // FLOP/s

interface Row {
  kernel: string;
  shape: string;
  ms: number;
  rate: number;
  unit: "GB/s" | "GFLOP/s";
  fraction: number;
}
const rows: Row[] = [];
function memoryBound(kernel: string, shape: string, bytes: number, fn: () => void) {
  const s = timeIt(fn);
  rows.push({ kernel, shape, ms: s * 1e3, rate: bytes / s / 1e9, unit: "GB/s", fraction: bytes / s / bandwidth });
}
function computeBound(kernel: string, shape: string, flop: number, fn: () => void) {
  const s = timeIt(fn);
  rows.push({ kernel, shape, ms: s * 1e3, rate: flop / s / 1e9, unit: "GFLOP/s", fraction: flop / s / peak });
}

// ---- matmul: decode (weights streamed once: bandwidth) and prefill (compute) ------------------
const d = 768, dInner = 1536;
const wF32 = randomF32(2 * dInner * d, 0.05);
const weights: Record<string, Tensor> = { f32: wF32 };
for (const dt of ["f16", "bf16", "q8_0"] as DType[]) {
  const w = Tensor.zeros([2 * dInner * d], dt);
  addon.convert({ src: wF32.buffer(), srcDtype: 0, dst: w.buffer(), dstDtype: dtypeCode(dt), n: 2 * dInner * d });
  weights[dt] = w;
}
const prefill = quick ? 128 : 512;
const xs = randomF32(prefill * d);
const ys = Tensor.zeros([prefill * 2 * dInner]);
// Decode streams each layer's weights from memory once per token: cycle through enough copies
// (≥ 256 MB) that no cache holds them, as a real model's layers would.
const copies: Record<string, Tensor[]> = {};
for (const [dt, w] of Object.entries(weights)) {
  const n = Math.max(2, Math.ceil((256 * 2 ** 20) / w.byteLength));
  copies[dt] = [w, ...Array.from({ length: n - 1 }, () => w.clone())];
}
for (const [dt, list] of Object.entries(copies)) {
  let next = 0;
  memoryBound(`matmul decode ${dt}`, `1×${d} · [${2 * dInner}×${d}]ᵀ`, list[0].byteLength + d * 4 + 2 * dInner * 4, () => {
    const w = list[next++ % list.length];
    addon.matmul({ x: xs.buffer(), w: w.buffer(), wDtype: dtypeCode(w.dtype), bias: null, y: ys.buffer(), M: 1, N: 2 * dInner, K: d });
  });
}
for (const M of [16]) {
  const list = copies.f32;
  let next = 0;
  memoryBound(`matmul batch-${M} f32`, `${M}×${d} · [${2 * dInner}×${d}]ᵀ`, list[0].byteLength, () => {
    const w = list[next++ % list.length];
    addon.matmul({ x: xs.buffer(), w: w.buffer(), wDtype: 0, bias: null, y: ys.buffer(), M, N: 2 * dInner, K: d });
  });
}
for (const list of Object.values(copies)) list.slice(1).forEach((t) => t.dispose());
for (const [dt, w] of Object.entries(weights)) {
  computeBound(`matmul prefill ${dt}`, `${prefill}×${d} · [${2 * dInner}×${d}]ᵀ`, 2 * prefill * d * 2 * dInner, () =>
    addon.matmul({ x: xs.buffer(), w: w.buffer(), wDtype: dtypeCode(w.dtype), bias: null, y: ys.buffer(), M: prefill, N: 2 * dInner, K: d }),
  );
}

// ---- norms, embedding -----------------------------------------------------------------------
const normW = randomF32(d, 0.1, 1);
const hs = randomF32(prefill * d);
const res = randomF32(prefill * d);
const outs = Tensor.zeros([prefill * d]);
const resOut = Tensor.zeros([prefill * d]);
memoryBound("rmsnorm + residual", `${prefill}×${d}`, prefill * d * 4 * 4, () =>
  addon.rmsnorm({ x: hs.buffer(), residual: res.buffer(), weight: normW.buffer(), out: outs.buffer(), residualOut: resOut.buffer(), rows: prefill, dim: d, eps: 1e-5 }),
);
const gz = randomF32(prefill * dInner);
const gx = randomF32(prefill * dInner);
const gw = randomF32(dInner, 0.1, 1);
const gout = Tensor.zeros([prefill * dInner]);
memoryBound("gated rmsnorm", `${prefill}×${dInner}, group ${dInner}`, prefill * dInner * 4 * 3, () =>
  addon.gatedRmsnorm({ x: gx.buffer(), z: gz.buffer(), weight: gw.buffer(), out: gout.buffer(), rows: prefill, dim: dInner, groupSize: dInner, eps: 1e-5, normBeforeGate: false }),
);
const vocab = 50280;
const table = Tensor.zeros([vocab * d], "bf16");
const ids = Tensor.from(Int32Array.from({ length: prefill }, (_, i) => (i * 7919) % vocab));
memoryBound("embedding bf16", `${prefill} ids × ${d}`, prefill * d * (2 + 4), () =>
  addon.embedding({ table: table.buffer(), dtype: dtypeCode("bf16"), vocab, dim: d, ids: ids.buffer(), count: prefill, out: outs.buffer() }),
);

// ---- conv1d ---------------------------------------------------------------------------------
const K = 4;
const cx = randomF32(prefill * dInner);
const cw = randomF32(dInner * K, 0.5);
const cb = randomF32(dInner, 0.1);
const cy = Tensor.zeros([prefill * dInner]);
const cs = Tensor.zeros([(K - 1) * dInner]);
memoryBound("conv1d + silu", `L ${prefill}, C ${dInner}, K ${K}`, prefill * dInner * 8, () =>
  addon.conv1d({ x: cx.buffer(), weight: cw.buffer(), bias: cb.buffer(), stateIn: null, stateOut: cs.buffer(), y: cy.buffer(), batch: 1, length: prefill, channels: dInner, kernel: K, silu: true }),
);
memoryBound("conv1d step", `C ${dInner}, K ${K}`, dInner * 4 * (2 * (K - 1) + 2 + K), () =>
  addon.conv1dStep({ x: cx.buffer(), weight: cw.buffer(), bias: cb.buffer(), state: cs.buffer(), y: cy.buffer(), batch: 1, channels: dInner, kernel: K, silu: true }),
);

// ---- Mamba-1 selective scan -----------------------------------------------------------------
// Per (token, channel, state element): exp(Δ·A), s·decay, Δu·B added, s·C accumulated — counted
// as 7 FLOPs (the exp as one).
const N1 = 16;
const u = randomF32(prefill * dInner);
const delta = randomF32(prefill * dInner, 2, -2);
const A1 = randomF32(dInner * N1, 0.5, -1.5);
const B1 = randomF32(prefill * N1);
const C1 = randomF32(prefill * N1);
const D1 = randomF32(dInner);
const z1 = randomF32(prefill * dInner);
const bias1 = randomF32(dInner, 0.5, -3);
const st1 = Tensor.zeros([dInner * N1]);
const y1 = Tensor.zeros([prefill * dInner]);
const scanArgs = (length: number) => ({
  batch: 1, length, channels: dInner, state: N1, groups: 1,
  u: u.buffer(), delta: delta.buffer(), A: A1.buffer(), B: B1.buffer(), C: C1.buffer(), D: D1.buffer(), z: z1.buffer(),
  deltaBias: bias1.buffer(), deltaSoftplus: true, stateIn: st1.buffer(), stateOut: st1.buffer(), y: y1.buffer(),
});
computeBound("selective scan", `L ${prefill}, D ${dInner}, N ${N1}`, 7 * prefill * dInner * N1, () => addon.selectiveScan(scanArgs(prefill)));
memoryBound("selective state update", `D ${dInner}, N ${N1}`, dInner * N1 * 4 * 3, () => addon.selectiveStateUpdate(scanArgs(1)));

// ---- Mamba-2 SSD ----------------------------------------------------------------------------
const H = 24, P = 64, N2 = 128, Q = 256;
const x2 = randomF32(prefill * H * P);
const dt2 = randomF32(prefill * H, 2, -2);
const A2 = randomF32(H, 0.5, -2);
const B2 = randomF32(prefill * N2);
const C2 = randomF32(prefill * N2);
const D2 = randomF32(H);
const st2 = Tensor.zeros([H * P * N2]);
const y2 = Tensor.zeros([prefill * H * P]);
const ssdArgs = (length: number) => ({
  batch: 1, length, heads: H, headDim: P, state: N2, groups: 1, chunkSize: Q, dtMin: 0, dtMax: Infinity,
  x: x2.buffer(), dt: dt2.buffer(), A: A2.buffer(), B: B2.buffer(), C: C2.buffer(), D: D2.buffer(), z: null,
  dtBias: null, dtSoftplus: true, stateIn: st2.buffer(), stateOut: st2.buffer(), y: y2.buffer(),
});
// The chunked algorithm's matmuls per chunk of q tokens: C·Bᵀ once per group (2q²N), and per head the
// masked product with x (2q²P), the chunk state (2qPN) and the state-to-output product (2qPN).
const chunks = Math.ceil(prefill / Q);
const q = Math.min(Q, prefill);
const ssdFlop = chunks * (2 * q * q * N2 + H * (2 * q * q * P + 4 * q * P * N2));
computeBound("ssd chunked", `L ${prefill}, H ${H}, P ${P}, N ${N2}, Q ${Q}`, ssdFlop, () => addon.ssdChunked(ssdArgs(prefill)));
memoryBound("ssd step", `H ${H}, P ${P}, N ${N2}`, H * P * N2 * 4 * 2, () => addon.ssdStep(ssdArgs(1)));

// ---- MoE ------------------------------------------------------------------------------------
const T = quick ? 64 : 256, E = 8, F = 1536, k = 2;
const mx = randomF32(T * d);
const logits = randomF32(T * E);
const fc1 = Tensor.zeros([E * 2 * F * d], "bf16");
const fc2 = Tensor.zeros([E * d * F], "bf16");
const mw = Tensor.zeros([T * k]);
const mi = Tensor.zeros([T * k], "i32");
const mc = Tensor.zeros([E], "i32");
const mout = Tensor.zeros([T * d]);
addon.moeRoute({ logits: logits.buffer(), tokens: T, experts: E, topK: k, scoring: 0, renormalize: true, weights: mw.buffer(), indices: mi.buffer(), counts: mc.buffer() });
computeBound("moe experts bf16", `T ${T}, d ${d}, E ${E}, F ${F}, k ${k}`, T * k * (2 * d * 2 * F + 2 * F * d), () =>
  addon.moeExperts({ tokens: T, dim: d, hidden: F, experts: E, topK: k, x: mx.buffer(), fc1: fc1.buffer(), fc1Dtype: dtypeCode("bf16"), fc1Bias: null, fc2: fc2.buffer(), fc2Dtype: dtypeCode("bf16"), fc2Bias: null, activation: 0, indices: mi.buffer(), weights: mw.buffer(), out: mout.buffer() }),
);

// ---- sampling -------------------------------------------------------------------------------
const lg = randomF32(vocab, 4);
const am = Tensor.zeros([1], "i32");
memoryBound("argmax", `vocab ${vocab}`, vocab * 4, () => addon.argmax({ logits: lg.buffer(), rows: 1, vocab, out: am.buffer() }));
let rng = 1n;
memoryBound("sample top-k 40, top-p 0.9", `vocab ${vocab}`, vocab * 4, () => {
  rng = addon.sample({ logits: lg.buffer(), vocab, temperature: 0.8, topK: 40, topP: 0.9, minP: 0, repetitionPenalty: 1, penaltyTokens: null, penaltyCount: 0, rngState: rng }).rngState;
});

// ---- report ---------------------------------------------------------------------------------
const info = cpuInfo();
const pad = (s: string, n: number) => s.padEnd(n);
const lpad = (s: string, n: number) => s.padStart(n);
console.log(`mamba-ssm kernel benchmark — cpu level ${info.level}, ${getThreads()} threads${quick ? " (quick)" : ""}`);
console.log(`ceilings: read bandwidth ${(bandwidth / 1e9).toFixed(1)} GB/s, fp32 FMA peak ${(peak / 1e9).toFixed(1)} GFLOP/s\n`);
console.log(`${pad("kernel", 28)}${pad("shape", 40)}${lpad("ms", 10)}${lpad("rate", 16)}${lpad("of ceiling", 12)}`);
for (const r of rows) {
  console.log(
    `${pad(r.kernel, 28)}${pad(r.shape, 40)}${lpad(r.ms.toFixed(3), 10)}${lpad(`${r.rate.toFixed(1)} ${r.unit}`, 16)}${lpad(`${(100 * r.fraction).toFixed(1)}%`, 12)}`,
  );
}
console.log(
  JSON.stringify({
    bench: "kernels",
    level: info.level,
    threads: getThreads(),
    bandwidthGBs: +(bandwidth / 1e9).toFixed(2),
    peakGflops: +(peak / 1e9).toFixed(1),
    rows: rows.map((r) => ({ kernel: r.kernel, shape: r.shape, ms: +r.ms.toFixed(4), rate: +r.rate.toFixed(2), unit: r.unit, fraction: +r.fraction.toFixed(4) })),
  }),
);
