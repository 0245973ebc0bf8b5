// mamba-ssm against llama.cpp (through node-llama-cpp) on the very same GGUF files, in one run.
//
// For mamba-130m- and mamba2-130m-shaped models with random weights (written by mamba-ssm's own GGUF
// writer) at F32, BF16 and Q8_0, each engine runs in its own process, alternating which goes first,
// for several repetitions, and the medians are compared:
//   prefill   a 512-token prompt evaluated in one call (tokens/s): after a warm-up with the same
//             prompt, the median of 3 evaluations, each in a fresh state (as llama-bench warms up with
//             a run of the measured size: the first call of a size pays for touching new memory)
//   decode    128 single-token steps from the last prompt token, greedy, batch 1 (tokens/s), also as a
//             fraction of the read-bandwidth bound (measured bandwidth / weight bytes per token; the
//             higher of the bandwidths measured just before and just after each mamba-ssm run), and
//             of the bound that also counts the recurrent state a step reads and writes (fp32 conv
//             window and SSM state: 18.5 MiB each way a token for mamba2-130m, 2.7 MiB for mamba-130m)
//   batch-16  16 sequences (64-token prompts) stepped together, 32 steps (aggregate tokens/s)
// and, as a ceiling for prefill, the matrix products' FLOPs per prompt token at the measured peak of
// the arithmetic they run in (bf16 dot products for BF16 weights where the CPU has them, fp32 FMA
// otherwise): no prefill can beat it, whatever the scan and the small ops cost.
// and the greedy tokens of the two engines are compared. The mamba-ssm side (bench/mamba-run.js) runs
// the compiled package in plain node, as the llama.cpp side (bench/peer-llama.mjs) runs node-llama-cpp. node-llama-cpp is installed on demand into
// .cache/peer/ (it is not a dependency of the package); --llama-cpp DIR uses an existing install.
//
//   npm run bench:peer [-- --quick] [-- --reps R] [-- --threads N] [-- --models a,b] [-- --dtypes f32,q8_0]
// Prints tables and one JSON line. Not part of `npm test`.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { getThreads, setThreads } from "../lib";
import { preset } from "../lib/models/init";
import {
  ARCHS, Arch, compileDist, formatTable, makeBenchModelFile, measureBandwidth, measurePeak, median, prefillMatmulFlops,
  repoRoot, runChild, runMamba, runOptions, RunResult, stateTrafficBytes, WEIGHT_TYPES, WeightType,
} from "./common";

const LLAMA_CPP_VERSION = "3.21.1";

interface EngineResult extends RunResult {
  /** mamba-ssm runs: the read bandwidth around the run, the higher of before and after (bytes/s). */
  bandwidth?: number;
}

const argv = process.argv.slice(2);
const flag = (name: string) => argv.includes(name);
const value = (name: string) => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
};

// ---- the parent --------------------------------------------------------------------------------
/** The entry file of node-llama-cpp, installed into .cache/peer/ on first use. */
function nodeLlamaCpp(): string {
  const dir = value("--llama-cpp") ?? path.join(repoRoot, ".cache", "peer", `node-llama-cpp-${LLAMA_CPP_VERSION}`);
  const entry = path.join(dir, "node_modules", "node-llama-cpp", "dist", "index.js");
  if (fs.existsSync(entry)) return entry;
  process.stderr.write(`installing node-llama-cpp@${LLAMA_CPP_VERSION} into ${dir} …\n`);
  fs.mkdirSync(dir, { recursive: true });
  if (!fs.existsSync(path.join(dir, "package.json"))) {
    fs.writeFileSync(path.join(dir, "package.json"), JSON.stringify({ name: "mamba-ssm-peer", private: true }) + "\n");
  }
  const npm = process.platform === "win32" ? "npm.cmd" : "npm";
  const r = spawnSync(npm, ["install", `node-llama-cpp@${LLAMA_CPP_VERSION}`, "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"], {
    cwd: dir,
    stdio: ["ignore", "inherit", "inherit"],
  });
  if (r.status !== 0 || !fs.existsSync(entry)) {
    throw new Error(`bench:peer: installing node-llama-cpp@${LLAMA_CPP_VERSION} into ${dir} failed (npm exit ${r.status}); install it there by hand or pass --llama-cpp DIR`);
  }
  return entry;
}

/** Length of the common prefix of two token lists, and the fraction of equal positions. */
function agreement(a: number[], b: number[]): { prefix: number; equal: number } {
  let prefix = 0;
  while (prefix < Math.min(a.length, b.length) && a[prefix] === b[prefix]) prefix++;
  let equal = 0;
  for (let i = 0; i < Math.min(a.length, b.length); i++) if (a[i] === b[i]) equal++;
  return { prefix, equal: equal / Math.max(1, Math.max(a.length, b.length)) };
}

async function main() {
  const quick = flag("--quick");
  const threads = Number(value("--threads") ?? getThreads());
  setThreads(threads);
  const reps = Number(value("--reps") ?? (quick ? 1 : 3));
  const archs = (value("--models")?.split(",") ?? ARCHS) as Arch[];
  const dtypes = (value("--dtypes")?.split(",") ?? WEIGHT_TYPES) as WeightType[];
  for (const a of archs) if (!ARCHS.includes(a)) throw new Error(`--models: unknown model ${a}; expected ${ARCHS.join(", ")}`);
  for (const d of dtypes) if (!WEIGHT_TYPES.includes(d)) throw new Error(`--dtypes: unknown dtype ${d}; expected ${WEIGHT_TYPES.join(", ")}`);

  const entry = nodeLlamaCpp();
  // The mamba-ssm side runs the compiled package (bench/mamba-run.js): compile it from lib/ now.
  compileDist("bench:peer");
  const bandwidth = measureBandwidth();
  const fmaPeak = measurePeak("fp32", quick).median;
  const bf16Peak = measurePeak("bf16", quick).median;

  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-peer-"));
  process.on("exit", () => fs.rmSync(scratch, { recursive: true, force: true }));
  const results = [];
  for (const arch of archs) {
    const config = preset(arch);
    const o = runOptions(config.vocabSize, threads, quick);
    for (const dtype of dtypes) {
      const file = path.join(scratch, `${arch}-${dtype}.gguf`);
      makeBenchModelFile(arch, dtype, file);
      const llama: EngineResult[] = [];
      const mamba: EngineResult[] = [];
      for (let r = 0; r < reps; r++) {
        const llamaRun = () => llama.push(runChild([path.join(__dirname, "peer-llama.mjs"), entry, file, JSON.stringify(o)], `llama.cpp ${arch} ${dtype}`));
        // The bound a decode is judged by uses the bandwidth measured around it: this machine's drifts
        // by up to 1.8× within minutes (44–85 GB/s seen), more than the run-start figure can stand for.
        // The higher of the figures just before and just after the run counts (the stricter bound).
        const mambaRun = () => {
          const before = measureBandwidth();
          const run = runMamba(file, o, `mamba-ssm ${arch} ${dtype}`);
          mamba.push({ ...run, bandwidth: Math.max(before, measureBandwidth()) });
        };
        if (r % 2 === 0) {
          llamaRun();
          mambaRun();
        } else {
          mambaRun();
          llamaRun();
        }
        process.stderr.write(`${arch} ${dtype} repetition ${r + 1}/${reps} done\n`);
      }
      fs.rmSync(file, { force: true });
      const summary = (rs: EngineResult[]) => ({
        prefillTokS: +median(rs.map((x) => x.prefillTokS)).toFixed(1),
        decodeTokS: +median(rs.map((x) => x.decodeTokS)).toFixed(2),
        batchTokS: +median(rs.map((x) => x.batchTokS)).toFixed(1),
      });
      const l = summary(llama);
      const m = summary(mamba);
      // Per repetition: decode tokens/s over bandwidth / weight bytes, both engines judged by the
      // bandwidth measured around that repetition's mamba-ssm run; medians over repetitions.
      const bounds = mamba.map((x) => x.bandwidth! / x.weightBytes!);
      const bound = median(bounds);
      const ofBound = (rs: EngineResult[]) => median(rs.map((x, i) => x.decodeTokS / bounds[i]));
      const stateBytes = stateTrafficBytes(config);
      const ofStateBound = median(mamba.map((x) => x.decodeTokS / (x.bandwidth! / (x.weightBytes! + stateBytes))));
      const peak = dtype === "bf16" && bf16Peak > 0 ? bf16Peak : fmaPeak;
      const prefillCeiling = peak / prefillMatmulFlops(config);
      const decodeAgree = agreement(mamba[0].decodeTokens, llama[0].decodeTokens);
      const batchAgree = mamba[0].batchTokens.map((t, b) => agreement(t, llama[0].batchTokens[b]));
      results.push({
        model: arch,
        dtype,
        weightMB: +(mamba[0].weightBytes! / 2 ** 20).toFixed(1),
        llamaCpp: l,
        mambaSsm: m,
        ratio: {
          prefill: +(m.prefillTokS / l.prefillTokS).toFixed(2),
          decode: +(m.decodeTokS / l.decodeTokS).toFixed(2),
          batch: +(m.batchTokS / l.batchTokS).toFixed(2),
        },
        decodeBoundTokS: +bound.toFixed(1),
        decodeOfBound: { mambaSsm: +ofBound(mamba).toFixed(3), llamaCpp: +ofBound(llama).toFixed(3) },
        stateTrafficMB: +(stateBytes / 2 ** 20).toFixed(1),
        decodeOfBoundWithState: +ofStateBound.toFixed(3),
        prefillCeilingTokS: +prefillCeiling.toFixed(0),
        prefillOfCeiling: +(m.prefillTokS / prefillCeiling).toFixed(3),
        bandwidthGBs: mamba.map((x) => +(x.bandwidth! / 1e9).toFixed(2)),
        greedy: {
          decodePrefix: decodeAgree.prefix,
          decodeEqual: +decodeAgree.equal.toFixed(3),
          batchEqual: +(batchAgree.reduce((s, a) => s + a.equal, 0) / batchAgree.length).toFixed(3),
        },
        samples: { llamaCpp: llama.map(({ prefillTokS, decodeTokS, batchTokS }) => ({ prefillTokS, decodeTokS, batchTokS })), mambaSsm: mamba.map(({ prefillTokS, decodeTokS, batchTokS }) => ({ prefillTokS, decodeTokS, batchTokS })) },
      });
    }
  }

  const o = { prompt: quick ? 128 : 512, decode: quick ? 32 : 128, steps: quick ? 8 : 32 };
  console.log(
    `mamba-ssm vs llama.cpp (node-llama-cpp ${LLAMA_CPP_VERSION}) — ${threads} threads, read bandwidth ${(bandwidth / 1e9).toFixed(1)} GB/s at the start, ` +
      `peaks ${(fmaPeak / 1e9).toFixed(0)} GFLOP/s fp32 FMA, ${bf16Peak > 0 ? `${(bf16Peak / 1e9).toFixed(0)} GFLOP/s bf16` : "no bf16 dot products"}; ` +
      `prompt ${o.prompt}, decode ${o.decode}, 16 sequences × ${o.steps} steps; median of ${reps}${quick ? " (quick)" : ""}`,
  );
  const head = ["model", "dtype", "prefill llama.cpp", "prefill mamba-ssm", "×", "of ceiling", "decode llama.cpp", "decode mamba-ssm", "×", "of bound", "+ state", "batch-16 llama.cpp", "batch-16 mamba-ssm", "×", "greedy equal"];
  const rows = results.map((r) =>
    [
      r.model,
      r.dtype,
      r.llamaCpp.prefillTokS,
      r.mambaSsm.prefillTokS,
      r.ratio.prefill.toFixed(2),
      `${(100 * r.prefillOfCeiling).toFixed(0)}% of ${r.prefillCeilingTokS}`,
      r.llamaCpp.decodeTokS,
      r.mambaSsm.decodeTokS,
      r.ratio.decode.toFixed(2),
      `${(100 * r.decodeOfBound.mambaSsm).toFixed(0)}%`,
      `${(100 * r.decodeOfBoundWithState).toFixed(0)}%`,
      r.llamaCpp.batchTokS,
      r.mambaSsm.batchTokS,
      r.ratio.batch.toFixed(2),
      `${(100 * r.greedy.decodeEqual).toFixed(0)}% / ${(100 * r.greedy.batchEqual).toFixed(0)}%`,
    ].map(String),
  );
  console.log(formatTable(head, rows));
  console.log("(tokens/s; × = mamba-ssm / llama.cpp; of ceiling = prefill / (peak FLOP/s / matrix-product FLOPs a token); of bound = decode / (bandwidth / weight bytes), the bandwidth measured around each repetition's mamba-ssm run, the higher of before and after; + state = the same with the state a step reads and writes added to the weight bytes; greedy equal = decode / batch-16 tokens that agree)");
  console.log(JSON.stringify({ bench: "peer", llamaCpp: LLAMA_CPP_VERSION, threads, bandwidthGBs: +(bandwidth / 1e9).toFixed(2), fmaPeakGflops: +(fmaPeak / 1e9).toFixed(1), bf16PeakGflops: +(bf16Peak / 1e9).toFixed(1), reps, ...o, results }));
}

main().catch((e) => {
  console.error(e instanceof Error ? e.message : e);
  process.exitCode = 1;
});
