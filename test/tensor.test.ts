import { Tensor } from "../lib";

describe("Tensor", () => {
  test("from a Float32Array gives an f32 tensor whose data view shares its memory", () => {
    const t = Tensor.from(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3]);
    expect(t.dtype).toBe("f32");
    expect(t.shape).toEqual([2, 3]);
    expect(t.size).toBe(6);
    expect(t.byteLength).toBe(24);
    const view = t.data as Float32Array;
    view[4] = 42;
    expect(Array.from(t.data)).toEqual([1, 2, 3, 4, 42, 6]);
    expect(t.toArray()[4]).toBe(42);
    t.dispose();
  });

  test("from an Int32Array gives i32; non-integers are refused for i32", () => {
    const t = Tensor.from(new Int32Array([7, -3, 2147483647]));
    expect(t.dtype).toBe("i32");
    expect(Array.from(t.toArray())).toEqual([7, -3, 2147483647]);
    expect(() => Tensor.from([1.5], [1], "i32")).toThrow(/value 1.5 at 0 is not a 32-bit integer/);
  });

  test("bf16 and f16 round values to their precision; q8_0 keeps blocks of 32 with an fp16 scale", () => {
    const values = Float32Array.from({ length: 64 }, (_, i) => Math.sin(i) * (i + 1));
    const bf = Tensor.from(values, [2, 32], "bf16");
    expect(bf.byteLength).toBe(128);
    const h = Tensor.from(values, [2, 32], "f16");
    const q = Tensor.from(values, [2, 32], "q8_0");
    expect(q.byteLength).toBe(2 * 34);
    const back = { bf16: bf.toArray(), f16: h.toArray(), q8_0: q.toArray() };
    // bf16 keeps 8 significant bits, f16 11: relative errors at most 2^-8 and 2^-11.
    values.forEach((v, i) => {
      expect(Math.abs(back.bf16[i] - v)).toBeLessThanOrEqual(Math.abs(v) * 2 ** -8);
      expect(Math.abs(back.f16[i] - v)).toBeLessThanOrEqual(Math.abs(v) * 2 ** -11);
    });
    // q8_0: the error of each value is at most half a step of its block (amax/127/2), plus the scale's fp16 rounding.
    for (let b = 0; b < 2; b++) {
      const block = values.subarray(b * 32, b * 32 + 32);
      const amax = Math.max(...Array.from(block, Math.abs));
      block.forEach((v, j) => expect(Math.abs(back.q8_0[b * 32 + j] - v)).toBeLessThanOrEqual((amax / 127) * 0.5 + amax * 2 ** -10));
    }
    expect(() => Tensor.from(new Float32Array(30), [30], "q8_0")).toThrow(/multiple of 32/);
  });

  test("fromBytes copies raw bytes of a dtype and checks their length", () => {
    const bits = new Uint16Array([0x3f80, 0xc000, 0x4049]); // bf16 1, -2, 3.140625
    const t = Tensor.fromBytes(new Uint8Array(bits.buffer), "bf16", [3]);
    expect(Array.from(t.toArray())).toEqual([1, -2, 3.140625]);
    expect(() => Tensor.fromBytes(new Uint8Array(5), "bf16", [3])).toThrow("bf16 [3] needs 6 bytes, got 5");
    expect(() => Tensor.fromBytes(new Uint8Array(4), "f64" as never, [1])).toThrow(/unknown dtype "f64"/);
  });

  test("data has no view for packed dtypes and says what to use instead", () => {
    const t = Tensor.zeros([32], "q8_0");
    expect(() => t.data).toThrow('no typed-array view of q8_0; use toArray() or to("f32")');
  });

  test("dispose frees the memory: views become empty and every further use throws", () => {
    const t = Tensor.from([1, 2, 3]);
    const view = t.data;
    expect(t.disposed).toBe(false);
    t.dispose();
    expect(t.disposed).toBe(true);
    expect(view.length).toBe(0);
    expect(() => t.data).toThrow("tensor has been disposed");
    expect(() => t.toArray()).toThrow("has been disposed");
    expect(() => t.clone()).toThrow("has been disposed");
    t.dispose(); // a second dispose is harmless
  });

  test("reshape shares memory and checks the element count", () => {
    const t = Tensor.from(Float32Array.from({ length: 12 }, (_, i) => i), [3, 4]);
    const r = t.reshape([2, -1, 3]);
    expect(r.shape).toEqual([2, 2, 3]);
    (t.data as Float32Array)[0] = 99;
    expect(r.data[0]).toBe(99);
    expect(() => t.reshape([5, 2])).toThrow("[3, 4] (12 elements) cannot become [5, 2]");
    t.dispose();
    expect(r.disposed).toBe(true);
  });

  test("fresh tensors are zero, small (zero-filled) and large (mapped pages, reused once freed) alike, after dirty ones are freed", () => {
    for (const n of [1000, 1 << 20]) {
      // 4 KB and 4 MiB: below and above the size from which native memory is mapped directly; the
      // second tensor of 4 MiB gets the mapping the first one freed, which must be cleared
      const dirty = Tensor.zeros([n]);
      (dirty.data as Float32Array).fill(7);
      dirty.dispose();
      const fresh = Tensor.zeros([n]);
      const values = fresh.data as Float32Array;
      let nonZero = 0;
      for (let i = 0; i < n; i++) if (values[i] !== 0) nonZero++;
      expect({ n, nonZero }).toEqual({ n, nonZero: 0 });
      fresh.dispose();
    }
  });

  test("shapes must be non-negative integers and fit the values", () => {
    expect(() => Tensor.zeros([2, -1])).toThrow("invalid size -1");
    expect(() => Tensor.from([1, 2, 3], [2, 2])).toThrow("3 values do not fill shape [2, 2] (4 elements)");
  });

  test("dropped tensors are reclaimed by the garbage collector (their bytes are reported to V8)", async () => {
    const gc = (global as { gc?: () => void }).gc;
    expect(typeof gc).toBe("function"); // npm test runs jest with --expose-gc
    const tick = () => new Promise((resolve) => setImmediate(resolve));
    const before = process.memoryUsage().rss;
    for (let i = 0; i < 50; i++) {
      (Tensor.zeros([1 << 24]).data as Float32Array).fill(1); // 64 MiB each, touched: 3.2 GiB if none were freed
      if (i % 10 === 9) await tick();
    }
    gc!();
    await tick();
    expect(process.memoryUsage().rss - before).toBeLessThan(1.5 * 2 ** 30);
  });
});
