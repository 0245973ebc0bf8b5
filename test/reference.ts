// Naive references for the jest tests: plain loops over Float64 that read like the equations in
// DESIGN.md. Slow on purpose; the C++ tests hold the exhaustive comparisons.

/** A seeded generator (splitmix64) so a failing case reproduces. */
export class Rng {
  private s: bigint;
  constructor(seed: number) {
    this.s = BigInt(seed) & 0xffffffffffffffffn;
  }
  /** Uniform in [0, 1). */
  next(): number {
    this.s = (this.s + 0x9e3779b97f4a7c15n) & 0xffffffffffffffffn;
    let z = this.s;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & 0xffffffffffffffffn;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & 0xffffffffffffffffn;
    z = z ^ (z >> 31n);
    return Number(z >> 11n) / 2 ** 53;
  }
  uniform(n: number, lo: number, hi: number): Float32Array {
    return Float32Array.from({ length: n }, () => lo + (hi - lo) * this.next());
  }
  normal(n: number, scale = 1): Float32Array {
    return Float32Array.from({ length: n }, () => {
      const u1 = Math.max(this.next(), 1e-300);
      return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * this.next()) * scale;
    });
  }
}

export const silu = (v: number) => v / (1 + Math.exp(-v));
export const softplus = (v: number) => (v > 20 ? v : Math.log1p(Math.exp(v)));

/** Largest |got - want| / (|want| + floor). */
export function maxRelError(got: ArrayLike<number>, want: ArrayLike<number>, floor: number): number {
  if (got.length !== want.length) throw new Error(`length ${got.length} != ${want.length}`);
  let worst = 0;
  for (let i = 0; i < got.length; i++) {
    const e = Math.abs(got[i] - want[i]) / (Math.abs(want[i]) + floor);
    if (!(e <= worst)) worst = Number.isNaN(e) ? Infinity : e;
  }
  return worst;
}

export function rmsOf(v: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < v.length; i++) s += v[i] * v[i];
  return Math.sqrt(s / Math.max(1, v.length));
}

/** y[M,N] = x[M,K]·W[N,K]ᵀ + b */
export function matmulRef(x: ArrayLike<number>, w: ArrayLike<number>, b: ArrayLike<number> | null, M: number, N: number, K: number): Float64Array {
  const y = new Float64Array(M * N);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let s = b ? b[n] : 0;
      for (let k = 0; k < K; k++) s += x[m * K + k] * w[n * K + k];
      y[m * N + n] = s;
    }
  return y;
}

export function rmsnormRef(x: ArrayLike<number>, w: ArrayLike<number>, rows: number, dim: number, eps: number): Float64Array {
  const out = new Float64Array(rows * dim);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let i = 0; i < dim; i++) ss += x[r * dim + i] ** 2;
    const inv = 1 / Math.sqrt(ss / dim + eps);
    for (let i = 0; i < dim; i++) out[r * dim + i] = x[r * dim + i] * inv * w[i];
  }
  return out;
}

/** x [B, L, C] channels last; w [C, K]; state [B, K-1, C] or null. */
export function conv1dRef(
  x: ArrayLike<number>, w: ArrayLike<number>, bias: ArrayLike<number> | null, state: ArrayLike<number> | null,
  B: number, L: number, C: number, K: number, act: boolean,
): { y: Float64Array; state: Float64Array } {
  const y = new Float64Array(B * L * C);
  const stateOut = new Float64Array(B * (K - 1) * C);
  for (let b = 0; b < B; b++) {
    const xp = (t: number, c: number) => (t < K - 1 ? (state ? state[(b * (K - 1) + t) * C + c] : 0) : x[(b * L + t - (K - 1)) * C + c]);
    for (let t = 0; t < L; t++)
      for (let c = 0; c < C; c++) {
        let s = bias ? bias[c] : 0;
        for (let k = 0; k < K; k++) s += w[c * K + k] * xp(t + k, c);
        y[(b * L + t) * C + c] = act ? silu(s) : s;
      }
    for (let j = 0; j < K - 1; j++)
      for (let c = 0; c < C; c++) stateOut[(b * (K - 1) + j) * C + c] = xp(L + j, c);
  }
  return { y, state: stateOut };
}

/** Mamba-1 selective scan, the recurrence as written. */
export function selectiveScanRef(a: {
  u: ArrayLike<number>; delta: ArrayLike<number>; A: ArrayLike<number>; B: ArrayLike<number>; C: ArrayLike<number>;
  D?: ArrayLike<number> | null; z?: ArrayLike<number> | null; deltaBias?: ArrayLike<number> | null; softplus?: boolean;
  state?: ArrayLike<number> | null; batch: number; length: number; channels: number; N: number; groups: number;
}): { y: Float64Array; state: Float64Array } {
  const { batch, length, channels, N, groups } = a;
  const y = new Float64Array(batch * length * channels);
  const s = new Float64Array(batch * channels * N);
  if (a.state) for (let i = 0; i < s.length; i++) s[i] = a.state[i];
  const per = channels / groups;
  for (let b = 0; b < batch; b++)
    for (let t = 0; t < length; t++)
      for (let d = 0; d < channels; d++) {
        const i = (b * length + t) * channels + d;
        let dt = a.delta[i] + (a.deltaBias ? a.deltaBias[d] : 0);
        if (a.softplus) dt = softplus(dt);
        const g = Math.floor(d / per);
        let out = 0;
        for (let n = 0; n < N; n++) {
          const bc = ((b * length + t) * groups + g) * N + n;
          const si = (b * channels + d) * N + n;
          s[si] = Math.exp(dt * a.A[d * N + n]) * s[si] + dt * a.u[i] * a.B[bc];
          out += s[si] * a.C[bc];
        }
        if (a.D) out += a.D[d] * a.u[i];
        if (a.z) out *= silu(a.z[i]);
        y[i] = out;
      }
  return { y, state: s };
}
