import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { Tensor } from "../lib/tensor";
import { expectedShapes, isMatrixWeight, MambaConfig } from "../lib/models/config";
import { mapFileRanges } from "../lib/io/mmap";
import { readSafetensors, readSafetensorsHeader, readShardedSafetensors, writeSafetensors } from "../lib/io/safetensors";
import { gguf, GgufArray, readGguf, readGgufHeader, writeGguf } from "../lib/io/gguf";
import { loadCheckpoint, saveCheckpoint } from "../lib/io/checkpoint";
import { parsePythonJson, stringifyPythonJson } from "../lib/io/json";

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "mssm-io-"));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

let counter = 0;
function tmp(name: string): string {
  return path.join(dir, `${counter++}-${name}`);
}

/** Deterministic pseudo-random numbers (xorshift), so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 0x100000000 - 0.5;
  };
}

function randomTensor(shape: number[], random: () => number, negative = false): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const values = new Float32Array(n);
  for (let i = 0; i < n; i++) values[i] = negative ? -(0.25 + Math.abs(random()) * 4) : random() * 2;
  return Tensor.from(values, shape);
}

function randomWeights(config: MambaConfig, seed: number): Map<string, Tensor> {
  const random = rng(seed);
  const weights = new Map<string, Tensor>();
  for (const [name, shape] of expectedShapes(config)) weights.set(name, randomTensor(shape, random, name.endsWith(".A")));
  return weights;
}

const mamba1: MambaConfig = {
  architecture: "mamba1",
  hiddenSize: 40,
  numLayers: 2,
  vocabSize: 67,
  intermediateSize: 80,
  stateSize: 5,
  convKernel: 3,
  timeStepRank: 3,
  numHeads: 0,
  headDim: 0,
  numGroups: 0,
  chunkSize: 0,
  useBias: true,
  useConvBias: true,
  normEps: 1e-5,
  timeStepLimit: [0, Infinity],
  normBeforeGate: false,
  tieEmbeddings: false,
  bosTokenId: 0,
  eosTokenId: 2,
};

const mamba2: MambaConfig = {
  architecture: "mamba2",
  hiddenSize: 48,
  numLayers: 2,
  vocabSize: 53,
  intermediateSize: 96,
  stateSize: 7,
  convKernel: 4,
  timeStepRank: 0,
  numHeads: 6,
  headDim: 16,
  numGroups: 2,
  chunkSize: 64,
  useBias: true,
  useConvBias: true,
  normEps: 1e-6,
  timeStepLimit: [0.001, 100],
  normBeforeGate: false,
  tieEmbeddings: false,
};

/** Shapes that q8_0 can hold: every matrix row a whole number of blocks of 32 (dt_proj excepted). */
const mamba2q8: MambaConfig = { ...mamba2, hiddenSize: 64, intermediateSize: 128, numHeads: 8, headDim: 16, tieEmbeddings: true };
const mamba1q8: MambaConfig = { ...mamba1, hiddenSize: 64, intermediateSize: 128, timeStepRank: 4, useBias: false, tieEmbeddings: true };

function expectSameValues(actual: Tensor, expected: Tensor, tolerance = 0): void {
  expect(actual.shape).toEqual(expected.shape);
  const a = actual.toArray(), e = expected.toArray();
  if (tolerance === 0) {
    expect(Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(e.buffer, e.byteOffset, e.byteLength))).toBe(true);
    return;
  }
  let worst = 0;
  for (let i = 0; i < e.length; i++) worst = Math.max(worst, Math.abs(a[i] - e[i]) / Math.max(Math.abs(e[i]), 1e-3));
  expect(worst).toBeLessThanOrEqual(tolerance);
}

function disposeWeights(weights: Map<string, Tensor>): void {
  for (const t of weights.values()) if (!t.disposed) t.dispose();
}

function isMapped(file: string): boolean {
  return fs.readFileSync("/proc/self/maps", "utf8").includes(path.resolve(file));
}

async function settle(): Promise<void> {
  // Finalisers of detached external buffers run from an immediate on the JavaScript thread.
  for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
}

describe("mapFile", () => {
  test("maps byte ranges without copying; writes are private to the mapping, never reach the file", () => {
    const file = tmp("floats.bin");
    fs.writeFileSync(file, Buffer.from(new Float32Array([1.5, -2, 3, 4, 5.25, 6]).buffer));
    const [all, tail, odd, empty] = mapFileRanges(file, [[0, 24], [8, 16], [2, 4], [24, 0]]);
    expect(Array.from(new Float32Array(tail))).toEqual([3, 4, 5.25, 6]);
    expect(Buffer.from(odd).equals(fs.readFileSync(file).subarray(2, 6))).toBe(true);
    expect(empty.byteLength).toBe(0);
    new Float32Array(all)[2] = 42;
    expect(new Float32Array(tail)[0]).toBe(42);
    expect(fs.readFileSync(file).readFloatLE(8)).toBe(3);
  });

  test("a tensor over a mapping unmaps the file once every buffer of it is disposed", async () => {
    if (process.platform !== "linux") return;
    const file = tmp("release.bin");
    fs.writeFileSync(file, Buffer.from(new Float32Array([7, 8, 9, 10]).buffer));
    const [a, b] = mapFileRanges(file, [[0, 8], [8, 8]]);
    const ta = Tensor.fromArrayBuffer(a, "f32", [2]);
    const tb = Tensor.fromArrayBuffer(b, "f32", [2]);
    expect(Array.from(tb.data)).toEqual([9, 10]);
    expect(isMapped(file)).toBe(true);
    ta.dispose();
    await settle();
    expect(isMapped(file)).toBe(true);
    tb.dispose();
    await settle();
    expect(isMapped(file)).toBe(false);
  });

  test("ranges beyond the end, missing files and bad ranges throw naming the file", () => {
    const file = tmp("short.bin");
    fs.writeFileSync(file, Buffer.alloc(10));
    expect(() => mapFileRanges(file, [[4, 7]])).toThrow(new RegExp(`${path.basename(file)}.*range 0 \\[4, 4 \\+ 7\\) lies beyond the end of the file \\(10 bytes\\)`));
    expect(() => mapFileRanges(path.join(dir, "absent.bin"), [[0, 1]])).toThrow(/cannot open ".*absent\.bin": No such file or directory/);
    expect(() => mapFileRanges(file, [[-1, 2]])).toThrow(/range 0 offset must be an integer >= 0/);
    expect(() => mapFileRanges(dir, [[0, 1]])).toThrow(/is not a regular file|Is a directory/);
  });

  test("fromArrayBuffer checks the buffer holds the dtype's bytes", () => {
    const [buffer] = mapFileRanges(__filename, [[0, 6]]);
    expect(() => Tensor.fromArrayBuffer(buffer, "f32", [2])).toThrow(/f32 \[2\] needs 8 bytes, the buffer holds 6/);
    const t = Tensor.fromArrayBuffer(buffer, "bf16", [3]);
    expect(t.byteLength).toBe(6);
    t.dispose();
  });
});

describe("safetensors", () => {
  test("round trip of f32, f16, bf16 and i32 with metadata; header padded to 8 bytes", () => {
    const file = tmp("round.safetensors");
    const values = Float32Array.from({ length: 15 }, (_, i) => Math.sin(i + 1) * 3);
    const tensors = new Map<string, Tensor>([
      ["a.f32", Tensor.from(values, [3, 5])],
      ["b.f16", Tensor.from(values, [15], "f16")],
      ["c.bf16", Tensor.from(values, [5, 3], "bf16")],
      ["d.i32", Tensor.from(new Int32Array([-7, 3, 2147483647]))],
      ["e.empty", Tensor.zeros([0, 4])],
    ]);
    writeSafetensors(file, tensors, { format: "pt", note: "x" });
    const bytes = fs.readFileSync(file);
    const headerLength = Number(bytes.readBigUInt64LE(0));
    expect((8 + headerLength) % 8).toBe(0);
    expect(JSON.parse(bytes.subarray(8, 8 + headerLength).toString())["c.bf16"]).toEqual({ dtype: "BF16", shape: [5, 3], data_offsets: [90, 120] });
    const back = readSafetensors(file);
    expect(back.metadata).toEqual({ format: "pt", note: "x" });
    for (const [name, t] of tensors) {
      const r = back.tensors.get(name) as Tensor;
      expect(r.dtype).toBe(t.dtype);
      expect(r.shape).toEqual(t.shape);
      expect(Buffer.from(r.bytes()).equals(Buffer.from(t.bytes()))).toBe(true);
    }
    expect(fs.readdirSync(dir).filter((f) => f.endsWith(".tmp"))).toEqual([]);
    disposeWeights(back.tensors);
    disposeWeights(tensors);
  });

  function rawSafetensors(header: object, data: Buffer, lengthOverride?: number): string {
    const file = tmp("raw.safetensors");
    const json = Buffer.from(JSON.stringify(header));
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(lengthOverride ?? json.length));
    fs.writeFileSync(file, Buffer.concat([prefix, json, data]));
    return file;
  }

  test("F64 loads as f32 and I64 as i32; out-of-range I64 and unsupported dtypes are refused by name", () => {
    const data = Buffer.alloc(32);
    data.writeDoubleLE(0.1, 0);
    data.writeDoubleLE(-3e38, 8);
    data.writeBigInt64LE(-5n, 16);
    data.writeBigInt64LE(123456n, 24);
    const file = rawSafetensors({ x: { dtype: "F64", shape: [2], data_offsets: [0, 16] }, y: { dtype: "I64", shape: [2], data_offsets: [16, 32] } }, data);
    const { tensors } = readSafetensors(file);
    expect(tensors.get("x")?.dtype).toBe("f32");
    expect(Array.from(tensors.get("x")!.data)).toEqual([Math.fround(0.1), Math.fround(-3e38)]);
    expect(Array.from(tensors.get("y")!.data)).toEqual([-5, 123456]);
    disposeWeights(tensors);

    const big = Buffer.alloc(8);
    big.writeBigInt64LE(1n << 40n);
    const bigFile = rawSafetensors({ y: { dtype: "I64", shape: [1], data_offsets: [0, 8] } }, big);
    expect(() => readSafetensors(bigFile)).toThrow(/tensor "y": I64 value 1099511627776 at 0 does not fit/);
    const u8 = rawSafetensors({ flags: { dtype: "U8", shape: [4], data_offsets: [0, 4] } }, Buffer.alloc(4));
    expect(() => readSafetensors(u8)).toThrow(/raw\.safetensors: tensor "flags": dtype U8 is not supported/);
  });

  test("malformed headers are refused naming the file and the tensor", () => {
    const f32 = (offsets: number[], shape = [2]) => ({ dtype: "F32", shape, data_offsets: offsets });
    expect(() => readSafetensorsHeader(rawSafetensors({ w: f32([0, 8]) }, Buffer.alloc(8), 10_000))).toThrow(
      /raw\.safetensors: header length 10000 is larger than the file allows/,
    );
    expect(() => readSafetensorsHeader(rawSafetensors({ w: f32([0, 8]) }, Buffer.alloc(4)))).toThrow(
      /tensor "w": data_offsets \[0, 8\] reach beyond the 4 data bytes of the file \(truncated\?\)/,
    );
    expect(() => readSafetensorsHeader(rawSafetensors({ w: f32([0, 12]) }, Buffer.alloc(12)))).toThrow(
      /tensor "w": F32 \[2\] needs 8 bytes, data_offsets \[0, 12\] hold 12/,
    );
    expect(() => readSafetensorsHeader(rawSafetensors({ a: f32([0, 8]), b: f32([4, 12]) }, Buffer.alloc(12)))).toThrow(
      /tensors "a" and "b" overlap/,
    );
    expect(() => readSafetensorsHeader(rawSafetensors({ w: { dtype: "F17", shape: [1], data_offsets: [0, 4] } }, Buffer.alloc(4)))).toThrow(
      /tensor "w": unknown dtype "F17"/,
    );
    expect(() => readSafetensorsHeader(rawSafetensors({ w: f32([0, 8], [-2]) }, Buffer.alloc(8)))).toThrow(/tensor "w": shape must be an array/);
    const notJson = tmp("bad.safetensors");
    fs.writeFileSync(notJson, Buffer.concat([Buffer.from([3, 0, 0, 0, 0, 0, 0, 0]), Buffer.from("{x]")]));
    expect(() => readSafetensorsHeader(notJson)).toThrow(/bad\.safetensors: header is not valid JSON/);
  });

  test("q8_0 tensors are refused by the writer, and nothing is left behind", () => {
    const file = tmp("q8.safetensors");
    const q = Tensor.from(new Float32Array(32).fill(1), [1, 32], "q8_0");
    expect(() => writeSafetensors(file, { q })).toThrow(/tensor "q" is q8_0, which safetensors cannot hold/);
    expect(fs.existsSync(file)).toBe(false);
    q.dispose();
  });

  test("sharded checkpoints read through model.safetensors.index.json", () => {
    const folder = tmp("sharded");
    fs.mkdirSync(folder);
    const a = Tensor.from([1, 2, 3]), b = Tensor.from([4, 5]);
    writeSafetensors(path.join(folder, "part-1.safetensors"), { a });
    writeSafetensors(path.join(folder, "part-2.safetensors"), { b });
    const index = path.join(folder, "model.safetensors.index.json");
    fs.writeFileSync(index, JSON.stringify({ metadata: {}, weight_map: { a: "part-1.safetensors", b: "part-2.safetensors" } }));
    const { tensors } = readShardedSafetensors(index);
    expect(Array.from(tensors.get("a")!.data)).toEqual([1, 2, 3]);
    expect(Array.from(tensors.get("b")!.data)).toEqual([4, 5]);
    disposeWeights(tensors);
    fs.writeFileSync(index, JSON.stringify({ weight_map: { a: "part-2.safetensors" } }));
    expect(() => readShardedSafetensors(index)).toThrow(/tensor "a" is listed in part-2\.safetensors but that shard does not hold it/);
    a.dispose();
    b.dispose();
  });
});

/** A GGUF file built byte by byte, independently of the writer. */
class GgufBytes {
  parts: Buffer[] = [];
  u32(v: number): this {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.parts.push(b);
    return this;
  }
  u64(v: number | bigint): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.parts.push(b);
    return this;
  }
  str(s: string): this {
    this.u64(Buffer.byteLength(s));
    this.parts.push(Buffer.from(s));
    return this;
  }
  raw(b: Buffer): this {
    this.parts.push(b);
    return this;
  }
  pad(alignment: number): this {
    const length = this.bytes().length;
    this.parts.push(Buffer.alloc((alignment - (length % alignment)) % alignment));
    return this;
  }
  bytes(): Buffer {
    return Buffer.concat(this.parts);
  }
}

describe("GGUF", () => {
  test("reads a hand-made version 2 file: key/values, reversed dims, custom alignment, data offset", () => {
    const b = new GgufBytes().raw(Buffer.from("GGUF")).u32(2).u64(1).u64(3);
    b.str("general.alignment").u32(4).u32(64);
    b.str("nested").u32(9).u32(9).u64(2); // array of arrays
    b.u32(5).u64(2).u32(0xffffffff).u32(7); // [-1, 7] as i32
    b.u32(8).u64(1).str("héllo");
    b.str("big").u32(10).u64(2n ** 60n);
    b.str("w").u32(2).u64(3).u64(2).u32(0).u64(0); // ggml dims [3, 2] → shape [2, 3], F32, offset 0
    b.pad(64);
    const headerEnd = b.bytes().length;
    b.raw(Buffer.from(new Float32Array([1, 2, 3, 4, 5, 6]).buffer));
    const file = tmp("hand.gguf");
    fs.writeFileSync(file, b.bytes());
    const { header, tensors } = readGguf(file);
    expect(header.version).toBe(2);
    expect(header.alignment).toBe(64);
    expect(header.dataOffset).toBe(headerEnd);
    const nested = header.metadata.get("nested")!.value as GgufArray;
    expect(nested.itemType).toBe("array");
    expect((nested.items[0] as GgufArray).items).toEqual([-1, 7]);
    expect((nested.items[1] as GgufArray).items).toEqual(["héllo"]);
    expect(header.metadata.get("big")!.value).toBe(2n ** 60n);
    const w = tensors.get("w")!;
    expect(w.shape).toEqual([2, 3]);
    expect(Array.from(w.data)).toEqual([1, 2, 3, 4, 5, 6]);
    w.dispose();
  });

  test("writer round trip: every value type, nested arrays, tensors of every loadable type padded to 32", () => {
    const file = tmp("all.gguf");
    const values = Float32Array.from({ length: 64 }, (_, i) => Math.cos(i) * (i + 1));
    const tensors: Array<[string, Tensor]> = [
      ["f32", Tensor.from(values.subarray(0, 6), [2, 3])],
      ["f16", Tensor.from(values.subarray(0, 5), [5], "f16")],
      ["bf16", Tensor.from(values.subarray(0, 7), [7], "bf16")],
      ["q8_0", Tensor.from(values, [2, 32], "q8_0")],
    ];
    const metadata = new Map([
      ["u8", gguf.u8(255)], ["i8", gguf.i8(-128)], ["u16", gguf.u16(65535)], ["i16", gguf.i16(-32768)],
      ["u32", gguf.u32(4294967295)], ["i32", gguf.i32(-2147483648)], ["f32", gguf.f32(1.5)], ["f64", gguf.f64(Math.PI)],
      ["u64", gguf.u64(2n ** 64n - 1n)], ["i64", gguf.i64(-(2n ** 63n))], ["bool", gguf.bool(true)], ["string", gguf.string("ü")],
      ["array", gguf.array("array", [{ itemType: "f64", items: [0.5] }, { itemType: "bool", items: [false, true] }])],
    ]);
    writeGguf(file, metadata, tensors);
    const back = readGguf(file);
    expect(back.header.version).toBe(3);
    for (const [key, entry] of metadata) expect(back.metadata.get(key)).toEqual(entry);
    for (const info of back.header.tensors) expect((info.offset - back.header.dataOffset) % 32).toBe(0);
    expect(back.header.dataOffset % 32).toBe(0);
    for (const [name, t] of tensors) {
      const r = back.tensors.get(name)!;
      expect(r.dtype).toBe(t.dtype);
      expect(r.shape).toEqual(t.shape);
      expect(Buffer.from(r.bytes()).equals(Buffer.from(t.bytes()))).toBe(true);
    }
    // ggml order on disk: the [2, 32] q8_0 tensor is stored with dims [32, 2].
    const bytes = fs.readFileSync(file);
    const at = bytes.indexOf(Buffer.from("q8_0", "latin1"), bytes.indexOf(Buffer.from("bf16")) + 1);
    expect(bytes.readUInt32LE(at + 4)).toBe(2);
    expect([bytes.readBigUInt64LE(at + 8), bytes.readBigUInt64LE(at + 16)]).toEqual([32n, 2n]);
    expect(bytes.readUInt32LE(at + 24)).toBe(8);
    disposeWeights(back.tensors);
    for (const [, t] of tensors) t.dispose();
  });

  test("truncated files, absurd counts, bad magic and unsupported types are refused naming the file", () => {
    const good = tmp("good.gguf");
    const t = Tensor.from(new Float32Array(8).fill(2), [8]);
    writeGguf(good, [["general.architecture", gguf.string("mamba")]], [["w", t]]);
    t.dispose();
    const bytes = fs.readFileSync(good);
    const cut = tmp("cut.gguf");
    fs.writeFileSync(cut, bytes.subarray(0, bytes.length - 4));
    expect(() => readGguf(cut)).toThrow(/cut\.gguf: truncated: tensor "w" \(F32 \[8\], 32 bytes at data offset 0\) reaches beyond/);
    fs.writeFileSync(cut, bytes.subarray(0, 30));
    expect(() => readGgufHeader(cut)).toThrow(/cut\.gguf: truncated/);

    const absurd = new GgufBytes().raw(Buffer.from("GGUF")).u32(3).u64(0).u64(1);
    absurd.str("tokens").u32(9).u32(8).u64(2n ** 50n);
    const absurdFile = tmp("absurd.gguf");
    fs.writeFileSync(absurdFile, absurd.bytes());
    expect(() => readGgufHeader(absurdFile)).toThrow(/absurd\.gguf: truncated or corrupt: key "tokens" claims 1125899906842624 string items/);
    const manyKeys = new GgufBytes().raw(Buffer.from("GGUF")).u32(3).u64(0).u64(2n ** 40n);
    fs.writeFileSync(absurdFile, manyKeys.bytes());
    expect(() => readGgufHeader(absurdFile)).toThrow(/1099511627776 key\/values cannot fit/);

    const magic = tmp("magic.gguf");
    fs.writeFileSync(magic, Buffer.from("GGML\u0003\u0000\u0000\u0000"));
    expect(() => readGgufHeader(magic)).toThrow(/magic\.gguf: not a GGUF file: magic is "GGML"/);

    const q4 = new GgufBytes().raw(Buffer.from("GGUF")).u32(3).u64(1).u64(0);
    q4.str("blk.0.ssm_in.weight").u32(1).u64(32).u32(2).u64(0).pad(32).raw(Buffer.alloc(18));
    const q4File = tmp("q4.gguf");
    fs.writeFileSync(q4File, q4.bytes());
    expect(() => readGguf(q4File)).toThrow(/q4\.gguf: tensor "blk\.0\.ssm_in\.weight" has ggml type Q4_0 \(2\), which is not supported/);
  });
});

describe("Python JSON", () => {
  test("Infinity, -Infinity and NaN outside strings parse and print as Python writes them", () => {
    const v = parsePythonJson('{"limit": [0.0, Infinity], "low": -Infinity, "s": "Infinity", "n": NaN}') as Record<string, unknown>;
    expect(v.limit).toEqual([0, Infinity]);
    expect(v.low).toBe(-Infinity);
    expect(v.s).toBe("Infinity");
    expect(Number.isNaN(v.n)).toBe(true);
    expect(stringifyPythonJson({ a: [0, Infinity], s: "Infinity" }, 0)).toBe('{"a":[0,Infinity],"s":"Infinity"}');
  });
});

describe("checkpoints", () => {
  function roundTrip(config: MambaConfig, format: "safetensors" | "gguf", dtype: "f32" | "bf16" | "q8_0" | undefined, seed: number) {
    const weights = randomWeights(config, seed);
    const target = format === "gguf" ? tmp("model.gguf") : tmp("hf");
    saveCheckpoint(target, { config, weights }, { format, dtype });
    const loaded = loadCheckpoint(target);
    return { weights, loaded, target };
  }

  function checkWeights(config: MambaConfig, original: Map<string, Tensor>, loaded: Map<string, Tensor>, dtype?: "bf16" | "q8_0") {
    expect([...loaded.keys()].sort()).toEqual([...expectedShapes(config).keys()].sort());
    for (const [name, t] of original) {
      const r = loaded.get(name)!;
      if (!isMatrixWeight(name)) {
        expect(r.dtype).toBe("f32");
        // A goes through A_log = log(-A) and back in the Hugging Face format: within an ulp or two.
        expectSameValues(r, t, name.endsWith(".A") ? 4e-7 : 0);
        continue;
      }
      if (!dtype) {
        expect(r.dtype).toBe("f32");
        expectSameValues(r, t);
      } else if (dtype === "bf16") {
        expect(r.dtype).toBe("bf16");
        expectSameValues(r, t, 2 ** -8);
      } else {
        const whole = t.shape[t.shape.length - 1] % 32 === 0;
        expect(r.dtype).toBe(whole ? "q8_0" : "f16");
        // q8_0: half a step of the block's scale (amax/127/2) with values up to 1 in magnitude.
        const a = r.toArray(), e = t.toArray();
        let worst = 0;
        for (let i = 0; i < e.length; i++) worst = Math.max(worst, Math.abs(a[i] - e[i]));
        expect(worst).toBeLessThanOrEqual(whole ? 1 / 127 / 2 + 1e-3 : 1e-3);
      }
    }
  }

  test.each([
    ["Mamba-1, biases, untied head, odd sizes", mamba1],
    ["Mamba-2, 2 groups, biases, untied head, odd sizes", mamba2],
    ["Mamba-2 tied", { ...mamba2, tieEmbeddings: true, useBias: false, useConvBias: false, timeStepLimit: [0, Infinity] as [number, number] }],
  ])("Hugging Face folder round trip (%s): same config, same weights", (_label, config) => {
    const { weights, loaded, target } = roundTrip(config, "safetensors", undefined, 11);
    expect(loaded.format).toBe("hf");
    expect(loaded.source).toBe(target);
    expect(loaded.config).toEqual(config);
    checkWeights(config, weights, loaded.weights);
    const json = JSON.parse(fs.readFileSync(path.join(target, "config.json"), "utf8").replace(/Infinity/g, "1e999"));
    expect(json.model_type).toBe(config.architecture === "mamba1" ? "mamba" : "mamba2");
    const header = readSafetensorsHeader(path.join(target, "model.safetensors"));
    expect(header.metadata).toEqual({ format: "pt" });
    expect(header.entries.has("lm_head.weight")).toBe(!config.tieEmbeddings);
    expect(header.entries.get("backbone.layers.1.mixer.conv1d.weight")!.shape).toEqual([expectedShapes(config).get("layers.1.conv")![0], 1, config.convKernel]);
    const aLog = config.architecture === "mamba1" ? "backbone.layers.0.mixer.dt_proj.bias" : "backbone.layers.0.mixer.dt_bias";
    expect(header.entries.has(aLog)).toBe(true);
    disposeWeights(loaded.weights);
    disposeWeights(weights);
  });

  test.each([
    ["Mamba-1", mamba1],
    ["Mamba-2", mamba2],
  ])("GGUF round trip in f32 (%s): same config, weights bit for bit, llama.cpp names and shapes", (_label, config) => {
    const { weights, loaded, target } = roundTrip(config, "gguf", undefined, 5);
    expect(loaded.format).toBe("gguf");
    expect(loaded.config).toEqual(config);
    checkWeights(config, weights, loaded.weights);
    const header = readGgufHeader(target);
    const arch = config.architecture === "mamba1" ? "mamba" : "mamba2";
    expect(header.metadata.get("general.architecture")!.value).toBe(arch);
    expect(header.metadata.get(`${arch}.feed_forward_length`)!.value).toBe(0);
    expect(header.metadata.get(`${arch}.attention.head_count`)!.value).toBe(0);
    const shapes = new Map(header.tensors.map((t) => [t.name, t.shape]));
    if (config.architecture === "mamba2") {
      expect(shapes.get("blk.0.ssm_a")).toEqual([config.numHeads, 1]);
      expect(shapes.get("blk.0.ssm_d")).toEqual([config.numHeads, 1]);
      expect(shapes.get("blk.1.ssm_norm.weight")).toEqual([config.numGroups, config.intermediateSize / config.numGroups]);
      expect(header.metadata.get("mamba2.ssm.group_count")!.value).toBe(config.numGroups);
      expect(header.metadata.get("mamba2.ssm.time_step_rank")!.value).toBe(config.numHeads);
    } else {
      expect(shapes.get("blk.0.ssm_a")).toEqual([config.intermediateSize, config.stateSize]);
      expect(shapes.get("blk.0.ssm_x.weight")).toEqual([config.timeStepRank + 2 * config.stateSize, config.intermediateSize]);
    }
    expect(shapes.get("blk.0.ssm_conv1d.weight")).toEqual(expectedShapes(config).get("layers.0.conv"));
    expect(shapes.has("output.weight")).toBe(true);
    disposeWeights(loaded.weights);
    disposeWeights(weights);
  });

  test.each([
    ["Mamba-1 bf16", mamba1, "bf16"],
    ["Mamba-2 bf16", mamba2, "bf16"],
    ["Mamba-1 q8_0", mamba1q8, "q8_0"],
    ["Mamba-2 q8_0", mamba2q8, "q8_0"],
  ] as const)("GGUF %s: matrices in the dtype within its rounding, the rest kept f32", (_label, config, dtype) => {
    const { weights, loaded, target } = roundTrip(config, "gguf", dtype, 9);
    expect(loaded.config).toEqual(config);
    checkWeights(config, weights, loaded.weights, dtype);
    const types = new Map(readGgufHeader(target).tensors.map((t) => [t.name, t.ggmlType]));
    expect(types.get("blk.0.ssm_conv1d.weight")).toBe(0);
    expect(types.get("blk.0.ssm_a")).toBe(0);
    expect(types.get("token_embd.weight")).toBe(dtype === "bf16" ? 30 : 8);
    expect(readGgufHeader(target).metadata.get("general.file_type")!.value).toBe(dtype === "bf16" ? 32 : 7);
    disposeWeights(loaded.weights);
    disposeWeights(weights);
  });

  test("Hugging Face folder in bf16, and options.dtype converting matrices at load", () => {
    const { weights, loaded, target } = roundTrip(mamba2, "safetensors", "bf16", 3);
    checkWeights(mamba2, weights, loaded.weights, "bf16");
    disposeWeights(loaded.weights);
    const asQ8 = loadCheckpoint(target, { dtype: "q8_0" });
    // in_proj rows of 48 values are not whole q8_0 blocks (48 % 32 != 0), so they stay f32; out_proj rows of 96 are.
    expect(asQ8.weights.get("layers.0.in_proj")!.dtype).toBe("f32");
    expect(asQ8.weights.get("layers.0.out_proj")!.dtype).toBe("q8_0");
    expect(asQ8.weights.get("layers.0.D")!.dtype).toBe("f32");
    disposeWeights(asQ8.weights);
    const asF32 = loadCheckpoint(target, { dtype: "f32" });
    expect(asF32.weights.get("embeddings")!.dtype).toBe("f32");
    disposeWeights(asF32.weights);
    expect(() => saveCheckpoint(tmp("hf-q8"), { config: mamba2, weights }, { format: "safetensors", dtype: "q8_0" })).toThrow(
      /q8_0 is not a safetensors dtype/,
    );
    disposeWeights(weights);
  });

  test("Hugging Face config.json defaults: time_step_rank auto, intermediate_size from expand, Infinity limits, tied when lm_head is absent", () => {
    const folder = tmp("hf-defaults");
    fs.mkdirSync(folder);
    fs.writeFileSync(
      path.join(folder, "config.json"),
      '{"model_type": "mamba", "hidden_size": 40, "num_hidden_layers": 1, "vocab_size": 16, "tie_word_embeddings": false}',
    );
    const config: MambaConfig = { ...mamba1, numLayers: 1, vocabSize: 16, stateSize: 16, convKernel: 4, timeStepRank: 3, useBias: false, tieEmbeddings: true };
    delete config.bosTokenId;
    delete config.eosTokenId;
    const weights = randomWeights(config, 21);
    saveCheckpoint(path.join(dir, "scratch-defaults"), { config, weights }, { format: "safetensors" });
    fs.copyFileSync(path.join(dir, "scratch-defaults", "model.safetensors"), path.join(folder, "model.safetensors"));
    const loaded = loadCheckpoint(path.join(folder, "config.json"));
    expect(loaded.config).toEqual(config);
    disposeWeights(loaded.weights);

    const folder2 = tmp("hf2-defaults");
    fs.mkdirSync(folder2);
    fs.writeFileSync(
      path.join(folder2, "config.json"),
      '{"architectures": ["Mamba2ForCausalLM"], "hidden_size": 48, "num_hidden_layers": 2, "vocab_size": 53, "expand": 2, "head_dim": 16, "n_groups": 2, "state_size": 7, "time_step_limit": [0.001, Infinity], "use_bias": true, "layer_norm_epsilon": 1e-6, "chunk_size": 64}',
    );
    const c2 = { ...mamba2, timeStepLimit: [0.001, Infinity] as [number, number] };
    const w2 = randomWeights(c2, 4);
    saveCheckpoint(path.join(dir, "scratch-2"), { config: c2, weights: w2 }, { format: "safetensors" });
    fs.copyFileSync(path.join(dir, "scratch-2", "model.safetensors"), path.join(folder2, "model.safetensors"));
    const l2 = loadCheckpoint(folder2);
    expect(l2.config).toEqual(c2);
    disposeWeights(l2.weights);
    disposeWeights(w2);
    disposeWeights(weights);
  });

  test("mamba_ssm folder: d_model / n_layer / ssm_cfg, vocabulary padded, embedding (singular), tied by default", () => {
    const folder = tmp("mamba-ssm");
    fs.mkdirSync(folder);
    fs.writeFileSync(
      path.join(folder, "config.json"),
      JSON.stringify({ d_model: 48, n_layer: 2, vocab_size: 50, pad_vocab_size_multiple: 16, d_intermediate: 0, attn_layer_idx: [],
        ssm_cfg: { layer: "Mamba2", d_state: 7, headdim: 16, ngroups: 2, chunk_size: 64, bias: true }, rms_norm: true }),
    );
    const config: MambaConfig = { ...mamba2, vocabSize: 64, normEps: 1e-5, timeStepLimit: [0, Infinity], tieEmbeddings: true };
    const weights = randomWeights(config, 8);
    const named = new Map<string, Tensor>();
    named.set("backbone.embedding.weight", weights.get("embeddings")!);
    named.set("backbone.norm_f.weight", weights.get("norm_f")!);
    const aLogs: Tensor[] = [];
    for (let i = 0; i < 2; i++) {
      const p = `layers.${i}.`, q = `backbone.layers.${i}.mixer.`;
      named.set(`backbone.layers.${i}.norm.weight`, weights.get(p + "norm")!);
      named.set(q + "in_proj.weight", weights.get(p + "in_proj")!);
      named.set(q + "in_proj.bias", weights.get(p + "in_proj_bias")!);
      const conv = weights.get(p + "conv")!;
      named.set(q + "conv1d.weight", conv.reshape([conv.shape[0], 1, conv.shape[1]]));
      named.set(q + "conv1d.bias", weights.get(p + "conv_bias")!);
      named.set(q + "dt_bias", weights.get(p + "dt_bias")!);
      const aLog = Tensor.from(Array.from(weights.get(p + "A")!.data, (a) => Math.log(-a)));
      aLogs.push(aLog);
      named.set(q + "A_log", aLog);
      named.set(q + "D", weights.get(p + "D")!);
      named.set(q + "norm.weight", weights.get(p + "ssm_norm")!);
      named.set(q + "out_proj.weight", weights.get(p + "out_proj")!);
      named.set(q + "out_proj.bias", weights.get(p + "out_proj_bias")!);
    }
    writeSafetensors(path.join(folder, "model.safetensors"), named);
    fs.writeFileSync(path.join(folder, "tokenizer.json"), "{}");
    const loaded = loadCheckpoint(folder);
    expect(loaded.format).toBe("mamba_ssm");
    expect(loaded.config).toEqual(config);
    expect(loaded.tokenizer).toEqual({ kind: "tokenizer.json", path: path.join(folder, "tokenizer.json") });
    checkWeights(config, weights, loaded.weights);
    disposeWeights(loaded.weights);
    disposeWeights(weights);
    aLogs.forEach((t) => t.dispose());
  });

  test("tokenizers: tokenizer.json written into GGUF as gpt2 tables padded to the vocabulary, and read back", () => {
    const folder = tmp("tok");
    fs.mkdirSync(folder);
    // The GPT-NeoX-style byte-level BPE of the model fixtures: <|endoftext|> at 0, 256 byte tokens, 16 merges.
    const tokenizerFile = path.join(folder, "tokenizer.json");
    fs.copyFileSync(path.join(__dirname, "fixtures", "models", "tokenizer.json"), tokenizerFile);
    const original = JSON.parse(fs.readFileSync(tokenizerFile, "utf8"));
    const count = Object.keys(original.model.vocab).length;
    const config: MambaConfig = { ...mamba1, vocabSize: count + 3, bosTokenId: 0, eosTokenId: 0 };
    const weights = randomWeights(config, 2);
    const file = tmp("tok.gguf");
    saveCheckpoint(file, { config, weights, tokenizer: { kind: "tokenizer.json", path: tokenizerFile } }, { format: "gguf" });
    const loaded = loadCheckpoint(file);
    const source = loaded.tokenizer as { kind: string; model: string; tokens: string[]; tokenTypes: number[]; merges: string[]; bos: number; eos: number };
    expect(source.kind).toBe("gguf");
    expect(source.model).toBe("gpt2");
    expect(source.tokens.length).toBe(count + 3);
    expect(source.tokens.slice(count)).toEqual([`[PAD${count}]`, `[PAD${count + 1}]`, `[PAD${count + 2}]`]);
    expect(source.tokenTypes.slice(count)).toEqual([5, 5, 5]);
    expect(source.tokens[0]).toBe("<|endoftext|>");
    expect(source.tokenTypes[0]).toBe(3);
    for (const [token, id] of Object.entries(original.model.vocab as Record<string, number>)) expect(source.tokens[id]).toBe(token);
    expect(source.merges).toEqual(original.model.merges.map((m: string | string[]) => (Array.isArray(m) ? m.join(" ") : m)));
    expect([source.bos, source.eos]).toEqual([0, 0]);
    expect(loaded.config.eosTokenId).toBe(0);
    // And back to a folder: the GGUF tables become a byte-level BPE tokenizer.json with the same vocabulary.
    const out = tmp("tok-hf");
    saveCheckpoint(out, { config: loaded.config, weights: loaded.weights, tokenizer: loaded.tokenizer }, { format: "safetensors" });
    const json = JSON.parse(fs.readFileSync(path.join(out, "tokenizer.json"), "utf8"));
    // Every token keeps its id, in the BPE vocabulary or (control tokens) among the added tokens.
    const ids = new Map<string, number>(Object.entries(json.model.vocab as Record<string, number>));
    for (const t of json.added_tokens as Array<{ id: number; content: string }>) ids.set(t.content, t.id);
    expect(Object.fromEntries(ids)).toEqual(original.model.vocab);
    expect(json.model.merges.map((m: string | string[]) => (Array.isArray(m) ? m.join(" ") : m))).toEqual(source.merges);
    expect(json.added_tokens.find((t: { id: number }) => t.id === 0)).toMatchObject({ content: "<|endoftext|>", special: true });
    disposeWeights(loaded.weights);
    disposeWeights(weights);
  });

  describe("loader errors name the file and the problem", () => {
    let folder: string;
    let weights: Map<string, Tensor>;
    beforeAll(() => {
      weights = randomWeights(mamba1, 1);
      folder = tmp("errors-src");
      saveCheckpoint(folder, { config: mamba1, weights }, { format: "safetensors" });
    });
    afterAll(() => disposeWeights(weights));

    function variant(edit: (tensors: Map<string, Tensor>, config: Record<string, unknown>) => void): string {
      const out = tmp("variant");
      fs.mkdirSync(out);
      const { tensors } = readSafetensors(path.join(folder, "model.safetensors"));
      const config = JSON.parse(fs.readFileSync(path.join(folder, "config.json"), "utf8"));
      edit(tensors, config);
      writeSafetensors(path.join(out, "model.safetensors"), tensors);
      fs.writeFileSync(path.join(out, "config.json"), JSON.stringify(config));
      disposeWeights(tensors);
      return out;
    }

    test("missing tensor", () => {
      const out = variant((t) => t.delete("backbone.layers.1.mixer.D"));
      expect(() => loadCheckpoint(out)).toThrow(/model\.safetensors: missing tensor for layers\.1\.D \(expected shape \[80\]\)/);
    });

    test("wrong shape", () => {
      const out = variant((t) => t.set("backbone.layers.0.mixer.x_proj.weight", Tensor.zeros([13, 79])));
      expect(() => loadCheckpoint(out)).toThrow(
        /model\.safetensors: tensor "backbone\.layers\.0\.mixer\.x_proj\.weight" \(layers\.0\.x_proj\) has shape \[13, 79\], expected \[13, 80\]/,
      );
      const conv = variant((t) => t.set("backbone.layers.0.mixer.conv1d.weight", Tensor.zeros([80, 3])));
      expect(() => loadCheckpoint(conv)).toThrow(/conv1d\.weight" has shape \[80, 3\], expected \[channels, 1, kernel\]/);
    });

    test("config missing a field, or of an unknown model type", () => {
      const out = variant((_t, c) => delete c.hidden_size);
      expect(() => loadCheckpoint(out)).toThrow(new RegExp(`${out}/config\\.json: config field "hidden_size" is missing`));
      const llama = variant((_t, c) => {
        c.model_type = "llama";
        c.architectures = ["LlamaForCausalLM"];
      });
      expect(() => loadCheckpoint(llama)).toThrow(/config\.json: not a Mamba config: model_type is "llama"/);
      const wrongType = variant((_t, c) => (c.state_size = "16"));
      expect(() => loadCheckpoint(wrongType)).toThrow(/config field "state_size" must be an integer >= 1, found "16"/);
    });

    test("unknown dtype and truncated safetensors", () => {
      const out = variant(() => undefined);
      const file = path.join(out, "model.safetensors");
      const bytes = fs.readFileSync(file);
      fs.writeFileSync(file, bytes.subarray(0, bytes.length - 100));
      expect(() => loadCheckpoint(out)).toThrow(/model\.safetensors: tensor ".*": data_offsets .* reach beyond/);
      const text = bytes.toString("latin1").replace('"dtype":"F32"', '"dtype":"Q99"');
      fs.writeFileSync(file, Buffer.from(text, "latin1"));
      expect(() => loadCheckpoint(out)).toThrow(/model\.safetensors: tensor ".*": unknown dtype "Q99"/);
    });

    test("pytorch_model.bin only: refused with a hint to convert; no weights at all: says what it looked for", () => {
      const out = tmp("bin");
      fs.mkdirSync(out);
      fs.copyFileSync(path.join(folder, "config.json"), path.join(out, "config.json"));
      expect(() => loadCheckpoint(out)).toThrow(/no weights found: expected model\.safetensors or model\.safetensors\.index\.json/);
      fs.writeFileSync(path.join(out, "pytorch_model.bin"), "x");
      expect(() => loadCheckpoint(out)).toThrow(/pytorch_model\.bin \(PyTorch pickle\), which is not supported\. Convert them to safetensors/);
      expect(() => loadCheckpoint(path.join(dir, "nowhere"))).toThrow(/nowhere: no such file or folder/);
    });

    test("GGUF: truncated file, missing key, missing tensor, wrong architecture", () => {
      const file = tmp("err.gguf");
      saveCheckpoint(file, { config: mamba1, weights }, { format: "gguf" });
      const bytes = fs.readFileSync(file);
      const cut = tmp("cut.gguf");
      fs.writeFileSync(cut, bytes.subarray(0, bytes.length - 64));
      expect(() => loadCheckpoint(cut)).toThrow(/cut\.gguf: truncated: tensor/);
      const { metadata, tensors } = readGguf(file);
      const rewrite = (edit: () => void): string => {
        const m = new Map(metadata), t = new Map(tensors);
        const saved = [new Map(metadata), new Map(tensors)] as const;
        metadata.clear(); tensors.clear();
        for (const [k, v] of m) metadata.set(k, v);
        for (const [k, v] of t) tensors.set(k, v);
        edit();
        const out = tmp("edit.gguf");
        writeGguf(out, metadata, tensors);
        metadata.clear(); tensors.clear();
        for (const [k, v] of saved[0]) metadata.set(k, v);
        for (const [k, v] of saved[1]) tensors.set(k, v);
        return out;
      };
      const noKey = rewrite(() => metadata.delete("mamba.ssm.state_size"));
      expect(() => loadCheckpoint(noKey)).toThrow(/edit\.gguf: missing key "mamba\.ssm\.state_size"/);
      const noTensor = rewrite(() => tensors.delete("blk.1.ssm_out.weight"));
      expect(() => loadCheckpoint(noTensor)).toThrow(/edit\.gguf: missing tensor for layers\.1\.out_proj \(expected shape \[40, 80\]\)/);
      const llama = rewrite(() => metadata.set("general.architecture", gguf.string("llama")));
      expect(() => loadCheckpoint(llama)).toThrow(/general\.architecture is "llama"; expected "mamba" or "mamba2"/);
      disposeWeights(tensors);
    });

    test("saving a checkpoint with a missing weight writes nothing, and leaves no temporary files", () => {
      const partial = new Map(weights);
      partial.delete("layers.0.A");
      const out = tmp("partial.gguf");
      expect(() => saveCheckpoint(out, { config: mamba1, weights: partial }, { format: "gguf" })).toThrow(/weight layers\.0\.A is missing \(expected shape \[80, 5\]\)/);
      expect(fs.existsSync(out)).toBe(false);
      expect(fs.readdirSync(dir).filter((f) => f.endsWith(".tmp"))).toEqual([]);
    });
  });
});
