// Mamba-2's state-space duality: the chunked sequence form and the one-token update.
import { native } from "../native";
import { Tensor } from "../tensor";
import { bufferOf, ShapeChecker } from "./check";

export interface SsdInputs {
  /** [batch, length, heads, headDim] */
  x: Tensor;
  /** [batch, length, heads]: Δ before bias and softplus */
  dt: Tensor;
  /** [heads]: negative (A = -exp(A_log)) */
  A: Tensor;
  /** [batch, length, groups, state] */
  B: Tensor;
  /** [batch, length, groups, state] */
  C: Tensor;
  /** [heads] */
  D?: Tensor | null;
  /** [batch, length, heads, headDim]: y ·= silu(z) */
  z?: Tensor | null;
  /** [heads] */
  dtBias?: Tensor | null;
  /** dt = softplus(dt + dtBias). Default false. */
  dtSoftplus?: boolean;
  /** dt clamped to [min, max] after the softplus (Mamba-2's time_step_limit). Default [0, Infinity]. */
  dtLimit?: readonly [number, number];
  /** Tokens per chunk of the chunked algorithm. Default 256. */
  chunkSize?: number;
  /**
   * Round the chunk products' operands to bf16 and accumulate in f32 (VDPBF16PS: twice the f32 rate), as
   * the model runner does for bf16 weights; the state stays f32. Only where the CPU level is avx512bf16;
   * ignored elsewhere. Default false.
   */
  bf16Products?: boolean;
  /** [batch, heads, headDim, state]: the state before x (absent: zeros) */
  state?: Tensor | null;
}

export interface SsdStepInputs extends Omit<SsdInputs, "state" | "chunkSize" | "bf16Products"> {
  /** [batch, heads, headDim, state], updated in place */
  state: Tensor;
}

/** The inputs both forms pass to the kernel (already validated). */
function ssdBuffers(c: ShapeChecker, inputs: Omit<SsdInputs, "state" | "chunkSize" | "bf16Products">) {
  return {
    x: inputs.x.buffer(),
    dt: inputs.dt.buffer(),
    A: inputs.A.buffer(),
    B: inputs.B.buffer(),
    C: inputs.C.buffer(),
    D: bufferOf(inputs.D ?? null),
    z: bufferOf(inputs.z ?? null),
    dtBias: bufferOf(inputs.dtBias ?? null),
    dtSoftplus: c.flag("dtSoftplus", inputs.dtSoftplus, false),
  };
}

function limits(c: ShapeChecker, limit: readonly [number, number] | undefined): [number, number] {
  if (limit === undefined) return [0, Infinity];
  if (!Array.isArray(limit) || limit.length !== 2 || !(limit[0] <= limit[1])) {
    c.fail(`dtLimit must be [min, max] with min <= max, got ${JSON.stringify(limit)}`);
  }
  return [limit[0], limit[1]];
}

/**
 * s_t[h] = exp(dt_t[h]·A[h])·s_{t-1}[h] + dt_t[h]·x_t[h] ⊗ B_t[g(h)];  y_t[h] = s_t[h]·C_t[g(h)] + D[h]·x_t[h],
 * computed chunk by chunk as matmuls. Returns y [batch, length, heads, headDim] and the final state.
 */
export function ssdChunked(inputs: SsdInputs): { y: Tensor; state: Tensor } {
  const c = new ShapeChecker("ssdChunked");
  c.required("x", inputs.x, ["batch", "length", "heads", "headDim"]);
  c.required("dt", inputs.dt, ["batch", "length", "heads"]);
  c.required("A", inputs.A, ["heads"]);
  c.required("B", inputs.B, ["batch", "length", "groups", "state"]);
  c.required("C", inputs.C, ["batch", "length", "groups", "state"]);
  const [batch, length, heads, headDim] = inputs.x.shape;
  const groups = c.size("groups");
  const state = c.size("state");
  if ([batch, length, heads, headDim, groups, state].some((s) => s === 0)) c.fail("sizes must be >= 1");
  if (heads % groups !== 0) c.fail(`heads ${heads} must be a multiple of groups ${groups}`);
  c.optional("D", inputs.D, ["heads"]);
  c.optional("z", inputs.z, ["batch", "length", "heads", "headDim"]);
  c.optional("dtBias", inputs.dtBias, ["heads"]);
  const stateIn = c.optional("state", inputs.state, ["batch", "heads", "headDim", "state"]);
  const chunkSize = c.positiveInteger("chunkSize", inputs.chunkSize, 256);
  const [dtMin, dtMax] = limits(c, inputs.dtLimit);
  const y = Tensor.zeros(inputs.x.shape);
  const stateOut = Tensor.zeros([batch, heads, headDim, state]);
  native().ssdChunked({
    batch, length, heads, headDim, state, groups, chunkSize, dtMin, dtMax,
    ...ssdBuffers(c, inputs),
    bf16Products: c.flag("bf16Products", inputs.bf16Products, false),
    stateIn: bufferOf(stateIn),
    stateOut: stateOut.buffer(),
    y: y.buffer(),
  });
  return { y, state: stateOut };
}

/** One token: x, z [batch, heads, headDim]; dt [batch, heads]; B, C [batch, groups, state]. Returns y. */
export function ssdStep(inputs: SsdStepInputs): Tensor {
  const c = new ShapeChecker("ssdStep");
  c.required("x", inputs.x, ["batch", "heads", "headDim"]);
  c.required("dt", inputs.dt, ["batch", "heads"]);
  c.required("A", inputs.A, ["heads"]);
  c.required("B", inputs.B, ["batch", "groups", "state"]);
  c.required("C", inputs.C, ["batch", "groups", "state"]);
  const [batch, heads, headDim] = inputs.x.shape;
  const groups = c.size("groups");
  const state = c.size("state");
  if (heads % groups !== 0) c.fail(`heads ${heads} must be a multiple of groups ${groups}`);
  c.optional("D", inputs.D, ["heads"]);
  c.optional("z", inputs.z, ["batch", "heads", "headDim"]);
  c.optional("dtBias", inputs.dtBias, ["heads"]);
  const s = c.required("state", inputs.state, ["batch", "heads", "headDim", "state"]);
  const [dtMin, dtMax] = limits(c, inputs.dtLimit);
  const y = Tensor.zeros(inputs.x.shape);
  native().ssdStep({
    batch, heads, headDim, state, groups, dtMin, dtMax,
    ...ssdBuffers(c, inputs),
    stateIn: s.buffer(),
    stateOut: s.buffer(),
    y: y.buffer(),
  });
  return y;
}
