// Argument checks shared by the ops: each failure names the op, the argument, what was expected and
// what was given.
import { DType } from "../dtype";
import { formatShape, Tensor } from "../tensor";

/** A size in an expected shape: a number must match; a string names a size bound on first sight. */
export type Dim = number | string;

export class ShapeChecker {
  private sizes = new Map<string, { value: number; from: string }>();

  constructor(private readonly op: string) {}

  fail(message: string): never {
    throw new Error(`${this.op}: ${message}`);
  }

  tensor(name: string, value: unknown, dtypes: readonly DType[] = ["f32"]): Tensor {
    if (!(value instanceof Tensor)) this.fail(`${name} must be a Tensor, got ${describe(value)}`);
    if (value.disposed) this.fail(`${name} has been disposed`);
    if (!dtypes.includes(value.dtype)) {
      this.fail(`${name} must have dtype ${dtypes.join(" or ")}, got ${value.dtype}`);
    }
    return value;
  }

  /** Checks a tensor's shape against dims; named dims must agree across all arguments. */
  shape(name: string, t: Tensor, dims: readonly Dim[]): void {
    const expected = () =>
      formatShape(dims.map((d) => (typeof d === "number" ? d : this.sizes.get(d)?.value ?? d)));
    if (t.shape.length !== dims.length) {
      this.fail(`${name} must have shape ${expected()}, got ${formatShape(t.shape)}`);
    }
    dims.forEach((d, i) => {
      const actual = t.shape[i];
      if (typeof d === "number") {
        if (actual !== d) this.fail(`${name} must have shape ${expected()}, got ${formatShape(t.shape)}`);
        return;
      }
      const bound = this.sizes.get(d);
      if (!bound) {
        this.sizes.set(d, { value: actual, from: name });
      } else if (bound.value !== actual) {
        this.fail(
          `${name} must have shape ${expected()}, got ${formatShape(t.shape)} (${d} = ${bound.value} from ${bound.from})`,
        );
      }
    });
  }

  optional(name: string, value: unknown, dims: readonly Dim[], dtypes: readonly DType[] = ["f32"]): Tensor | null {
    if (value === undefined || value === null) return null;
    const t = this.tensor(name, value, dtypes);
    this.shape(name, t, dims);
    return t;
  }

  required(name: string, value: unknown, dims: readonly Dim[], dtypes: readonly DType[] = ["f32"]): Tensor {
    if (value === undefined || value === null) this.fail(`${name} is required`);
    const t = this.tensor(name, value, dtypes);
    this.shape(name, t, dims);
    return t;
  }

  size(dim: string): number {
    const s = this.sizes.get(dim);
    if (!s) this.fail(`internal: size ${dim} was never bound`);
    return s.value;
  }

  bind(dim: string, value: number, from: string): void {
    this.sizes.set(dim, { value, from });
  }

  positiveInteger(name: string, value: unknown, fallback?: number): number {
    if (value === undefined && fallback !== undefined) return fallback;
    if (typeof value !== "number" || !Number.isInteger(value) || value < 1) {
      this.fail(`${name} must be a positive integer, got ${describe(value)}`);
    }
    return value;
  }

  finiteNumber(name: string, value: unknown, fallback: number): number {
    if (value === undefined) return fallback;
    if (typeof value !== "number" || Number.isNaN(value)) this.fail(`${name} must be a number, got ${describe(value)}`);
    return value;
  }

  flag(name: string, value: unknown, fallback: boolean): boolean {
    if (value === undefined) return fallback;
    if (typeof value !== "boolean") this.fail(`${name} must be a boolean, got ${describe(value)}`);
    return value;
  }

  oneOf<T extends string>(name: string, value: unknown, choices: readonly T[], fallback: T): T {
    if (value === undefined) return fallback;
    if (typeof value !== "string" || !(choices as readonly string[]).includes(value)) {
      this.fail(`${name} must be one of ${choices.map((c) => JSON.stringify(c)).join(", ")}, got ${describe(value)}`);
    }
    return value as T;
  }
}

export function describe(value: unknown): string {
  if (value instanceof Tensor) return value.toString();
  if (value === null) return "null";
  if (Array.isArray(value)) return `an array of ${value.length}`;
  if (typeof value === "object") return value.constructor?.name ?? "an object";
  return typeof value === "string" ? JSON.stringify(value) : String(value);
}

/** The buffer of an optional tensor, or null. */
export function bufferOf(t: Tensor | null): ArrayBuffer | null {
  return t ? t.buffer() : null;
}
