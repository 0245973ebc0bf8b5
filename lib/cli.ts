#!/usr/bin/env node
// The mamba-ssm command line.
import { cpuInfo, getThreads, setThreads } from "./runtime";
import { version } from "./version";

const USAGE = `mamba-ssm ${version}

Usage:
  mamba-ssm info [--threads N]     version, CPU kernel level and threads
  mamba-ssm --version
  mamba-ssm --help

Environment:
  MAMBA_SSM_CPU=baseline|avx2|avx512   use a lower CPU kernel level
  MAMBA_SSM_THREADS=N                  size of the thread pool
`;

function main(argv: string[]): number {
  const args = [...argv];
  if (args.includes("--help") || args.includes("-h")) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.includes("--version") || args.includes("-v")) {
    process.stdout.write(`${version}\n`);
    return 0;
  }
  const command = args[0] && !args[0].startsWith("-") ? args.shift()! : "info";
  if (command !== "info") {
    process.stderr.write(`mamba-ssm: unknown command "${command}"\n\n${USAGE}`);
    return 2;
  }
  const t = args.indexOf("--threads");
  if (t >= 0) {
    const n = Number(args[t + 1]);
    if (!Number.isInteger(n) || n < 1) {
      process.stderr.write(`mamba-ssm: --threads needs an integer >= 1, got ${args[t + 1] ?? "nothing"}\n`);
      return 2;
    }
    setThreads(n);
  }
  const cpu = cpuInfo();
  process.stdout.write(
    `mamba-ssm ${version}\n` +
      `cpu level: ${cpu.level} (best ${cpu.best}; supported: ${cpu.supported.join(", ")})\n` +
      `threads:   ${getThreads()}\n`,
  );
  return 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`mamba-ssm: ${(err as Error).message}\n`);
  process.exitCode = 1;
}
