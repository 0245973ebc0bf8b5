// The pieces a training run is built from, none of which need the native addon: the learning-rate
// schedule, byte data and its samplers, the loss files, and the progress display.
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { BatchSampler, ByteDataset, evaluationBatches } from "../lib/training/data";
import { lossCsv, LossPoint, lossSvg, writeLossFiles } from "../lib/training/plot";
import { formatDuration, ProgressBar } from "../lib/training/progress";
import { learningRate, LrSchedule } from "../lib/training/schedule";

function temporaryDirectory(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "mamba-training-"));
}

function bytesOf(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

describe("learningRate", () => {
  const schedule: LrSchedule = { lr: 1e-3, warmupSteps: 10, totalSteps: 110 };

  test("warms up linearly from lr/warmupSteps to lr", () => {
    expect(learningRate(schedule, 0)).toBeCloseTo(1e-4, 12);
    expect(learningRate(schedule, 4)).toBeCloseTo(5e-4, 12);
    expect(learningRate(schedule, 9)).toBeCloseTo(1e-3, 12);
  });

  test("decays along a cosine from lr to lr/10 by totalSteps", () => {
    expect(learningRate(schedule, 10)).toBeCloseTo(1e-3, 12);
    // t = 1/4: 1e-4 + 4.5e-4 · (1 + cos(π/4)) = 8.68198e-4.
    expect(learningRate(schedule, 35)).toBeCloseTo(8.681980515e-4, 12);
    expect(learningRate(schedule, 60)).toBeCloseTo(5.5e-4, 12);
    expect(learningRate(schedule, 110)).toBeCloseTo(1e-4, 12);
  });

  test("stays at minLr past the end", () => {
    expect(learningRate(schedule, 111)).toBeCloseTo(1e-4, 12);
    expect(learningRate({ ...schedule, minLr: 0 }, 10_000)).toBe(0);
  });

  test("without warmup starts at the peak", () => {
    expect(learningRate({ lr: 2e-3, warmupSteps: 0, totalSteps: 100, minLr: 2e-4 }, 0)).toBeCloseTo(2e-3, 12);
    expect(learningRate({ lr: 2e-3, warmupSteps: 0, totalSteps: 100, minLr: 2e-4 }, 50)).toBeCloseTo(1.1e-3, 12);
  });

  test("rejects unusable fields with a RangeError naming the field and value", () => {
    expect(() => learningRate({ ...schedule, lr: 0 }, 0)).toThrow(/lr .*got 0/);
    expect(() => learningRate({ ...schedule, lr: NaN }, 0)).toThrow(RangeError);
    expect(() => learningRate({ ...schedule, warmupSteps: -1 }, 0)).toThrow(/warmupSteps .*got -1/);
    expect(() => learningRate({ ...schedule, warmupSteps: 1.5 }, 0)).toThrow(/warmupSteps .*got 1.5/);
    expect(() => learningRate({ ...schedule, totalSteps: 0 }, 0)).toThrow(/totalSteps .*got 0/);
    expect(() => learningRate({ ...schedule, minLr: 2e-3 }, 0)).toThrow(/minLr .*got 0.002/);
    expect(() => learningRate({ ...schedule, minLr: -1 }, 0)).toThrow(RangeError);
    expect(() => learningRate(schedule, -1)).toThrow(/step .*got -1/);
  });
});

describe("ByteDataset", () => {
  test("holds out the last 5% for validation by default", () => {
    const bytes = bytesOf(1000);
    const data = ByteDataset.fromBytes(bytes);
    expect(data.train.length).toBe(950);
    expect(data.validation.length).toBe(50);
    expect(Array.from(data.validation)).toEqual(Array.from(bytes.subarray(950)));
    expect(data.source).toBe("<bytes>");
  });

  test("reads a file and splits by the fraction asked for", () => {
    const dir = temporaryDirectory();
    const file = path.join(dir, "corpus.txt");
    fs.writeFileSync(file, "abcdefghij".repeat(10));
    const data = ByteDataset.fromFile(file, { validationFraction: 0.2 });
    expect(data.train.length).toBe(80);
    expect(data.validation.length).toBe(20);
    expect(Buffer.from(data.train.subarray(0, 3)).toString()).toBe("abc");
    expect(data.source).toBe(file);
    expect(ByteDataset.fromFile(file, { validationFraction: 0 }).validation.length).toBe(0);
  });

  test("names the path of a missing file or a folder", () => {
    const dir = temporaryDirectory();
    const missing = path.join(dir, "nope.txt");
    expect(() => ByteDataset.fromFile(missing)).toThrow(missing);
    expect(() => ByteDataset.fromFile(dir)).toThrow(dir);
  });

  test("refuses an empty file and a fraction outside [0, 0.5]", () => {
    const dir = temporaryDirectory();
    const empty = path.join(dir, "empty.txt");
    fs.writeFileSync(empty, "");
    expect(() => ByteDataset.fromFile(empty)).toThrow(/empty/);
    expect(() => ByteDataset.fromBytes(bytesOf(100), { validationFraction: 0.6 })).toThrow(/validationFraction .*0.6/);
    expect(() => ByteDataset.fromBytes(bytesOf(100), { validationFraction: -0.1 })).toThrow(RangeError);
  });
});

describe("BatchSampler", () => {
  const data = bytesOf(5000, 7);
  const [batch, length] = [4, 16];

  test("the same seed draws the same batches, another seed others", () => {
    const a = new BatchSampler(data, batch, length, 42);
    const b = new BatchSampler(data, batch, length, 42);
    const c = new BatchSampler(data, batch, length, 43);
    for (let i = 0; i < 3; i++) {
      const [x, y, z] = [a.next(), b.next(), c.next()];
      expect(Array.from(x.ids)).toEqual(Array.from(y.ids));
      expect(Array.from(x.ids)).not.toEqual(Array.from(z.ids));
    }
  });

  test("a resumed sampler continues the stream exactly", () => {
    const fresh = new BatchSampler(data, batch, length, 9);
    const expected = Array.from({ length: 6 }, () => fresh.next());
    const first = new BatchSampler(data, batch, length, 9);
    for (let i = 0; i < 5; i++) first.next();
    const position = first.position;
    expect(position).toEqual({ seed: 9, draws: 5 });
    const resumed = BatchSampler.resume(data, batch, length, JSON.parse(JSON.stringify(position)));
    const sixth = resumed.next();
    expect(Array.from(sixth.ids)).toEqual(Array.from(expected[5].ids));
    expect(Array.from(sixth.targets)).toEqual(Array.from(expected[5].targets));
    expect(resumed.position.draws).toBe(6);
  });

  test("each row is a window of the data and its targets are the ids shifted by one", () => {
    const sampler = new BatchSampler(data, batch, length, 1);
    const text = Buffer.from(data).toString("latin1");
    for (let draw = 0; draw < 20; draw++) {
      const { ids, targets } = sampler.next();
      expect(ids.length).toBe(batch * length);
      expect(targets.length).toBe(batch * length);
      for (let row = 0; row < batch; row++) {
        const window = [...ids.subarray(row * length, (row + 1) * length), targets[(row + 1) * length - 1]];
        const start = text.indexOf(String.fromCharCode(...window));
        expect(start).toBeGreaterThanOrEqual(0);
        expect(start + length + 1).toBeLessThanOrEqual(data.length);
        for (let i = 0; i < length - 1; i++) expect(targets[row * length + i]).toBe(ids[row * length + i + 1]);
      }
    }
  });

  test("windows reach both ends of data barely longer than one window", () => {
    const small = Uint8Array.from({ length: 18 }, (_, i) => i);
    const sampler = new BatchSampler(small, 64, 16, 3);
    const starts = new Set<number>();
    for (let i = 0; i < 5; i++) {
      const { ids } = sampler.next();
      for (let row = 0; row < 64; row++) starts.add(ids[row * 16]);
    }
    expect([...starts].sort()).toEqual([0, 1]);
  });

  test("refuses data shorter than one window, naming the sizes", () => {
    expect(() => new BatchSampler(new Uint8Array(16), 2, 16, 0)).toThrow(/16 bytes.*17/);
    expect(() => new BatchSampler(data, 0, 16, 0)).toThrow(/batch/);
  });
});

describe("evaluationBatches", () => {
  test("covers the data with consecutive windows, the last batch partial", () => {
    const data = Uint8Array.from({ length: 101 }, (_, i) => i);
    const batches = evaluationBatches(data, 3, 10, Infinity);
    // (101 − 1) / 10 = 10 windows: batches of 3, 3, 3, 1.
    expect(batches.map((b) => b.rows)).toEqual([3, 3, 3, 1]);
    const ids = batches.flatMap((b) => Array.from(b.ids));
    const targets = batches.flatMap((b) => Array.from(b.targets));
    expect(ids).toEqual(Array.from({ length: 100 }, (_, i) => i));
    expect(targets).toEqual(Array.from({ length: 100 }, (_, i) => i + 1));
    expect(batches[3].ids.length).toBe(10);
  });

  test("stops at maxBatches and is the same every time", () => {
    const data = bytesOf(1000);
    const a = evaluationBatches(data, 4, 8, 2);
    expect(a.map((b) => b.rows)).toEqual([4, 4]);
    expect(Array.from(a[1].ids)).toEqual(Array.from(evaluationBatches(data, 4, 8, 2)[1].ids));
    expect(Array.from(a[1].ids.subarray(0, 8))).toEqual(Array.from(data.subarray(32, 40)));
    expect(() => evaluationBatches(new Uint8Array(8), 4, 8, 1)).toThrow(/8 bytes.*9/);
  });
});

describe("loss files", () => {
  const points: LossPoint[] = [
    { step: 0, tokens: 0, trainLoss: 5.5, lr: 1e-4 },
    { step: 100, tokens: 6400, trainLoss: 3.2, evalLoss: Math.LN2 * 4, lr: 1e-3, tokensPerSecond: 1200 },
    { step: 200, tokens: 12800, trainLoss: NaN, lr: 9e-4 },
    { step: 300, tokens: 19200, trainLoss: 2.1, evalLoss: 2.5, lr: 5e-4, tokensPerSecond: 1300 },
  ];

  test("the CSV has a header, one row a point, empty cells and bits per byte", () => {
    const lines = lossCsv(points).trimEnd().split("\n");
    expect(lines[0]).toBe("step,tokens,train_loss,eval_loss,eval_bits_per_byte,lr,tokens_per_second");
    expect(lines).toHaveLength(5);
    expect(lines[1]).toBe("0,0,5.5,,,0.0001,");
    const row = lines[2].split(",");
    expect(Number(row[4])).toBeCloseTo(4, 12);
    expect(row[6]).toBe("1200");
    expect(lines[3]).toBe("200,12800,nan,,,0.0009,");
  });

  test("the SVG draws one vertex a finite train loss and escapes the title", () => {
    const svg = lossSvg(points, { title: "a<b & c" });
    expect(svg.startsWith("<svg")).toBe(true);
    expect(svg.trimEnd().endsWith("</svg>")).toBe(true);
    const train = /<polyline class="train"[^>]* points="([^"]*)"/.exec(svg);
    expect(train).not.toBeNull();
    expect(train![1].split(" ")).toHaveLength(3);
    expect(svg.match(/<circle /g)!.length).toBeGreaterThanOrEqual(2);
    expect(svg).toContain("a&lt;b &amp; c");
    expect(svg).not.toContain("a<b");
    expect(svg).not.toMatch(/NaN|Infinity/);
    expect(svg).toContain("train loss");
    expect(svg).toContain("eval loss");
  });

  test("the SVG of zero or one point is an empty chart with a note", () => {
    for (const few of [[], points.slice(0, 1)]) {
      const svg = lossSvg(few);
      expect(svg.startsWith("<svg")).toBe(true);
      expect(svg).toContain("not enough points");
      expect(svg).not.toContain("<polyline");
    }
  });

  test("writeLossFiles writes both files and leaves no temporary file", () => {
    const dir = path.join(temporaryDirectory(), "run");
    const written = writeLossFiles(dir, points, "run 1");
    expect(written).toEqual({ csv: path.join(dir, "loss.csv"), svg: path.join(dir, "loss.svg") });
    expect(fs.readFileSync(written.csv, "utf8")).toBe(lossCsv(points));
    expect(fs.readFileSync(written.svg, "utf8")).toContain("run 1");
    writeLossFiles(dir, points.slice(0, 2));
    expect(fs.readdirSync(dir).sort()).toEqual(["loss.csv", "loss.svg"]);
  });
});

describe("ProgressBar", () => {
  function fakeStream(isTTY: boolean) {
    const writes: string[] = [];
    const stream = { isTTY, write: (chunk: string) => (writes.push(chunk), true) } as unknown as NodeJS.WritableStream;
    return { stream, writes };
  }

  test("on a terminal redraws one line with the bar, the fields and the ETA", () => {
    const { stream, writes } = fakeStream(true);
    let time = 0;
    const bar = new ProgressBar({ total: 1000, stream, width: 10, now: () => time });
    time = 60_000;
    bar.update(120, { loss: 2.3449, tokensPerSecond: 1234, lr: 3e-4 });
    // 120 steps in 60 s: 880 more take 440 s.
    expect(writes[0]).toBe("\r[#.........] 120/1000 loss 2.345 1.2k tok/s lr 3.0e-4 ETA 7m20s\x1b[K");
    bar.log("eval loss 2.1");
    expect(writes[1]).toBe("\r\x1b[Keval loss 2.1\n[#.........] 120/1000 loss 2.345 1.2k tok/s lr 3.0e-4 ETA 7m20s");
    time = 60_050;
    bar.update(121, { loss: 2.3 });
    expect(writes).toHaveLength(2);
    time = 500_000;
    bar.update(1000, { loss: 1.5 });
    expect(writes[2]).toBe("\r[##########] 1000/1000 loss 1.500 done in 8m20s\x1b[K");
    bar.finish();
    expect(writes[3]).toBe("\n");
  });

  test("in a log prints plain lines every tenth of the run, every 30 s and at the end", () => {
    const { stream, writes } = fakeStream(false);
    let time = 0;
    const bar = new ProgressBar({ total: 100, stream, now: () => time });
    const printedSteps = () => writes.map((w) => /^step (\d+)\/100/.exec(w)?.[1]).filter((s) => s !== undefined).map(Number);
    for (let step = 1; step <= 25; step++) {
      time += 100;
      bar.update(step, { loss: 3, lr: 1e-3 });
    }
    expect(printedSteps()).toEqual([1, 10, 20]);
    expect(writes[0]).toMatch(/^step 1\/100 loss 3.000 lr 1.0e-3 ETA \d+s\n$/);
    expect(writes.every((w) => !w.includes("\r"))).toBe(true);
    time += 31_000;
    bar.update(26, { loss: 3 });
    expect(printedSteps()).toEqual([1, 10, 20, 26]);
    bar.log("checkpoint written");
    expect(writes[writes.length - 1]).toBe("checkpoint written\n");
    bar.update(27, { loss: 2.9 });
    bar.finish();
    expect(writes[writes.length - 1]).toMatch(/^step 27\/100 loss 2.900/);
    bar.finish();
    expect(writes[writes.length - 1]).toMatch(/^step 27\/100/);
  });

  test("in a log always prints the last step", () => {
    const { stream, writes } = fakeStream(false);
    const bar = new ProgressBar({ total: 100, stream, now: () => 0 });
    bar.update(1);
    bar.update(100, { loss: 1 });
    expect(writes[writes.length - 1]).toBe("step 100/100 loss 1.000 done in 0s\n");
  });
});

test("formatDuration writes seconds, minutes and hours", () => {
  expect(formatDuration(0)).toBe("0s");
  expect(formatDuration(45)).toBe("45s");
  expect(formatDuration(59.6)).toBe("1m00s");
  expect(formatDuration(83)).toBe("1m23s");
  expect(formatDuration(605)).toBe("10m05s");
  expect(formatDuration(2 * 3600 + 5 * 60 + 10)).toBe("2h05m");
  expect(formatDuration(NaN)).toBe("?");
});
