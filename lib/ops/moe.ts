// Mixture of experts: routing (scores, top-k, counts), the experts' GLU MLPs and the weighted combine.
import { DType, dtypeCode, Q8_BLOCK } from "../dtype";
import { native } from "../native";
import { Tensor } from "../tensor";
import { bufferOf, ShapeChecker } from "./check";
import { matmul } from "./linear";

export type MoeScoring = "softmax" | "sigmoid";
export type Activation = "silu" | "gelu" | "gelu_tanh";

const SCORINGS: readonly MoeScoring[] = ["softmax", "sigmoid"];
const ACTIVATIONS: readonly Activation[] = ["silu", "gelu", "gelu_tanh"];
const WEIGHT_DTYPES: readonly DType[] = ["f32", "f16", "bf16", "q8_0"];

export interface MoeRouteOptions {
  topK: number;
  /** How router logits become scores. Default "softmax". */
  scoring?: MoeScoring;
  /** Rescale the chosen k weights to sum to 1. Default false. */
  renormalize?: boolean;
}

export interface MoeRouting {
  /** [tokens, topK] f32 */
  weights: Tensor;
  /** [tokens, topK] i32: expert of each slot, best first */
  indices: Tensor;
  /** [experts] i32: tokens routed to each expert */
  counts: Tensor;
}

/** logits [tokens, experts] → scores → the top-k experts of each token (ties: lower index first). */
export function moeRoute(logits: Tensor, options: MoeRouteOptions): MoeRouting {
  const c = new ShapeChecker("moeRoute");
  c.required("logits", logits, ["tokens", "experts"]);
  const [tokens, experts] = logits.shape;
  const topK = c.positiveInteger("topK", options?.topK);
  if (topK > experts) c.fail(`topK ${topK} exceeds the ${experts} experts`);
  const scoring = c.oneOf("scoring", options.scoring, SCORINGS, "softmax");
  const weights = Tensor.zeros([tokens, topK]);
  const indices = Tensor.zeros([tokens, topK], "i32");
  const counts = Tensor.zeros([experts], "i32");
  native().moeRoute({
    logits: logits.buffer(),
    tokens,
    experts,
    topK,
    scoring: SCORINGS.indexOf(scoring),
    renormalize: c.flag("renormalize", options.renormalize, false),
    weights: weights.buffer(),
    indices: indices.buffer(),
    counts: counts.buffer(),
  });
  return { weights, indices, counts };
}

export interface MoeExpertWeights {
  /** [experts, 2·hidden, dim]: the GLU's two halves, a then b */
  fc1: Tensor;
  /** [experts, 2·hidden] */
  fc1Bias?: Tensor | null;
  /** [experts, dim, hidden] */
  fc2: Tensor;
  /** [experts, dim] */
  fc2Bias?: Tensor | null;
  /** Default "silu". */
  activation?: Activation;
}

/** Each token's chosen experts: fc2(act(a)·b) with a, b = split(fc1(x)), combined with the routing weights. */
export function moeExperts(
  x: Tensor,
  experts: MoeExpertWeights,
  routing: Pick<MoeRouting, "weights" | "indices">,
): Tensor {
  const c = new ShapeChecker("moeExperts");
  c.required("x", x, ["tokens", "dim"]);
  c.required("fc1", experts.fc1, ["experts", "hidden2", "dim"], WEIGHT_DTYPES);
  c.required("fc2", experts.fc2, ["experts", "dim", "hidden"], WEIGHT_DTYPES);
  const hidden = c.size("hidden");
  if (c.size("hidden2") !== 2 * hidden) {
    c.fail(`fc1 must have 2·hidden = ${2 * hidden} rows per expert (fc2 has hidden = ${hidden}), got ${c.size("hidden2")}`);
  }
  c.optional("fc1Bias", experts.fc1Bias, ["experts", "hidden2"]);
  c.optional("fc2Bias", experts.fc2Bias, ["experts", "dim"]);
  c.required("indices", routing.indices, ["tokens", "topK"], ["i32"]);
  c.required("weights", routing.weights, ["tokens", "topK"]);
  const [tokens, dim] = x.shape;
  if (experts.fc1.dtype === "q8_0" && dim % Q8_BLOCK !== 0) c.fail(`q8_0 fc1 needs dim % ${Q8_BLOCK} == 0`);
  if (experts.fc2.dtype === "q8_0" && hidden % Q8_BLOCK !== 0) c.fail(`q8_0 fc2 needs hidden % ${Q8_BLOCK} == 0`);
  const activation = c.oneOf("activation", experts.activation, ACTIVATIONS, "silu");
  const out = Tensor.zeros([tokens, dim]);
  native().moeExperts({
    tokens,
    dim,
    hidden,
    experts: c.size("experts"),
    topK: c.size("topK"),
    x: x.buffer(),
    fc1: experts.fc1.buffer(),
    fc1Dtype: dtypeCode(experts.fc1.dtype),
    fc1Bias: bufferOf(experts.fc1Bias ?? null),
    fc2: experts.fc2.buffer(),
    fc2Dtype: dtypeCode(experts.fc2.dtype),
    fc2Bias: bufferOf(experts.fc2Bias ?? null),
    activation: ACTIVATIONS.indexOf(activation),
    indices: routing.indices.buffer(),
    weights: routing.weights.buffer(),
    out: out.buffer(),
  });
  return out;
}

export interface MoeOptions extends MoeExpertWeights, MoeRouteOptions {
  /** [experts, dim]: the router's linear layer */
  router: Tensor;
  routerBias?: Tensor | null;
}

/** A whole MoE-MLP: router logits, routing, experts, combine. x [tokens, dim] → out [tokens, dim]. */
export function moe(x: Tensor, options: MoeOptions): { out: Tensor; counts: Tensor } {
  const logits = matmul(x, options.router, options.routerBias);
  try {
    const routing = moeRoute(logits, options);
    try {
      return { out: moeExperts(x, options, routing), counts: routing.counts };
    } finally {
      routing.weights.dispose();
      routing.indices.dispose();
    }
  } finally {
    logits.dispose();
  }
}
