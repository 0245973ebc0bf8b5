// Matrix products with weights in any stored dtype, and splitting the last dimension.
import { DType, dtypeCode, Q8_BLOCK } from "../dtype";
import { native } from "../native";
import { formatShape, Tensor } from "../tensor";
import { bufferOf, ShapeChecker } from "./check";

const WEIGHT_DTYPES: readonly DType[] = ["f32", "f16", "bf16", "q8_0"];

/**
 * y = x·Wᵀ (+ bias), PyTorch Linear layout: x [..., K] (f32), weight [N, K] in f32, f16, bf16 or q8_0,
 * bias [N]. Returns [..., N] f32. All leading dimensions of x form one batch of rows (one token: a
 * matrix-vector product, the decode path).
 */
export function matmul(x: Tensor, weight: Tensor, bias?: Tensor | null): Tensor {
  const c = new ShapeChecker("matmul");
  c.tensor("x", x);
  if (x.shape.length < 1) c.fail(`x must have at least 1 dimension, got ${formatShape(x.shape)}`);
  c.required("weight", weight, ["N", "K"], WEIGHT_DTYPES);
  const K = c.size("K");
  const N = c.size("N");
  c.shape("x", x, [...x.shape.slice(0, -1), "K"]);
  c.optional("bias", bias, ["N"]);
  if (weight.dtype === "q8_0" && K % Q8_BLOCK !== 0) c.fail(`q8_0 weight needs K % ${Q8_BLOCK} == 0, got K = ${K}`);
  if (K === 0 || N === 0) c.fail(`weight ${formatShape(weight.shape)} has no elements`);
  const M = x.size / K;
  const y = Tensor.zeros([...x.shape.slice(0, -1), N]);
  if (M > 0) {
    native().matmul({
      x: x.buffer(),
      w: weight.buffer(),
      wDtype: dtypeCode(weight.dtype),
      bias: bufferOf(bias ?? null),
      y: y.buffer(),
      M,
      N,
      K,
    });
  }
  return y;
}

/** Splits the last dimension of an f32 tensor into parts of the given sizes (copies). */
export function split(x: Tensor, sizes: readonly number[]): Tensor[] {
  const c = new ShapeChecker("split");
  c.tensor("x", x);
  const last = x.shape[x.shape.length - 1];
  const total = sizes.reduce((a, b) => a + b, 0);
  if (sizes.some((s) => !Number.isInteger(s) || s < 0) || total !== last) {
    c.fail(`sizes [${sizes.join(", ")}] must be non-negative integers summing to the last dimension ${last}`);
  }
  const rows = x.size / last;
  const src = x.data as Float32Array;
  let offset = 0;
  return sizes.map((s) => {
    const part = Tensor.zeros([...x.shape.slice(0, -1), s]);
    const dst = part.data as Float32Array;
    for (let r = 0; r < rows; r++) dst.set(src.subarray(r * last + offset, r * last + offset + s), r * s);
    offset += s;
    return part;
  });
}
