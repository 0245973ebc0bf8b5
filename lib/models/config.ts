// The normalised description of a Mamba language model, whatever format it was loaded from, and the
// canonical names of its weights. Loaders (lib/io) map every format onto these; the native model
// runner (native/model) reads exactly these.
import { DType } from "../dtype";

export type Architecture = "mamba1" | "mamba2";

/**
 * Mixture-of-experts MLP blocks between the Mamba layers (BlackMamba). Layer i whose index is in
 * `layers` is an MoE block instead of a Mamba mixer, pre-norm with the same residual:
 *   p = softmax or sigmoid(router · x + router_bias);  the topK largest p (ties: lower index), divided
 *   by their sum when renormalize;  out = Σ_k p_k · fc2[e_k] · (act(a) ⊙ b),  [a, b] = fc1[e_k] · x.
 */
export interface MoeConfig {
  /** Indices of the MoE blocks, strictly increasing; at least one layer stays a Mamba layer. */
  layers: number[];
  numExperts: number;
  topK: number;
  /** Each expert's GLU width (fc1 has 2 · hiddenSize rows). */
  hiddenSize: number;
  scoring: "softmax" | "sigmoid";
  renormalize: boolean;
  activation: "silu" | "gelu" | "gelu_tanh";
  /** Router, fc1 and fc2 carry biases. */
  bias: boolean;
}

export interface MambaConfig {
  architecture: Architecture;
  /** d_model */
  hiddenSize: number;
  numLayers: number;
  /** Rows of the embedding and of the output head (already padded). */
  vocabSize: number;
  /** d_inner = expand · hidden_size (Mamba-2: heads · headDim) */
  intermediateSize: number;
  /** N */
  stateSize: number;
  /** K of the causal conv */
  convKernel: number;
  /** Mamba-1: rank of Δ's low-rank projection */
  timeStepRank: number;
  /** Mamba-2: heads H, head size P, B/C groups G, the SSD chunk length */
  numHeads: number;
  headDim: number;
  numGroups: number;
  chunkSize: number;
  /** in_proj / out_proj carry biases */
  useBias: boolean;
  useConvBias: boolean;
  normEps: number;
  /** Mamba-2: dt clamp after the softplus */
  timeStepLimit: [number, number];
  /** Mamba-2 gated norm order (false: norm(y·silu(z))) */
  normBeforeGate: boolean;
  /** The output head is the embedding */
  tieEmbeddings: boolean;
  /** Mixture-of-experts blocks; absent for a plain Mamba model. */
  moe?: MoeConfig;
  /** Token ids, where the source says */
  bosTokenId?: number;
  eosTokenId?: number;
  padTokenId?: number;
}

/**
 * Canonical weight names and shapes (PyTorch order [out, in]):
 *   embeddings                [vocab, d]
 *   norm_f                    [d]
 *   lm_head                   [vocab, d]        absent when tieEmbeddings
 *   layers.{i}.norm           [d]
 *   layers.{i}.in_proj        Mamba-1 [2·d_inner, d] (x, z);  Mamba-2 [2·d_inner + 2·G·N + H, d] (z, x, B, C, dt)
 *   layers.{i}.in_proj_bias   [rows of in_proj]  when useBias
 *   layers.{i}.conv           [channels, K]     channels: Mamba-1 d_inner; Mamba-2 d_inner + 2·G·N
 *   layers.{i}.conv_bias      [channels]        when useConvBias
 *   layers.{i}.x_proj         [dt_rank + 2N, d_inner]         Mamba-1
 *   layers.{i}.dt_proj        [d_inner, dt_rank]              Mamba-1
 *   layers.{i}.dt_bias        Mamba-1 [d_inner] (dt_proj.bias); Mamba-2 [H]
 *   layers.{i}.A              Mamba-1 [d_inner, N]; Mamba-2 [H]   — A itself, -exp(A_log), f32
 *   layers.{i}.D              Mamba-1 [d_inner]; Mamba-2 [H]
 *   layers.{i}.ssm_norm       [d_inner]                       Mamba-2 gated RMSNorm weight
 *   layers.{i}.out_proj       [d, d_inner]
 *   layers.{i}.out_proj_bias  [d]               when useBias
 * An MoE layer (moe.layers) has its norm and, in place of the mixer's weights (E experts of width Hm):
 *   layers.{i}.router         [E, d]            layers.{i}.router_bias  [E]          when moe.bias
 *   layers.{i}.fc1            [E, 2·Hm, d]      layers.{i}.fc1_bias     [E, 2·Hm]    when moe.bias
 *   layers.{i}.fc2            [E, d, Hm]        layers.{i}.fc2_bias     [E, d]       when moe.bias
 * Matrices (embeddings, lm_head, in_proj, x_proj, dt_proj, out_proj, router, fc1, fc2) may be f32,
 * f16, bf16 or q8_0; every other tensor is f32.
 */
export const MATRIX_WEIGHTS = ["in_proj", "x_proj", "dt_proj", "out_proj", "router", "fc1", "fc2"] as const;

/** Whether layer i is a mixture-of-experts block. */
export function isMoeLayer(config: MambaConfig, i: number): boolean {
  return config.moe !== undefined && config.moe.layers.includes(i);
}

/** Layers with a Mamba mixer: the ones that carry state. */
export function stateLayers(config: MambaConfig): number {
  return config.numLayers - (config.moe?.layers.length ?? 0);
}

/** Every canonical weight name with its expected shape. */
export function expectedShapes(config: MambaConfig): Map<string, number[]> {
  const c = config;
  const d = c.hiddenSize, di = c.intermediateSize, N = c.stateSize, K = c.convKernel;
  const out = new Map<string, number[]>();
  out.set("embeddings", [c.vocabSize, d]);
  out.set("norm_f", [d]);
  if (!c.tieEmbeddings) out.set("lm_head", [c.vocabSize, d]);
  const m1 = c.architecture === "mamba1";
  const inRows = m1 ? 2 * di : 2 * di + 2 * c.numGroups * N + c.numHeads;
  const convChannels = m1 ? di : di + 2 * c.numGroups * N;
  for (let i = 0; i < c.numLayers; i++) {
    const p = `layers.${i}.`;
    out.set(p + "norm", [d]);
    if (c.moe && isMoeLayer(c, i)) {
      const E = c.moe.numExperts, Hm = c.moe.hiddenSize;
      out.set(p + "router", [E, d]);
      if (c.moe.bias) out.set(p + "router_bias", [E]);
      out.set(p + "fc1", [E, 2 * Hm, d]);
      if (c.moe.bias) out.set(p + "fc1_bias", [E, 2 * Hm]);
      out.set(p + "fc2", [E, d, Hm]);
      if (c.moe.bias) out.set(p + "fc2_bias", [E, d]);
      continue;
    }
    out.set(p + "in_proj", [inRows, d]);
    if (c.useBias) {
      out.set(p + "in_proj_bias", [inRows]);
      out.set(p + "out_proj_bias", [d]);
    }
    out.set(p + "conv", [convChannels, K]);
    if (c.useConvBias) out.set(p + "conv_bias", [convChannels]);
    if (m1) {
      out.set(p + "x_proj", [c.timeStepRank + 2 * N, di]);
      out.set(p + "dt_proj", [di, c.timeStepRank]);
      out.set(p + "dt_bias", [di]);
      out.set(p + "A", [di, N]);
      out.set(p + "D", [di]);
    } else {
      out.set(p + "dt_bias", [c.numHeads]);
      out.set(p + "A", [c.numHeads]);
      out.set(p + "D", [c.numHeads]);
      out.set(p + "ssm_norm", [di]);
    }
    out.set(p + "out_proj", [d, di]);
  }
  return out;
}

/** True for the weights that may be stored in a compressed dtype. */
export function isMatrixWeight(name: string): boolean {
  return name === "embeddings" || name === "lm_head" || MATRIX_WEIGHTS.some((m) => name.endsWith(`.${m}`));
}

export interface WeightSpec {
  dtype: DType;
  shape: number[];
}
