// Progress of a training run on a terminal or in a log. On a terminal one line is redrawn in place:
//   [#####.....] 120/1000 loss 2.345 1.2k tok/s lr 3.0e-4 ETA 1m23s
// In a log (a file, a pipe, CI) a redrawn line would be a mess of carriage returns, so plain lines
// are printed instead, about every tenth of the run or every 30 seconds, and on the last step.

export interface ProgressFields {
  loss?: number;
  tokensPerSecond?: number;
  lr?: number;
}

export interface ProgressBarOptions {
  /** The step the run ends at. */
  total: number;
  /** Where to draw; process.stderr by default. A TTY stream gets the redrawn bar. */
  stream?: NodeJS.WritableStream;
  /** Cells in the bar; 30 by default. */
  width?: number;
  /** The step a resumed run starts from, so the ETA counts only steps timed here; 0 by default. */
  start?: number;
  /** Milliseconds since some fixed time; Date.now by default (tests pass a fake clock). */
  now?: () => number;
}

/** Seconds as "45s", "1m23s" or "2h05m". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const whole = Math.round(seconds);
  if (whole < 60) return `${whole}s`;
  if (whole < 3600) return `${Math.floor(whole / 60)}m${String(whole % 60).padStart(2, "0")}s`;
  const minutes = Math.round(whole / 60);
  return `${Math.floor(minutes / 60)}h${String(minutes % 60).padStart(2, "0")}m`;
}

/** A rate as "850", "1.2k", "3.4M". */
export function formatRate(value: number): string {
  if (!Number.isFinite(value)) return "?";
  if (value >= 1e6) return `${(value / 1e6).toFixed(1)}M`;
  if (value >= 1e3) return `${(value / 1e3).toFixed(1)}k`;
  return value.toFixed(0);
}

/** A plain line in a log at most this often, unless a tenth of the run passes sooner. */
const LOG_INTERVAL_MS = 30_000;
/** A terminal is redrawn at most this often: faster is invisible and costs time in the terminal. */
const REDRAW_INTERVAL_MS = 100;

export class ProgressBar {
  private readonly total: number;
  private readonly stream: NodeJS.WritableStream & { isTTY?: boolean };
  private readonly width: number;
  private readonly start: number;
  private readonly now: () => number;
  private readonly startTime: number;
  private readonly tty: boolean;
  /** The last line drawn or printed, and the newest one, which may not have been. */
  private shown: string | undefined;
  private latest: string | undefined;
  private lastShownTime = -Infinity;
  private nextLoggedStep: number;
  private finished = false;

  constructor(options: ProgressBarOptions) {
    if (!(Number.isSafeInteger(options.total) && options.total >= 1)) {
      throw new RangeError(`total must be an integer >= 1, got ${options.total}`);
    }
    this.total = options.total;
    this.stream = options.stream ?? process.stderr;
    this.width = options.width ?? 30;
    this.start = options.start ?? 0;
    this.now = options.now ?? Date.now;
    this.startTime = this.now();
    this.tty = this.stream.isTTY === true;
    this.nextLoggedStep = this.start;
  }

  /** Shows that `step` steps of `total` are done, with the latest values of the fields given. */
  update(step: number, fields: ProgressFields = {}): void {
    const time = this.now();
    const line = this.line(step, fields, time);
    this.latest = line;
    const last = step >= this.total;
    if (this.tty) {
      if (last || time - this.lastShownTime >= REDRAW_INTERVAL_MS) this.draw(line, time);
      return;
    }
    // The first update is printed too: it says the run has started and what the loss starts at.
    if (last || step >= this.nextLoggedStep || time - this.lastShownTime >= LOG_INTERVAL_MS) {
      this.stream.write(line + "\n");
      this.shown = line;
      this.lastShownTime = time;
      const tenth = Math.max(1, Math.ceil(this.total / 10));
      this.nextLoggedStep = (Math.floor(step / tenth) + 1) * tenth;
    }
  }

  /** Prints a line of its own (an evaluation result, a checkpoint written) above the bar. */
  log(line: string): void {
    if (this.tty && this.shown !== undefined && !this.finished) {
      this.stream.write(`\r\x1b[K${line}\n${this.shown}`);
    } else {
      this.stream.write(line + "\n");
    }
  }

  /** Shows the newest state if it was skipped, and ends the bar's line. Later calls do nothing. */
  finish(): void {
    if (this.finished) return;
    if (this.latest !== undefined && this.latest !== this.shown) {
      if (this.tty) this.draw(this.latest, this.now());
      else this.stream.write(this.latest + "\n");
    }
    if (this.tty && this.shown !== undefined) this.stream.write("\n");
    this.finished = true;
  }

  private draw(line: string, time: number): void {
    this.stream.write(`\r${line}\x1b[K`);
    this.shown = line;
    this.lastShownTime = time;
  }

  private line(step: number, fields: ProgressFields, time: number): string {
    const parts: string[] = [];
    const fraction = Math.min(1, Math.max(0, step / this.total));
    const filled = Math.floor(fraction * this.width);
    if (this.tty) parts.push(`[${"#".repeat(filled)}${".".repeat(this.width - filled)}]`);
    else parts.push("step");
    parts.push(`${step}/${this.total}`);
    if (fields.loss !== undefined) parts.push(`loss ${fields.loss.toFixed(3)}`);
    if (fields.tokensPerSecond !== undefined) parts.push(`${formatRate(fields.tokensPerSecond)} tok/s`);
    if (fields.lr !== undefined) parts.push(`lr ${fields.lr.toExponential(1)}`);
    const elapsed = (time - this.startTime) / 1000;
    const timed = step - this.start;
    if (step >= this.total) parts.push(`done in ${formatDuration(elapsed)}`);
    else if (timed > 0) parts.push(`ETA ${formatDuration((elapsed / timed) * (this.total - step))}`);
    return parts.join(" ");
  }
}
