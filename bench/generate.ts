// Generation speed for models shaped like mamba-130m and mamba2-130m (random weights made here, so
// nothing is downloaded): prefill tokens/s (512-token prompt: after a warm-up with it, the median of 3
// runs), decode tokens/s (128 tokens, batch 1), aggregate decode tokens/s for 16 sequences, and peak
// RSS, at f32, bf16 and q8_0. Decode speed is also given as a fraction of the read-bandwidth bound
// (weight bytes per token / the higher of the bandwidths measured just before and just after that
// configuration). Each configuration runs in its own plain-node process on the compiled package
// (bench/mamba-run.js, as bench:peer's mamba-ssm side), so its peak RSS is its own.
//
//   npm run bench:generate [-- --quick] [-- --threads N]
// Prints a table and one JSON line. Not part of `npm test`.
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { cudaInfo, getThreads, setThreads } from "../lib";
import { preset } from "../lib/models/init";
import {
  ARCHS, Arch, compileDist, formatTable, makeBenchModel, makeBenchModelFile, measureBandwidth, runMamba, runOptions,
  WEIGHT_TYPES, WeightType,
} from "./common";

interface Result {
  model: Arch;
  dtype: WeightType;
  weightMB: number;
  prefillTokS: number;
  decodeTokS: number;
  batchDecodeTokS: number;
  bandwidthGBs: number | null;
  decodeBoundTokS: number | null;
  decodeOfBound: number | null;
  peakRssMB: number;
}

const argv = process.argv.slice(2);
const quick = argv.includes("--quick");
const threadsArg = argv.indexOf("--threads");
const deviceArg = argv.indexOf("--device");
const device = deviceArg >= 0 ? argv[deviceArg + 1] : "cpu";
const onGpu = device !== "cpu";

async function main() {
  if (threadsArg >= 0) setThreads(Number(argv[threadsArg + 1]));
  const makeIdx = argv.indexOf("--make");
  if (makeIdx >= 0) {
    makeBenchModel(argv[makeIdx + 1] as Arch, argv[makeIdx + 2] as WeightType, argv[makeIdx + 3]);
    return;
  }
  if (onGpu && cudaInfo().devices.length === 0) {
    throw new Error(`bench:generate --device ${device}: no usable GPU: ${cudaInfo().error}`);
  }
  compileDist("bench:generate");
  const threads = getThreads();
  const results: Result[] = [];
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-bench-"));
  process.on("exit", () => fs.rmSync(scratch, { recursive: true, force: true }));
  for (const arch of ARCHS) {
    const o = { ...runOptions(preset(arch).vocabSize, threads, quick), device };
    for (const dtype of WEIGHT_TYPES.filter((d) => !onGpu || d !== "q8_0")) {
      const file = path.join(scratch, `${arch}-${dtype}.gguf`);
      try {
        makeBenchModelFile(arch, dtype, file);
        // This machine's bandwidth drifts by up to 1.8× within minutes (44–85 GB/s seen): each
        // configuration is judged by the higher of the figures measured just before and just after it
        // (the stricter bound).
        const before = onGpu ? 0 : measureBandwidth();
        const r = runMamba(file, o, `bench ${arch} ${dtype}`);
        const bandwidth = onGpu ? null : Math.max(before, measureBandwidth());
        const bound = bandwidth === null ? null : bandwidth / r.weightBytes!;
        results.push({
          model: arch,
          dtype,
          weightMB: +(r.weightBytes! / 2 ** 20).toFixed(1),
          prefillTokS: +r.prefillTokS.toFixed(1),
          decodeTokS: +r.decodeTokS.toFixed(2),
          batchDecodeTokS: +r.batchTokS.toFixed(1),
          bandwidthGBs: bandwidth === null ? null : +(bandwidth / 1e9).toFixed(2),
          decodeBoundTokS: bound === null ? null : +bound.toFixed(1),
          decodeOfBound: bound === null ? null : +(r.decodeTokS / bound).toFixed(3),
          peakRssMB: +r.peakRssMB!.toFixed(0),
        });
        process.stderr.write(`done ${arch} ${dtype}\n`);
      } catch (e) {
        process.stderr.write(`${(e as Error).message}\n`);
        process.exitCode = 1;
      } finally {
        fs.rmSync(file, { force: true });
      }
    }
  }
  const o = runOptions(1, threads, quick);
  const batch = o.batchPrompts.length;
  const head = ["model", "dtype", "weights MB", "prefill tok/s", "decode tok/s", "of bound", "bound tok/s", "GB/s", `batch-${batch} tok/s`, "peak RSS MB"];
  const rows = results.map((r) =>
    [
      r.model, r.dtype, r.weightMB, r.prefillTokS, r.decodeTokS,
      r.decodeOfBound === null ? "-" : `${(100 * r.decodeOfBound).toFixed(0)}%`, r.decodeBoundTokS ?? "-", r.bandwidthGBs ?? "-",
      r.batchDecodeTokS, r.peakRssMB,
    ].map(String),
  );
  console.log(
    `mamba-ssm generation benchmark — ${onGpu ? `on ${device}` : `${threads} threads`}; prompt ${o.prompt} (median of ${o.prefillReps} after a warm-up), decode ${o.decode}, ` +
      `batch ${batch}×${o.batchSteps} steps${quick ? " (quick)" : ""}` +
      (onGpu ? "" : "; read bandwidth measured before and after each configuration (the higher counts)"),
  );
  console.log(formatTable(head, rows));
  if (!onGpu) console.log("(of bound = decode / (bandwidth / weight bytes), with the GB/s of that row)");
  console.log(JSON.stringify({ bench: "generate", device, threads, prompt: o.prompt, decode: o.decode, batch, batchSteps: o.batchSteps, results }));
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
