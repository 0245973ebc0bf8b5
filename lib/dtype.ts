// Element types, their native codes (native/core/dtype.h) and storage sizes.

export type DType = "f32" | "f16" | "bf16" | "i32" | "q8_0";

export const DTYPES: readonly DType[] = ["f32", "f16", "bf16", "i32", "q8_0"];

/** q8_0 stores blocks of 32 values: an fp16 scale and 32 int8 (34 bytes). */
export const Q8_BLOCK = 32;
const Q8_BLOCK_BYTES = 34;

const CODES: Record<DType, number> = { f32: 0, f16: 1, bf16: 2, i32: 3, q8_0: 4 };

export function dtypeCode(dtype: DType): number {
  return CODES[dtype];
}

export function isDType(value: unknown): value is DType {
  return typeof value === "string" && (DTYPES as readonly string[]).includes(value);
}

export function assertDType(value: unknown, what: string): DType {
  if (!isDType(value)) {
    throw new Error(`${what}: unknown dtype ${JSON.stringify(value)}; expected one of ${DTYPES.join(", ")}`);
  }
  return value;
}

/** Bytes taken by `count` elements; q8_0 needs whole blocks. */
export function byteSize(dtype: DType, count: number): number {
  switch (dtype) {
    case "f32":
    case "i32":
      return count * 4;
    case "f16":
    case "bf16":
      return count * 2;
    case "q8_0":
      if (count % Q8_BLOCK !== 0) {
        throw new Error(`q8_0 holds whole blocks of ${Q8_BLOCK} values; ${count} elements is not a multiple of ${Q8_BLOCK}`);
      }
      return (count / Q8_BLOCK) * Q8_BLOCK_BYTES;
  }
}
