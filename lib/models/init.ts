// Seeded initialisation of a Mamba language model's weights, following the reference
// implementation: embeddings ~ N(0, 0.02); linear layers (the MoE router and experts too) uniform
// (±1/sqrt(fan_in)) with out_proj and the experts' fc2 rescaled by 1/sqrt(n_layer), their biases 0;
// the conv and its bias uniform(±1/sqrt(K)); dt_bias = softplus⁻¹(dt) for dt log-uniform in
// [dtMin, dtMax]; A = -exp(A_log) with A_log = log(1..N) per channel (Mamba-1, S4D-real) or
// log(uniform[1, 16]) per head (Mamba-2); D = 1; norms = 1.
import { MambaConfig, expectedShapes } from "./config";
import { Tensor } from "../tensor";

export interface InitOptions {
  seed?: number;
  dtMin?: number;
  dtMax?: number;
  /** Floor of the sampled dt (the reference's dt_init_floor). */
  dtFloor?: number;
}

/** splitmix64 stream of uniforms in [0, 1). */
class Uniform {
  private s: bigint;
  constructor(seed: number) {
    this.s = BigInt.asUintN(64, BigInt(seed) * 0x9e3779b97f4a7c15n + 0x632be59bd9b4e019n);
  }
  next(): number {
    this.s = BigInt.asUintN(64, this.s + 0x9e3779b97f4a7c15n);
    let z = this.s;
    z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
    z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
    z ^= z >> 31n;
    return Number(z >> 11n) / 2 ** 53;
  }
}

/** Fast uniforms for large tensors: a 32-bit LCG per tensor seeded from the stream. */
function fill(t: Tensor, seed: number, f: (u: () => number, i: number) => number) {
  let s = seed >>> 0 || 1;
  const u = () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
  const d = t.data as Float32Array;
  for (let i = 0; i < d.length; i++) d[i] = f(u, i);
}

/** Fresh f32 weights for `config` under the canonical names. */
export function initWeights(config: MambaConfig, options: InitOptions = {}): Map<string, Tensor> {
  const root = new Uniform(options.seed ?? 0);
  const dtMin = options.dtMin ?? 1e-3, dtMax = options.dtMax ?? 0.1, dtFloor = options.dtFloor ?? 1e-4;
  const weights = new Map<string, Tensor>();
  for (const [name, shape] of expectedShapes(config)) {
    const t = Tensor.zeros(shape);
    const seed = Math.floor(root.next() * 2 ** 32);
    const base = name.slice(name.lastIndexOf(".") + 1);
    const fanIn = shape[shape.length - 1];
    if (name === "embeddings" || name === "lm_head") {
      // Box–Muller normals with std 0.02
      fill(t, seed, (u) => 0.02 * Math.sqrt(-2 * Math.log(1 - u())) * Math.cos(2 * Math.PI * u()));
    } else if (base === "norm" || name === "norm_f" || base === "ssm_norm" || base === "D") {
      (t.data as Float32Array).fill(1);
    } else if (base === "A") {
      const N = config.stateSize;
      if (config.architecture === "mamba1") fill(t, seed, (_u, i) => -((i % N) + 1));
      else fill(t, seed, (u) => -(1 + 15 * u()));
    } else if (base === "dt_bias") {
      fill(t, seed, (u) => {
        const dt = Math.max(dtFloor, Math.exp(Math.log(dtMin) + u() * (Math.log(dtMax) - Math.log(dtMin))));
        return dt + Math.log(-Math.expm1(-dt)); // softplus⁻¹(dt)
      });
    } else if (base === "conv") {
      const bound = 1 / Math.sqrt(config.convKernel);
      fill(t, seed, (u) => (2 * u() - 1) * bound);
    } else if (base === "conv_bias" || base.endsWith("_bias")) {
      const bound = base === "conv_bias" ? 1 / Math.sqrt(config.convKernel) : 0;
      fill(t, seed, (u) => (2 * u() - 1) * bound);
    } else {
      let bound = 1 / Math.sqrt(fanIn);
      if (base === "out_proj" || base === "fc2") bound /= Math.sqrt(config.numLayers);
      if (base === "dt_proj") bound = config.timeStepRank ** -0.5;
      fill(t, seed, (u) => (2 * u() - 1) * bound);
    }
    weights.set(name, t);
  }
  return weights;
}

/** The sizes of the public 130M checkpoints (state-spaces/mamba-130m and mamba2-130m). */
export function preset(name: "mamba-130m" | "mamba2-130m"): MambaConfig {
  const common = {
    hiddenSize: 768, numLayers: 24, intermediateSize: 1536, convKernel: 4, useBias: false, useConvBias: true,
    normEps: 1e-5, timeStepLimit: [0, Infinity] as [number, number], normBeforeGate: false, tieEmbeddings: true,
    eosTokenId: 0,
  };
  if (name === "mamba-130m") {
    return { ...common, architecture: "mamba1", vocabSize: 50280, stateSize: 16, timeStepRank: 48, numHeads: 0, headDim: 0, numGroups: 1, chunkSize: 256 };
  }
  return { ...common, architecture: "mamba2", vocabSize: 50288, stateSize: 128, timeStepRank: 0, numHeads: 24, headDim: 64, numGroups: 1, chunkSize: 256 };
}
