// Tensors backed by native memory. The bytes live in a 64-byte aligned native block that an
// ArrayBuffer wraps without copying; `data` is a typed-array view of it (f32, i32). dispose() frees
// the block at once and empties every view; the garbage collector frees it otherwise. Tensors made
// by reshape() share their parent's block, so disposing one disposes both.
import { assertDType, byteSize, DType, dtypeCode, Q8_BLOCK } from "./dtype";
import { native } from "./native";

export type Shape = readonly number[];

function checkShape(shape: Shape, what: string): number[] {
  if (!Array.isArray(shape)) throw new Error(`${what}: shape must be an array of sizes, got ${String(shape)}`);
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new Error(`${what}: shape [${shape.join(", ")}] has an invalid size ${d}; sizes are integers >= 0`);
    }
  }
  return [...shape];
}

export function shapeSize(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function formatShape(shape: readonly (number | string)[]): string {
  return `[${shape.join(", ")}]`;
}

type NumericArray = Float32Array | Float64Array | Int32Array | number[];

export class Tensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** Number of elements. */
  readonly size: number;
  readonly byteLength: number;
  #buffer: ArrayBuffer;

  private constructor(buffer: ArrayBuffer, dtype: DType, shape: number[]) {
    this.#buffer = buffer;
    this.dtype = dtype;
    this.shape = Object.freeze(shape);
    this.size = shapeSize(shape);
    this.byteLength = byteSize(dtype, this.size);
  }

  /** A zero-filled tensor. */
  static zeros(shape: Shape, dtype: DType = "f32"): Tensor {
    assertDType(dtype, "Tensor.zeros");
    const s = checkShape(shape, "Tensor.zeros");
    const bytes = byteSize(dtype, shapeSize(s));
    return new Tensor(native().alloc(bytes), dtype, s);
  }

  /**
   * A tensor from numbers. Float32Array, Float64Array and number[] give f32 (or, with `dtype`, f16,
   * bf16 or q8_0 converted by the native kernels); Int32Array gives i32. `shape` defaults to 1-D.
   */
  static from(values: NumericArray, shape?: Shape, dtype?: DType): Tensor {
    const count = values.length;
    const s = checkShape(shape ?? [count], "Tensor.from");
    if (shapeSize(s) !== count) {
      throw new Error(`Tensor.from: ${count} values do not fill shape ${formatShape(s)} (${shapeSize(s)} elements)`);
    }
    const target = dtype ?? (values instanceof Int32Array ? "i32" : "f32");
    assertDType(target, "Tensor.from");
    if (target === "i32") {
      const t = Tensor.zeros(s, "i32");
      const view = t.data as Int32Array;
      for (let i = 0; i < count; i++) {
        const v = values[i];
        if (!Number.isInteger(v) || v < -2147483648 || v > 2147483647) {
          t.dispose();
          throw new Error(`Tensor.from: value ${v} at ${i} is not a 32-bit integer`);
        }
        view[i] = v;
      }
      return t;
    }
    const f32 = Tensor.zeros(s, "f32");
    (f32.data as Float32Array).set(values as ArrayLike<number>);
    if (target === "f32") return f32;
    try {
      return f32.to(target);
    } finally {
      f32.dispose();
    }
  }

  /** A tensor from the raw little-endian bytes of a dtype (e.g. read from a checkpoint). Copies. */
  static fromBytes(bytes: ArrayBufferView | ArrayBuffer, dtype: DType, shape: Shape): Tensor {
    assertDType(dtype, "Tensor.fromBytes");
    const s = checkShape(shape, "Tensor.fromBytes");
    const count = shapeSize(s);
    if (dtype === "q8_0" && s.length > 0 && s[s.length - 1] % Q8_BLOCK !== 0) {
      throw new Error(`Tensor.fromBytes: q8_0 rows must hold whole blocks of ${Q8_BLOCK}; last dimension is ${s[s.length - 1]}`);
    }
    const need = byteSize(dtype, count);
    const src =
      bytes instanceof ArrayBuffer
        ? new Uint8Array(bytes)
        : new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (src.byteLength !== need) {
      throw new Error(
        `Tensor.fromBytes: ${dtype} ${formatShape(s)} needs ${need} bytes, got ${src.byteLength}`,
      );
    }
    const t = Tensor.zeros(s, dtype);
    new Uint8Array(t.#buffer, 0, need).set(src);
    return t;
  }

  /**
   * A tensor over an existing ArrayBuffer (e.g. a window on a memory-mapped file), without copying.
   * The tensor takes the buffer over: dispose() detaches it.
   */
  static fromArrayBuffer(buffer: ArrayBuffer, dtype: DType, shape: Shape): Tensor {
    assertDType(dtype, "Tensor.fromArrayBuffer");
    const s = checkShape(shape, "Tensor.fromArrayBuffer");
    if (!(buffer instanceof ArrayBuffer)) throw new Error("Tensor.fromArrayBuffer: buffer must be an ArrayBuffer");
    if (native().isDetached(buffer)) throw new Error("Tensor.fromArrayBuffer: buffer has been disposed");
    if (dtype === "q8_0" && s.length > 0 && s[s.length - 1] % Q8_BLOCK !== 0) {
      throw new Error(`Tensor.fromArrayBuffer: q8_0 rows must hold whole blocks of ${Q8_BLOCK}; last dimension is ${s[s.length - 1]}`);
    }
    const need = byteSize(dtype, shapeSize(s));
    if (buffer.byteLength < need) {
      throw new Error(`Tensor.fromArrayBuffer: ${dtype} ${formatShape(s)} needs ${need} bytes, the buffer holds ${buffer.byteLength}`);
    }
    return new Tensor(buffer, dtype, s);
  }

  get disposed(): boolean {
    return native().isDetached(this.#buffer);
  }

  /** Frees the native memory now. Views from `data` become empty; further use of the tensor throws. */
  dispose(): void {
    native().free(this.#buffer);
  }

  /** The backing ArrayBuffer, for the ops layer. Throws once disposed. @internal */
  buffer(what = "tensor"): ArrayBuffer {
    if (native().isDetached(this.#buffer)) throw new Error(`${what} has been disposed`);
    return this.#buffer;
  }

  /** Zero-copy view of the elements: Float32Array for f32, Int32Array for i32. */
  get data(): Float32Array | Int32Array {
    const buf = this.buffer();
    if (this.dtype === "f32") return new Float32Array(buf, 0, this.size);
    if (this.dtype === "i32") return new Int32Array(buf, 0, this.size);
    throw new Error(`Tensor.data: no typed-array view of ${this.dtype}; use toArray() or to("f32")`);
  }

  /** Zero-copy view of the raw bytes. */
  bytes(): Uint8Array {
    return new Uint8Array(this.buffer(), 0, this.byteLength);
  }

  /** A copy of the elements as numbers: Int32Array for i32, Float32Array (dequantised) otherwise. */
  toArray(): Float32Array | Int32Array {
    if (this.dtype === "i32") return (this.data as Int32Array).slice();
    if (this.dtype === "f32") return (this.data as Float32Array).slice();
    const f = this.to("f32");
    try {
      return (f.data as Float32Array).slice();
    } finally {
      f.dispose();
    }
  }

  /** A copy converted to another dtype (f32 <-> f16, bf16, q8_0; i32 only to i32). */
  to(dtype: DType): Tensor {
    assertDType(dtype, "Tensor.to");
    if ((dtype === "i32") !== (this.dtype === "i32")) {
      throw new Error(`Tensor.to: cannot convert ${this.dtype} to ${dtype}; i32 converts only to i32`);
    }
    if (dtype === "q8_0" && (this.shape.length === 0 || this.shape[this.shape.length - 1] % Q8_BLOCK !== 0)) {
      throw new Error(
        `Tensor.to: q8_0 needs the last dimension to be a multiple of ${Q8_BLOCK}; shape is ${formatShape(this.shape)}`,
      );
    }
    if (dtype === this.dtype) return this.clone();
    if (this.dtype !== "f32" && dtype !== "f32") {
      const f = this.to("f32");
      try {
        return f.to(dtype);
      } finally {
        f.dispose();
      }
    }
    const out = Tensor.zeros(this.shape, dtype);
    native().convert({
      src: this.buffer(),
      srcDtype: dtypeCode(this.dtype),
      dst: out.buffer(),
      dstDtype: dtypeCode(dtype),
      n: this.size,
    });
    return out;
  }

  clone(): Tensor {
    const t = Tensor.zeros(this.shape, this.dtype);
    new Uint8Array(t.#buffer, 0, this.byteLength).set(this.bytes());
    return t;
  }

  /** The same elements seen with another shape (one size may be -1). Shares memory with this tensor. */
  reshape(shape: Shape): Tensor {
    const s = [...shape];
    const unknown = s.indexOf(-1);
    if (unknown >= 0) {
      const known = shapeSize(s.filter((_, i) => i !== unknown));
      if (known === 0 || this.size % known !== 0) {
        throw new Error(`Tensor.reshape: cannot infer -1 in ${formatShape(shape)} for ${this.size} elements`);
      }
      s[unknown] = this.size / known;
    }
    checkShape(s, "Tensor.reshape");
    if (shapeSize(s) !== this.size) {
      throw new Error(
        `Tensor.reshape: ${formatShape(this.shape)} (${this.size} elements) cannot become ${formatShape(shape)}`,
      );
    }
    if (this.dtype === "q8_0" && s[s.length - 1] % Q8_BLOCK !== 0) {
      throw new Error(`Tensor.reshape: q8_0 rows must hold whole blocks of ${Q8_BLOCK}`);
    }
    return new Tensor(this.buffer(), this.dtype, s);
  }

  toString(): string {
    return `Tensor(${this.dtype}, ${formatShape(this.shape)}${this.disposed ? ", disposed" : ""})`;
  }
}
