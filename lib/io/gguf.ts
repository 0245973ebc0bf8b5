// GGUF files, as llama.cpp (ggml) writes and reads them:
//   "GGUF", u32 version (2 or 3), u64 tensor count, u64 key/value count,
//   key/values: string key, u32 value type, value (strings: u64 length + UTF-8; arrays: u32 item
//   type, u64 count, items — arrays may nest),
//   tensor infos: string name, u32 dims, u64 sizes in ggml order (fastest-varying first, i.e. the
//   PyTorch shape reversed), u32 ggml type, u64 offset from the start of the data section,
//   padding to general.alignment (32 by default), then the data, each tensor padded to the alignment.
// Everything little-endian. The reader checks every count and length against the bytes left in the
// file before allocating anything, and maps the tensors without copying.
import * as fs from "fs";
import * as os from "os";
import { DType, byteSize } from "../dtype";
import { formatShape, shapeSize, Tensor } from "../tensor";
import { writeAll, writeFileAtomic } from "./atomic";
import { fileSize, mapTensors } from "./mmap";

export const GGUF_DEFAULT_ALIGNMENT = 32;

/** GGUF value types by name; the numbers are the file's codes. */
export const GGUF_VALUE_TYPES = {
  u8: 0, i8: 1, u16: 2, i16: 3, u32: 4, i32: 5, f32: 6, bool: 7, string: 8, array: 9, u64: 10, i64: 11, f64: 12,
} as const;
export type GgufValueType = keyof typeof GGUF_VALUE_TYPES;
const TYPE_NAMES = Object.keys(GGUF_VALUE_TYPES) as GgufValueType[];

/** An array value: the type of its items and the items (nested arrays are GgufArray again). */
export interface GgufArray {
  itemType: GgufValueType;
  items: GgufScalar[] | GgufArray[];
}
/** Integers of 64 bits are numbers when they are safe integers, bigint otherwise. */
export type GgufScalar = number | bigint | boolean | string;
export type GgufValue = GgufScalar | GgufArray;

export interface GgufEntry {
  type: GgufValueType;
  value: GgufValue;
}

/** Helpers to build typed key/values for writeGguf. */
export const gguf = {
  u8: (value: number): GgufEntry => ({ type: "u8", value }),
  i8: (value: number): GgufEntry => ({ type: "i8", value }),
  u16: (value: number): GgufEntry => ({ type: "u16", value }),
  i16: (value: number): GgufEntry => ({ type: "i16", value }),
  u32: (value: number): GgufEntry => ({ type: "u32", value }),
  i32: (value: number): GgufEntry => ({ type: "i32", value }),
  u64: (value: number | bigint): GgufEntry => ({ type: "u64", value }),
  i64: (value: number | bigint): GgufEntry => ({ type: "i64", value }),
  f32: (value: number): GgufEntry => ({ type: "f32", value }),
  f64: (value: number): GgufEntry => ({ type: "f64", value }),
  bool: (value: boolean): GgufEntry => ({ type: "bool", value }),
  string: (value: string): GgufEntry => ({ type: "string", value }),
  array: (itemType: GgufValueType, items: GgufScalar[] | GgufArray[]): GgufEntry => ({
    type: "array",
    value: { itemType, items },
  }),
};

/** ggml tensor types this library loads, and the names of the others for error messages. */
const GGML_TYPES: Record<number, DType> = { 0: "f32", 1: "f16", 8: "q8_0", 30: "bf16", 26: "i32" };
const GGML_CODES: Partial<Record<DType, number>> = { f32: 0, f16: 1, q8_0: 8, bf16: 30, i32: 26 };
const GGML_TYPE_NAMES: Record<number, string> = {
  0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
  12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
  20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
  29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
};

/** ggml_type name for a code, for messages. */
export function ggmlTypeName(code: number): string {
  return GGML_TYPE_NAMES[code] ?? `type ${code}`;
}

/** ggml's GGML_MAX_DIMS. */
const MAX_DIMS = 4;

export interface GgufTensorInfo {
  name: string;
  /** PyTorch order (ggml dims reversed). */
  shape: number[];
  /** The ggml type code. */
  ggmlType: number;
  /** Loadable dtype, undefined for ggml types this library does not load. */
  dtype?: DType;
  /** Absolute offset in the file, and the byte length (0 when the type is not loadable). */
  offset: number;
  byteLength: number;
}

export interface GgufHeader {
  path: string;
  version: number;
  metadata: Map<string, GgufEntry>;
  tensors: GgufTensorInfo[];
  alignment: number;
  dataOffset: number;
}

function fail(file: string, what: string): never {
  throw new Error(`GGUF ${file}: ${what}`);
}

/** Sequential reads from a file through a window buffer, with every read checked against the file size. */
class FileReader {
  position = 0;
  private window = Buffer.alloc(0);
  private windowStart = 0;

  constructor(
    private readonly fd: number,
    readonly size: number,
    private readonly file: string,
  ) {}

  remaining(): number {
    return this.size - this.position;
  }

  /** A view of the next n bytes (valid until the next call). */
  take(n: number, what: string): Buffer {
    if (n > this.remaining()) {
      fail(this.file, `truncated: ${what} needs ${n} bytes at offset ${this.position}, the file has ${this.remaining()} left (${this.size} in all)`);
    }
    const start = this.position - this.windowStart;
    if (start < 0 || start + n > this.window.length) {
      const length = Math.min(Math.max(n, 1 << 20), this.remaining());
      const buffer = Buffer.alloc(length);
      let read = 0;
      while (read < length) {
        const got = fs.readSync(this.fd, buffer, read, length - read, this.position + read);
        if (got === 0) fail(this.file, `file ended early while reading ${what} at offset ${this.position + read}`);
        read += got;
      }
      this.window = buffer;
      this.windowStart = this.position;
    }
    const at = this.position - this.windowStart;
    this.position += n;
    return this.window.subarray(at, at + n);
  }

  u32(what: string): number {
    return this.take(4, what).readUInt32LE(0);
  }

  /** A u64 that must be a safe integer (counts, sizes, offsets). */
  size64(what: string): number {
    const v = this.take(8, what).readBigUInt64LE(0);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail(this.file, `${what} is ${v}, far larger than any file`);
    return Number(v);
  }

  string(what: string): string {
    const length = this.size64(`the length of ${what}`);
    if (length > this.remaining()) {
      fail(this.file, `truncated or corrupt: ${what} claims ${length} bytes at offset ${this.position}, the file has ${this.remaining()} left`);
    }
    return this.take(length, what).toString("utf8");
  }
}

/** Smallest encoded size of one value of each type, to reject absurd array counts before allocating. */
function minimumBytes(type: GgufValueType): number {
  switch (type) {
    case "u8": case "i8": case "bool": return 1;
    case "u16": case "i16": return 2;
    case "u32": case "i32": case "f32": return 4;
    case "u64": case "i64": case "f64": case "string": return 8;
    case "array": return 12;
  }
}

function valueType(reader: FileReader, file: string, what: string): GgufValueType {
  const code = reader.u32(`the value type of ${what}`);
  const name = TYPE_NAMES[code];
  if (name === undefined || GGUF_VALUE_TYPES[name] !== code) fail(file, `${what} has unknown value type ${code}`);
  return name;
}

function int64(v: bigint): number | bigint {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

function readValue(reader: FileReader, file: string, type: GgufValueType, what: string, depth: number): GgufValue {
  switch (type) {
    case "u8": return reader.take(1, what).readUInt8(0);
    case "i8": return reader.take(1, what).readInt8(0);
    case "u16": return reader.take(2, what).readUInt16LE(0);
    case "i16": return reader.take(2, what).readInt16LE(0);
    case "u32": return reader.take(4, what).readUInt32LE(0);
    case "i32": return reader.take(4, what).readInt32LE(0);
    case "f32": return reader.take(4, what).readFloatLE(0);
    case "f64": return reader.take(8, what).readDoubleLE(0);
    case "u64": return int64(reader.take(8, what).readBigUInt64LE(0));
    case "i64": return int64(reader.take(8, what).readBigInt64LE(0));
    case "bool": {
      const b = reader.take(1, what).readUInt8(0);
      if (b > 1) fail(file, `${what}: bool must be 0 or 1, found ${b}`);
      return b === 1;
    }
    case "string": return reader.string(what);
    case "array": {
      if (depth > 16) fail(file, `${what}: arrays nested more than 16 deep`);
      const itemType = valueType(reader, file, `the items of ${what}`);
      const count = reader.size64(`the length of ${what}`);
      if (count * minimumBytes(itemType) > reader.remaining()) {
        fail(file, `truncated or corrupt: ${what} claims ${count} ${itemType} items, more than the ${reader.remaining()} bytes left could hold`);
      }
      const items: GgufValue[] = new Array(count);
      for (let i = 0; i < count; i++) items[i] = readValue(reader, file, itemType, `${what}[${i}]`, depth + 1);
      return { itemType, items } as GgufArray;
    }
  }
}

/** Reads and validates the header of a GGUF file: key/values, tensor infos, alignment, data offset. */
export function readGgufHeader(file: string): GgufHeader {
  if (os.endianness() !== "LE") fail(file, "reading GGUF needs a little-endian machine");
  const size = fileSize(file);
  const fd = fs.openSync(file, "r");
  try {
    const reader = new FileReader(fd, size, file);
    const magic = reader.take(4, "the magic").toString("latin1");
    if (magic !== "GGUF") fail(file, `not a GGUF file: magic is ${JSON.stringify(magic)}, expected "GGUF"`);
    const version = reader.u32("the version");
    if (version === 1) fail(file, "GGUF version 1 (32-bit counts) is not supported; convert it with a current llama.cpp");
    if (version !== 2 && version !== 3) {
      if ((version & 0xffff) === 0) fail(file, `version ${version} looks big-endian; only little-endian GGUF is supported`);
      fail(file, `unsupported GGUF version ${version}; expected 2 or 3`);
    }
    const tensorCount = reader.size64("the tensor count");
    const kvCount = reader.size64("the key/value count");
    // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info 8 + 4 + 4 + 8.
    if (kvCount * 13 > reader.remaining()) {
      fail(file, `truncated or corrupt: ${kvCount} key/values cannot fit in the ${reader.remaining()} bytes left`);
    }
    if (tensorCount * 24 > reader.remaining()) {
      fail(file, `truncated or corrupt: ${tensorCount} tensors cannot fit in the ${reader.remaining()} bytes left`);
    }
    const metadata = new Map<string, GgufEntry>();
    for (let i = 0; i < kvCount; i++) {
      const key = reader.string(`key ${i}`);
      if (metadata.has(key)) fail(file, `key "${key}" appears twice`);
      const type = valueType(reader, file, `key "${key}"`);
      metadata.set(key, { type, value: readValue(reader, file, type, `key "${key}"`, 0) });
    }
    let alignment = GGUF_DEFAULT_ALIGNMENT;
    const alignEntry = metadata.get("general.alignment");
    if (alignEntry) {
      const a = alignEntry.value;
      if (alignEntry.type !== "u32" || typeof a !== "number" || a === 0 || (a & (a - 1)) !== 0) {
        fail(file, `general.alignment must be a u32 power of two, found ${alignEntry.type} ${String(a)}`);
      }
      alignment = a;
    }
    const infos: Array<{ name: string; dims: number[]; ggmlType: number; relative: number }> = [];
    const names = new Set<string>();
    for (let i = 0; i < tensorCount; i++) {
      const name = reader.string(`the name of tensor ${i}`);
      if (names.has(name)) fail(file, `tensor "${name}" appears twice`);
      names.add(name);
      const nDims = reader.u32(`the dimension count of tensor "${name}"`);
      if (nDims > MAX_DIMS) fail(file, `tensor "${name}" has ${nDims} dimensions; ggml allows at most ${MAX_DIMS}`);
      const dims: number[] = [];
      for (let d = 0; d < nDims; d++) dims.push(reader.size64(`dimension ${d} of tensor "${name}"`));
      const ggmlType = reader.u32(`the type of tensor "${name}"`);
      const relative = reader.size64(`the offset of tensor "${name}"`);
      if (relative % alignment !== 0) {
        fail(file, `tensor "${name}": offset ${relative} is not a multiple of the alignment ${alignment}`);
      }
      infos.push({ name, dims, ggmlType, relative });
    }
    const dataOffset = Math.ceil(reader.position / alignment) * alignment;
    const dataSize = size - dataOffset;
    const tensors: GgufTensorInfo[] = infos.map((info) => {
      const shape = [...info.dims].reverse();
      const dtype = GGML_TYPES[info.ggmlType];
      let byteLength = 0;
      if (dtype) {
        const count = shapeSize(shape);
        if (!Number.isSafeInteger(count)) fail(file, `tensor "${info.name}": shape ${formatShape(shape)} is too large`);
        if (dtype === "q8_0" && (info.dims[0] ?? 1) % 32 !== 0) {
          fail(file, `tensor "${info.name}": Q8_0 rows must be a multiple of 32, shape is ${formatShape(shape)}`);
        }
        byteLength = byteSize(dtype, count);
        if (info.relative + byteLength > dataSize) {
          fail(file, `truncated: tensor "${info.name}" (${ggmlTypeName(info.ggmlType)} ${formatShape(shape)}, ${byteLength} bytes at data offset ${info.relative}) reaches beyond the ${Math.max(0, dataSize)} data bytes of the file`);
        }
      }
      return { name: info.name, shape, ggmlType: info.ggmlType, dtype, offset: dataOffset + info.relative, byteLength };
    });
    const sorted = tensors.filter((t) => t.byteLength > 0).sort((a, b) => a.offset - b.offset);
    for (let i = 1; i < sorted.length; i++) {
      if (sorted[i].offset < sorted[i - 1].offset + sorted[i - 1].byteLength) {
        fail(file, `tensors "${sorted[i - 1].name}" and "${sorted[i].name}" overlap in the data section`);
      }
    }
    return { path: file, version, metadata, tensors, alignment, dataOffset };
  } finally {
    fs.closeSync(fd);
  }
}

export interface GgufContents {
  header: GgufHeader;
  metadata: Map<string, GgufEntry>;
  /** Tensors in PyTorch order, mapped from the file. */
  tensors: Map<string, Tensor>;
}

/**
 * Reads a GGUF file and maps its tensors (F32, F16, BF16, Q8_0, I32) without copying. A tensor of
 * another ggml type is refused naming it and its type. `names` limits the tensors read.
 */
export function readGguf(file: string, options: { names?: Iterable<string> } = {}): GgufContents {
  const header = readGgufHeader(file);
  let infos = header.tensors;
  if (options.names) {
    const wanted = new Set(options.names);
    infos = infos.filter((t) => wanted.has(t.name));
  }
  for (const t of infos) {
    if (!t.dtype) {
      fail(file, `tensor "${t.name}" has ggml type ${ggmlTypeName(t.ggmlType)} (${t.ggmlType}), which is not supported; supported: F32, F16, BF16, Q8_0, I32`);
    }
  }
  const mapped = mapTensors(
    file,
    infos.map((t) => ({ offset: t.offset, byteLength: t.byteLength, dtype: t.dtype as DType, shape: t.shape })),
  );
  const tensors = new Map<string, Tensor>();
  infos.forEach((t, i) => tensors.set(t.name, mapped[i]));
  return { header, metadata: header.metadata, tensors };
}

/** Serialises GGUF header parts into a growing list of chunks. */
class HeaderWriter {
  private chunks: Buffer[] = [];
  length = 0;

  constructor(private readonly file: string) {}

  push(b: Buffer): void {
    this.chunks.push(b);
    this.length += b.length;
  }

  u32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v, 0);
    this.push(b);
  }

  u64(v: number | bigint): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v), 0);
    this.push(b);
  }

  string(s: string): void {
    const bytes = Buffer.from(s, "utf8");
    this.u64(bytes.length);
    this.push(bytes);
  }

  value(type: GgufValueType, value: GgufValue, what: string): void {
    const bad = (): never => fail(this.file, `${what}: ${JSON.stringify(typeof value === "bigint" ? String(value) : value)} is not a valid ${type}`);
    const integer = (min: number, max: number): number => {
      if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) bad();
      return value as number;
    };
    const b8 = Buffer.alloc(8);
    switch (type) {
      case "u8": { const b = Buffer.alloc(1); b.writeUInt8(integer(0, 255), 0); this.push(b); return; }
      case "i8": { const b = Buffer.alloc(1); b.writeInt8(integer(-128, 127), 0); this.push(b); return; }
      case "u16": { const b = Buffer.alloc(2); b.writeUInt16LE(integer(0, 65535), 0); this.push(b); return; }
      case "i16": { const b = Buffer.alloc(2); b.writeInt16LE(integer(-32768, 32767), 0); this.push(b); return; }
      case "u32": this.u32(integer(0, 0xffffffff)); return;
      case "i32": { const b = Buffer.alloc(4); b.writeInt32LE(integer(-0x80000000, 0x7fffffff), 0); this.push(b); return; }
      case "f32": { if (typeof value !== "number") bad(); const b = Buffer.alloc(4); b.writeFloatLE(value as number, 0); this.push(b); return; }
      case "f64": { if (typeof value !== "number") bad(); b8.writeDoubleLE(value as number, 0); this.push(b8); return; }
      case "u64":
      case "i64": {
        if (typeof value !== "bigint" && (typeof value !== "number" || !Number.isSafeInteger(value))) bad();
        const v = BigInt(value as number | bigint);
        try {
          if (type === "u64") b8.writeBigUInt64LE(v, 0);
          else b8.writeBigInt64LE(v, 0);
        } catch {
          bad();
        }
        this.push(b8);
        return;
      }
      case "bool": { if (typeof value !== "boolean") bad(); this.push(Buffer.from([value ? 1 : 0])); return; }
      case "string": { if (typeof value !== "string") bad(); this.string(value as string); return; }
      case "array": {
        const array = value as GgufArray;
        if (typeof array !== "object" || array === null || !Array.isArray(array.items) || !(array.itemType in GGUF_VALUE_TYPES)) bad();
        this.u32(GGUF_VALUE_TYPES[array.itemType]);
        this.u64(array.items.length);
        array.items.forEach((item, i) => this.value(array.itemType, item, `${what}[${i}]`));
        return;
      }
    }
  }

  bytes(): Buffer {
    return Buffer.concat(this.chunks, this.length);
  }
}

/**
 * Writes a GGUF file (version 3), atomically. `tensors` are in PyTorch order (written with dims
 * reversed) and may be f32, f16, bf16, q8_0 or i32. general.alignment is written only when it is not
 * the default 32.
 */
export function writeGguf(
  file: string,
  metadata: Map<string, GgufEntry> | Array<[string, GgufEntry]>,
  tensors: Map<string, Tensor> | Array<[string, Tensor]>,
  options: { alignment?: number } = {},
): void {
  if (os.endianness() !== "LE") fail(file, "writing GGUF needs a little-endian machine");
  const alignment = options.alignment ?? GGUF_DEFAULT_ALIGNMENT;
  if (!Number.isInteger(alignment) || alignment <= 0 || (alignment & (alignment - 1)) !== 0) {
    fail(file, `alignment must be a power of two, got ${alignment}`);
  }
  const entries = [...metadata].filter(([key]) => key !== "general.alignment");
  if (alignment !== GGUF_DEFAULT_ALIGNMENT) entries.unshift(["general.alignment", gguf.u32(alignment)]);
  const list = [...tensors];
  const header = new HeaderWriter(file);
  header.push(Buffer.from("GGUF", "latin1"));
  header.u32(3);
  header.u64(list.length);
  header.u64(entries.length);
  const keys = new Set<string>();
  for (const [key, entry] of entries) {
    if (keys.has(key)) fail(file, `key "${key}" given twice`);
    keys.add(key);
    if (!(entry.type in GGUF_VALUE_TYPES)) fail(file, `key "${key}": unknown value type ${String(entry.type)}`);
    header.string(key);
    header.u32(GGUF_VALUE_TYPES[entry.type]);
    header.value(entry.type, entry.value, `key "${key}"`);
  }
  let offset = 0;
  const offsets: number[] = [];
  const names = new Set<string>();
  for (const [name, t] of list) {
    if (names.has(name)) fail(file, `tensor "${name}" given twice`);
    names.add(name);
    const code = GGML_CODES[t.dtype];
    if (code === undefined) fail(file, `tensor "${name}": ${t.dtype} has no ggml type`);
    if (t.shape.length > MAX_DIMS) fail(file, `tensor "${name}": ${t.shape.length} dimensions; ggml allows at most ${MAX_DIMS}`);
    t.buffer(`tensor "${name}"`);
    header.string(name);
    const dims = t.shape.length ? [...t.shape].reverse() : [1];
    header.u32(dims.length);
    for (const d of dims) header.u64(d);
    header.u32(code);
    header.u64(offset);
    offsets.push(offset);
    offset += Math.ceil(t.byteLength / alignment) * alignment;
  }
  const headerBytes = header.bytes();
  const padding = Buffer.alloc(Math.ceil(headerBytes.length / alignment) * alignment - headerBytes.length);
  writeFileAtomic(file, (fd) => {
    writeAll(fd, headerBytes);
    writeAll(fd, padding);
    for (const [, t] of list) {
      writeAll(fd, t.bytes());
      const pad = Math.ceil(t.byteLength / alignment) * alignment - t.byteLength;
      if (pad) writeAll(fd, Buffer.alloc(pad));
    }
  });
}

/** A key's value as a number, or an Error naming the file and the key. */
export function ggufNumber(file: string, metadata: Map<string, GgufEntry>, key: string): number {
  const entry = metadata.get(key);
  if (!entry) fail(file, `missing key "${key}"`);
  const v = entry.value;
  if (typeof v !== "number") fail(file, `key "${key}" must be a number, found ${entry.type} ${String(typeof v === "object" ? "[array]" : v)}`);
  return v;
}

/** A key's value as a string, or an Error naming the file and the key. */
export function ggufString(file: string, metadata: Map<string, GgufEntry>, key: string): string {
  const entry = metadata.get(key);
  if (!entry) fail(file, `missing key "${key}"`);
  if (typeof entry.value !== "string") fail(file, `key "${key}" must be a string, found ${entry.type}`);
  return entry.value;
}
