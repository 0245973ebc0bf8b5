// RMS normalisation (plain, with the residual add fused, grouped and gated) and the embedding lookup.
import { DType, dtypeCode, Q8_BLOCK } from "../dtype";
import { native } from "../native";
import { Tensor } from "../tensor";
import { bufferOf, ShapeChecker } from "./check";

function rowsOf(c: ShapeChecker, name: string, x: Tensor): { rows: number; dim: number } {
  if (x.shape.length < 1) c.fail(`${name} must have at least 1 dimension`);
  const dim = x.shape[x.shape.length - 1];
  if (dim === 0) c.fail(`${name} has an empty last dimension`);
  return { rows: x.size / dim, dim };
}

/** out = x / rms(x) · weight over the last dimension. x [..., D], weight [D]. */
export function rmsnorm(x: Tensor, weight: Tensor, eps = 1e-5): Tensor {
  const c = new ShapeChecker("rmsnorm");
  c.tensor("x", x);
  const { rows, dim } = rowsOf(c, "x", x);
  c.required("weight", weight, [dim]);
  eps = c.finiteNumber("eps", eps, 1e-5);
  const out = Tensor.zeros(x.shape);
  native().rmsnorm({ x: x.buffer(), residual: null, weight: weight.buffer(), out: out.buffer(), residualOut: null, rows, dim, eps });
  return out;
}

/**
 * The pre-norm residual step of a Mamba layer: residual' = x + residual, out = rmsnorm(residual').
 * Returns both (residual' is the new residual stream).
 */
export function addRmsnorm(
  x: Tensor,
  residual: Tensor,
  weight: Tensor,
  eps = 1e-5,
): { out: Tensor; residual: Tensor } {
  const c = new ShapeChecker("addRmsnorm");
  c.tensor("x", x);
  const { rows, dim } = rowsOf(c, "x", x);
  c.required("residual", residual, x.shape);
  c.required("weight", weight, [dim]);
  eps = c.finiteNumber("eps", eps, 1e-5);
  const out = Tensor.zeros(x.shape);
  const sum = Tensor.zeros(x.shape);
  native().rmsnorm({
    x: x.buffer(),
    residual: residual.buffer(),
    weight: weight.buffer(),
    out: out.buffer(),
    residualOut: sum.buffer(),
    rows,
    dim,
    eps,
  });
  return { out, residual: sum };
}

export interface GatedRmsnormOptions {
  /** The gate; null or absent: no gating. Same shape as x. */
  z?: Tensor | null;
  /** Size of each normalised group within the last dimension (Mamba-2: d_inner / n_groups). Default: all of it. */
  groupSize?: number;
  eps?: number;
  /** false (Mamba-2's default): rmsnorm(x·silu(z))·w; true: rmsnorm(x)·w·silu(z). */
  normBeforeGate?: boolean;
}

/** Mamba-2's gated RMSNorm over groups of the last dimension. x [..., D], weight [D]. */
export function gatedRmsnorm(x: Tensor, weight: Tensor, options: GatedRmsnormOptions = {}): Tensor {
  const c = new ShapeChecker("gatedRmsnorm");
  c.tensor("x", x);
  const { rows, dim } = rowsOf(c, "x", x);
  c.required("weight", weight, [dim]);
  const z = c.optional("z", options.z, x.shape);
  const groupSize = c.positiveInteger("groupSize", options.groupSize, dim);
  if (dim % groupSize !== 0) c.fail(`groupSize ${groupSize} must divide the last dimension ${dim}`);
  const out = Tensor.zeros(x.shape);
  native().gatedRmsnorm({
    x: x.buffer(),
    z: bufferOf(z),
    weight: weight.buffer(),
    out: out.buffer(),
    rows,
    dim,
    groupSize,
    eps: c.finiteNumber("eps", options.eps, 1e-5),
    normBeforeGate: c.flag("normBeforeGate", options.normBeforeGate, false),
  });
  return out;
}

const TABLE_DTYPES: readonly DType[] = ["f32", "f16", "bf16", "q8_0"];

/** Rows of table [vocab, D] (any weight dtype) for token ids; returns [...ids.shape, D] f32. */
export function embedding(table: Tensor, ids: Tensor | Int32Array | readonly number[]): Tensor {
  const c = new ShapeChecker("embedding");
  c.required("table", table, ["vocab", "dim"], TABLE_DTYPES);
  const vocab = c.size("vocab");
  const dim = c.size("dim");
  if (table.dtype === "q8_0" && dim % Q8_BLOCK !== 0) c.fail(`q8_0 table needs dim % ${Q8_BLOCK} == 0`);
  const owned = !(ids instanceof Tensor);
  if (owned && !(ids instanceof Int32Array) && !Array.isArray(ids)) {
    c.fail("ids must be a Tensor (i32), an Int32Array or an array of numbers");
  }
  const idTensor =
    ids instanceof Tensor ? c.tensor("ids", ids, ["i32"]) : Tensor.from(Int32Array.from(ids as ArrayLike<number>));
  try {
    const out = Tensor.zeros([...idTensor.shape, dim]);
    try {
      native().embedding({
        table: table.buffer(),
        dtype: dtypeCode(table.dtype),
        vocab,
        dim,
        ids: idTensor.buffer(),
        count: idTensor.size,
        out: out.buffer(),
      });
    } catch (e) {
      out.dispose();
      throw e;
    }
    return out;
  } finally {
    if (owned) idTensor.dispose();
  }
}
