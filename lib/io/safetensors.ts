// safetensors files: an 8-byte little-endian header length n, n bytes of JSON
//   {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {string: string}}
// then the tensor bytes, little-endian, offsets relative to the end of the header. Reading validates
// the header strictly and maps the tensors from the file without copying; writing is atomic.
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { DType } from "../dtype";
import { formatShape, shapeSize, Tensor } from "../tensor";
import { writeAll, writeFileAtomic } from "./atomic";
import { fileSize, mapTensors } from "./mmap";

/** The bytes of one element of each safetensors dtype this reader knows. */
const ELEMENT_BYTES: Record<string, number> = {
  BOOL: 1, U8: 1, I8: 1, F8_E4M3: 1, F8_E5M2: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  I64: 8, U64: 8, F64: 8,
};

/** safetensors dtypes loaded as they are (mapped) and their tensor dtype. */
const MAPPED: Record<string, DType> = { F32: "f32", F16: "f16", BF16: "bf16", I32: "i32" };
/** safetensors dtypes converted at load: F64 to f32, I64 to i32 (range-checked). */
const CONVERTED: Record<string, DType> = { F64: "f32", I64: "i32" };

const WRITTEN: Partial<Record<DType, string>> = { f32: "F32", f16: "F16", bf16: "BF16", i32: "I32" };

/** The reference implementation refuses headers above 100 MB; so do we, before reading them. */
const MAX_HEADER_BYTES = 100_000_000;

export interface SafetensorsEntry {
  name: string;
  /** The dtype as the file names it ("F32", "BF16", …). */
  dtype: string;
  shape: number[];
  /** Absolute byte offset in the file and byte length. */
  offset: number;
  byteLength: number;
}

export interface SafetensorsHeader {
  path: string;
  entries: Map<string, SafetensorsEntry>;
  metadata: Record<string, string>;
  /** Absolute offset of the data section. */
  dataOffset: number;
}

function fail(file: string, what: string): never {
  throw new Error(`safetensors ${file}: ${what}`);
}

function isSize(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

/** Reads and validates the header of a safetensors file. */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  if (os.endianness() !== "LE") fail(file, "reading safetensors needs a little-endian machine");
  const size = fileSize(file);
  if (size < 8) fail(file, `file is ${size} bytes, too short for the 8-byte header length`);
  const fd = fs.openSync(file, "r");
  let json: string;
  let headerLength: number;
  try {
    const prefix = Buffer.alloc(8);
    fs.readSync(fd, prefix, 0, 8, 0);
    const n = prefix.readBigUInt64LE(0);
    if (n > BigInt(size - 8)) {
      fail(file, `header length ${n} is larger than the file allows (${size} bytes in all, ${size - 8} after the length)`);
    }
    headerLength = Number(n);
    if (headerLength > MAX_HEADER_BYTES) fail(file, `header length ${headerLength} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
    const bytes = Buffer.alloc(headerLength);
    let read = 0;
    while (read < headerLength) {
      const got = fs.readSync(fd, bytes, read, headerLength - read, 8 + read);
      if (got === 0) fail(file, `file ended while reading the ${headerLength}-byte header`);
      read += got;
    }
    json = bytes.toString("utf8");
  } finally {
    fs.closeSync(fd);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(json);
  } catch (err) {
    fail(file, `header is not valid JSON (${(err as Error).message})`);
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) fail(file, "header must be a JSON object");
  const dataOffset = 8 + headerLength;
  const dataSize = size - dataOffset;
  const entries = new Map<string, SafetensorsEntry>();
  let metadata: Record<string, string> = {};
  for (const [name, raw] of Object.entries(parsed as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (typeof raw !== "object" || raw === null || Array.isArray(raw)) fail(file, "__metadata__ must be an object of strings");
      for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
        if (typeof v !== "string") fail(file, `__metadata__.${k} must be a string, found ${JSON.stringify(v)}`);
      }
      metadata = raw as Record<string, string>;
      continue;
    }
    const where = `tensor "${name}"`;
    if (typeof raw !== "object" || raw === null) fail(file, `${where}: entry must be an object`);
    const info = raw as Record<string, unknown>;
    const dtype = info.dtype;
    if (typeof dtype !== "string") fail(file, `${where}: dtype must be a string, found ${JSON.stringify(dtype)}`);
    if (!(dtype in ELEMENT_BYTES)) {
      fail(file, `${where}: unknown dtype "${dtype}"; known: ${Object.keys(ELEMENT_BYTES).join(", ")}`);
    }
    const shape = info.shape;
    if (!Array.isArray(shape) || !shape.every(isSize)) {
      fail(file, `${where}: shape must be an array of integers >= 0, found ${JSON.stringify(shape)}`);
    }
    const offsets = info.data_offsets;
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isSize)) {
      fail(file, `${where}: data_offsets must be [begin, end] integers, found ${JSON.stringify(offsets)}`);
    }
    const [begin, end] = offsets as number[];
    if (end < begin) fail(file, `${where}: data_offsets [${begin}, ${end}] end before they begin`);
    if (end > dataSize) {
      fail(file, `${where}: data_offsets [${begin}, ${end}] reach beyond the ${dataSize} data bytes of the file (truncated?)`);
    }
    const expected = shapeSize(shape as number[]) * ELEMENT_BYTES[dtype];
    if (end - begin !== expected) {
      fail(file, `${where}: ${dtype} ${formatShape(shape as number[])} needs ${expected} bytes, data_offsets [${begin}, ${end}] hold ${end - begin}`);
    }
    entries.set(name, { name, dtype, shape: shape as number[], offset: dataOffset + begin, byteLength: end - begin });
  }
  // Overlaps: sorted by start, each tensor must begin where the one before it ended or later.
  const sorted = [...entries.values()].filter((e) => e.byteLength > 0).sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const previous = sorted[i - 1];
    if (sorted[i].offset < previous.offset + previous.byteLength) {
      fail(file, `tensors "${previous.name}" and "${sorted[i].name}" overlap in the data section`);
    }
  }
  return { path: file, entries, metadata, dataOffset };
}

function convertEntry(file: string, entry: SafetensorsEntry, mapped: Tensor): Tensor {
  const bytes = mapped.bytes();
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const count = shapeSize(entry.shape);
  if (entry.dtype === "F64") {
    const values = new Float32Array(count);
    for (let i = 0; i < count; i++) values[i] = view.getFloat64(i * 8, true);
    return Tensor.from(values, entry.shape);
  }
  const values = new Int32Array(count);
  for (let i = 0; i < count; i++) {
    const v = view.getBigInt64(i * 8, true);
    if (v < -2147483648n || v > 2147483647n) {
      fail(file, `tensor "${entry.name}": I64 value ${v} at ${i} does not fit the i32 it is loaded as`);
    }
    values[i] = Number(v);
  }
  return Tensor.from(values, entry.shape);
}

export interface SafetensorsContents {
  tensors: Map<string, Tensor>;
  metadata: Record<string, string>;
}

/**
 * Reads a safetensors file: F32, F16, BF16 and I32 tensors are mapped from the file without copying;
 * F64 becomes f32 and I64 i32 (copies). Other dtypes are refused naming the tensor. `names` limits the
 * tensors read.
 */
export function readSafetensors(file: string, options: { names?: Iterable<string> } = {}): SafetensorsContents {
  const header = readSafetensorsHeader(file);
  let entries = [...header.entries.values()];
  if (options.names) {
    const wanted = new Set(options.names);
    entries = entries.filter((e) => wanted.has(e.name));
  }
  for (const e of entries) {
    if (!(e.dtype in MAPPED) && !(e.dtype in CONVERTED)) {
      fail(file, `tensor "${e.name}": dtype ${e.dtype} is not supported; supported: F32, F16, BF16, I32, and F64/I64 (converted)`);
    }
  }
  const mapped = mapTensors(
    file,
    entries.map((e) => ({
      offset: e.offset,
      byteLength: e.byteLength,
      // Converted dtypes are mapped as raw bytes of the same length, then read with a DataView.
      dtype: MAPPED[e.dtype] ?? ("i32" as DType),
      shape: MAPPED[e.dtype] ? e.shape : [e.byteLength / 4],
    })),
  );
  const tensors = new Map<string, Tensor>();
  try {
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i];
      if (MAPPED[e.dtype]) {
        tensors.set(e.name, mapped[i]);
      } else {
        tensors.set(e.name, convertEntry(file, e, mapped[i]));
        mapped[i].dispose();
      }
    }
  } catch (err) {
    for (const t of mapped) t.dispose();
    for (const t of tensors.values()) t.dispose();
    throw err;
  }
  return { tensors, metadata: header.metadata };
}

/** The weight_map of a sharded checkpoint's index (model.safetensors.index.json): tensor → shard file. */
export function readSafetensorsIndex(indexFile: string): Map<string, string> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(fs.readFileSync(indexFile, "utf8"));
  } catch (err) {
    throw new Error(`safetensors index ${indexFile}: cannot read it as JSON (${(err as Error).message})`);
  }
  const weightMap = (parsed as { weight_map?: unknown } | null)?.weight_map;
  if (typeof weightMap !== "object" || weightMap === null || Array.isArray(weightMap)) {
    throw new Error(`safetensors index ${indexFile}: missing the "weight_map" object (tensor name → shard file)`);
  }
  const folder = path.dirname(indexFile);
  const out = new Map<string, string>();
  for (const [name, shard] of Object.entries(weightMap as Record<string, unknown>)) {
    if (typeof shard !== "string" || shard.includes("/") || shard.includes("\\") || shard.startsWith(".")) {
      throw new Error(`safetensors index ${indexFile}: weight_map["${name}"] must name a shard file in the same folder, found ${JSON.stringify(shard)}`);
    }
    out.set(name, path.join(folder, shard));
  }
  return out;
}

/**
 * Reads a sharded checkpoint through its index: every shard is read, and each tensor must lie in the
 * shard the index names. Metadata of the shards is merged.
 */
export function readShardedSafetensors(indexFile: string): SafetensorsContents {
  const weightMap = readSafetensorsIndex(indexFile);
  const shards = new Map<string, string[]>();
  for (const [name, shard] of weightMap) {
    const list = shards.get(shard) ?? [];
    list.push(name);
    shards.set(shard, list);
  }
  const tensors = new Map<string, Tensor>();
  const metadata: Record<string, string> = {};
  try {
    for (const [shard, names] of shards) {
      const contents = readSafetensors(shard, { names });
      for (const name of names) {
        if (!contents.tensors.has(name)) {
          throw new Error(`safetensors index ${indexFile}: tensor "${name}" is listed in ${path.basename(shard)} but that shard does not hold it`);
        }
      }
      for (const [name, t] of contents.tensors) tensors.set(name, t);
      Object.assign(metadata, contents.metadata);
    }
  } catch (err) {
    for (const t of tensors.values()) t.dispose();
    throw err;
  }
  return { tensors, metadata };
}

/**
 * Writes tensors (f32, f16, bf16, i32) as a safetensors file, atomically. The header is padded with
 * spaces to a multiple of 8 bytes so the data section starts 8-byte aligned. q8_0 has no safetensors
 * dtype: convert it first (tensor.to("f32")).
 */
export function writeSafetensors(
  file: string,
  tensors: Map<string, Tensor> | Record<string, Tensor>,
  metadata: Record<string, string> = {},
): void {
  if (os.endianness() !== "LE") fail(file, "writing safetensors needs a little-endian machine");
  const list = tensors instanceof Map ? [...tensors] : Object.entries(tensors);
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") fail(file, `metadata "${k}" must be a string`);
    }
    header.__metadata__ = metadata;
  }
  let offset = 0;
  for (const [name, t] of list) {
    if (name === "__metadata__") fail(file, `"__metadata__" cannot be a tensor name`);
    const dtype = WRITTEN[t.dtype];
    if (!dtype) {
      fail(file, `tensor "${name}" is ${t.dtype}, which safetensors cannot hold; convert it first (e.g. to("f32"))`);
    }
    t.buffer(`tensor "${name}"`);
    header[name] = { dtype, shape: [...t.shape], data_offsets: [offset, offset + t.byteLength] };
    offset += t.byteLength;
  }
  let json = JSON.stringify(header);
  const length = Buffer.byteLength(json, "utf8");
  json += " ".repeat((8 - ((8 + length) % 8)) % 8);
  const headerBytes = Buffer.from(json, "utf8");
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(headerBytes.byteLength), 0);
  writeFileAtomic(file, (fd) => {
    writeAll(fd, prefix);
    writeAll(fd, headerBytes);
    for (const [, t] of list) writeAll(fd, t.bytes());
  });
}
