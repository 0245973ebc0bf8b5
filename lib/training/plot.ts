// The loss curve of a training run as a CSV table and as a self-contained SVG chart, written next
// to the checkpoints so a run can be looked at without any plotting tool.
import * as fs from "fs";
import * as path from "path";
import { writeBytesAtomic } from "../io/atomic";

export interface LossPoint {
  step: number;
  /** Tokens (bytes) trained on so far. */
  tokens: number;
  /** Mean cross-entropy over the last training batch(es), in nats. */
  trainLoss: number;
  /** Mean cross-entropy on the validation data, in nats, when it was evaluated at this step. */
  evalLoss?: number;
  lr: number;
  tokensPerSecond?: number;
}

const CSV_HEADER = "step,tokens,train_loss,eval_loss,eval_bits_per_byte,lr,tokens_per_second";

function csvNumber(value: number | undefined): string {
  if (value === undefined) return "";
  if (Number.isNaN(value)) return "nan";
  if (value === Infinity) return "inf";
  if (value === -Infinity) return "-inf";
  return String(value);
}

/** One row a point, empty cells where a value is absent; bits per byte = loss in nats / ln 2. */
export function lossCsv(points: LossPoint[]): string {
  const rows = points.map((p) =>
    [
      csvNumber(p.step),
      csvNumber(p.tokens),
      csvNumber(p.trainLoss),
      csvNumber(p.evalLoss),
      csvNumber(p.evalLoss === undefined ? undefined : p.evalLoss / Math.LN2),
      csvNumber(p.lr),
      csvNumber(p.tokensPerSecond),
    ].join(","),
  );
  return [CSV_HEADER, ...rows].join("\n") + "\n";
}

export function escapeXml(text: string): string {
  return text
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&apos;");
}

/** About `count` round tick values (1, 2 or 5 × 10^k apart) covering [low, high]. */
function niceTicks(low: number, high: number, count: number): number[] {
  const span = high - low;
  const rough = span / count;
  const magnitude = Math.pow(10, Math.floor(Math.log10(rough)));
  const spacing = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough) ?? 10 * magnitude;
  const ticks: number[] = [];
  for (let i = Math.ceil(low / spacing); i * spacing <= high + spacing * 1e-9; i++) ticks.push(i * spacing);
  return ticks;
}

/** A tick label: short (2.5k, 1M) and without floating-point noise (0.30000000000000004). */
function tickLabel(value: number, spacing: number): string {
  const abs = Math.abs(value);
  if (abs >= 1e6 && spacing >= 1e5) return `${+(value / 1e6).toPrecision(3)}M`;
  if (abs >= 1e3 && spacing >= 100) return `${+(value / 1e3).toPrecision(3)}k`;
  const decimals = Math.max(0, -Math.floor(Math.log10(spacing) + 1e-9));
  return value.toFixed(decimals);
}

/** [min, max] without spreading into Math.min, which overflows the stack on long runs. */
function range(values: number[]): [number, number] {
  let low = Infinity;
  let high = -Infinity;
  for (const v of values) {
    if (v < low) low = v;
    if (v > high) high = v;
  }
  return [low, high];
}

function round2(v: number): string {
  return String(Math.round(v * 100) / 100);
}

/**
 * A line chart of the loss against the step: training loss as a solid line, evaluation loss as
 * markers joined by a dashed line. Points whose step or loss is NaN or infinite are left out; with
 * fewer than two points to draw the chart is empty with a note saying so.
 */
export function lossSvg(points: LossPoint[], options: { title?: string; width?: number; height?: number } = {}): string {
  const width = options.width ?? 720;
  const height = options.height ?? 420;
  const title = options.title ?? "Loss";
  const margin = { left: 64, right: 20, top: 40, bottom: 48 };
  const plotWidth = width - margin.left - margin.right;
  const plotHeight = height - margin.top - margin.bottom;

  const train = points.filter((p) => Number.isFinite(p.step) && Number.isFinite(p.trainLoss));
  const evaluated = points.filter((p) => Number.isFinite(p.step) && p.evalLoss !== undefined && Number.isFinite(p.evalLoss));
  const drawn = train.length + evaluated.length;

  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" ` +
      `font-family="sans-serif" font-size="12">`,
  );
  parts.push(`<title>${escapeXml(title)}</title>`);
  parts.push(`<rect width="${width}" height="${height}" fill="white"/>`);
  parts.push(`<text x="${width / 2}" y="24" text-anchor="middle" font-size="15">${escapeXml(title)}</text>`);
  parts.push(
    `<rect x="${margin.left}" y="${margin.top}" width="${plotWidth}" height="${plotHeight}" fill="none" stroke="#444"/>`,
  );

  if (drawn < 2) {
    parts.push(
      `<text x="${margin.left + plotWidth / 2}" y="${margin.top + plotHeight / 2}" text-anchor="middle" fill="#666">` +
        `not enough points to plot yet (${drawn})</text>`,
    );
    parts.push("</svg>");
    return parts.join("\n") + "\n";
  }

  const steps = [...train, ...evaluated].map((p) => p.step);
  const losses = [...train.map((p) => p.trainLoss), ...evaluated.map((p) => p.evalLoss as number)];
  let [xLow, xHigh] = range(steps);
  let [yLow, yHigh] = range(losses);
  if (xHigh === xLow) [xLow, xHigh] = [xLow - 1, xHigh + 1];
  if (yHigh === yLow) [yLow, yHigh] = [yLow - Math.max(0.5, Math.abs(yLow) * 0.1), yHigh + Math.max(0.5, Math.abs(yHigh) * 0.1)];
  const yPad = (yHigh - yLow) * 0.05;
  [yLow, yHigh] = [yLow - yPad, yHigh + yPad];
  const x = (step: number) => margin.left + ((step - xLow) / (xHigh - xLow)) * plotWidth;
  const y = (loss: number) => margin.top + (1 - (loss - yLow) / (yHigh - yLow)) * plotHeight;

  const xTicks = niceTicks(xLow, xHigh, 6);
  const yTicks = niceTicks(yLow, yHigh, 6);
  const xSpacing = xTicks.length > 1 ? xTicks[1] - xTicks[0] : 1;
  const ySpacing = yTicks.length > 1 ? yTicks[1] - yTicks[0] : 1;
  const bottom = margin.top + plotHeight;
  for (const t of xTicks) {
    const px = round2(x(t));
    parts.push(`<line x1="${px}" y1="${margin.top}" x2="${px}" y2="${bottom}" stroke="#eee"/>`);
    parts.push(`<line x1="${px}" y1="${bottom}" x2="${px}" y2="${bottom + 5}" stroke="#444"/>`);
    parts.push(`<text x="${px}" y="${bottom + 18}" text-anchor="middle">${tickLabel(t, xSpacing)}</text>`);
  }
  for (const t of yTicks) {
    const py = round2(y(t));
    parts.push(`<line x1="${margin.left}" y1="${py}" x2="${margin.left + plotWidth}" y2="${py}" stroke="#eee"/>`);
    parts.push(`<line x1="${margin.left - 5}" y1="${py}" x2="${margin.left}" y2="${py}" stroke="#444"/>`);
    parts.push(`<text x="${margin.left - 8}" y="${py}" text-anchor="end" dominant-baseline="middle">${tickLabel(t, ySpacing)}</text>`);
  }
  parts.push(`<text x="${margin.left + plotWidth / 2}" y="${height - 10}" text-anchor="middle">step</text>`);
  parts.push(
    `<text x="16" y="${margin.top + plotHeight / 2}" text-anchor="middle" transform="rotate(-90 16 ${margin.top + plotHeight / 2})">` +
      `loss (nats)</text>`,
  );

  if (train.length > 0) {
    const coordinates = train.map((p) => `${round2(x(p.step))},${round2(y(p.trainLoss))}`).join(" ");
    parts.push(`<polyline class="train" fill="none" stroke="#1f77b4" stroke-width="1.5" points="${coordinates}"/>`);
  }
  if (evaluated.length > 0) {
    const coordinates = evaluated.map((p) => `${round2(x(p.step))},${round2(y(p.evalLoss as number))}`).join(" ");
    parts.push(`<polyline class="eval" fill="none" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5 3" points="${coordinates}"/>`);
    for (const p of evaluated) {
      parts.push(`<circle cx="${round2(x(p.step))}" cy="${round2(y(p.evalLoss as number))}" r="3" fill="#d62728"/>`);
    }
  }

  const legendX = margin.left + plotWidth - 130;
  const legendY = margin.top + 10;
  parts.push(`<rect x="${legendX}" y="${legendY}" width="120" height="44" fill="white" stroke="#ccc"/>`);
  parts.push(`<line x1="${legendX + 8}" y1="${legendY + 14}" x2="${legendX + 32}" y2="${legendY + 14}" stroke="#1f77b4" stroke-width="1.5"/>`);
  parts.push(`<text x="${legendX + 40}" y="${legendY + 14}" dominant-baseline="middle">train loss</text>`);
  parts.push(
    `<line x1="${legendX + 8}" y1="${legendY + 32}" x2="${legendX + 32}" y2="${legendY + 32}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5 3"/>`,
  );
  parts.push(`<circle cx="${legendX + 20}" cy="${legendY + 32}" r="3" fill="#d62728"/>`);
  parts.push(`<text x="${legendX + 40}" y="${legendY + 32}" dominant-baseline="middle">eval loss</text>`);
  parts.push("</svg>");
  return parts.join("\n") + "\n";
}

/** Writes loss.csv and loss.svg into `dir` (created if absent), each atomically. */
export function writeLossFiles(dir: string, points: LossPoint[], title?: string): { csv: string; svg: string } {
  fs.mkdirSync(dir, { recursive: true });
  const csv = path.join(dir, "loss.csv");
  const svg = path.join(dir, "loss.svg");
  writeBytesAtomic(csv, lossCsv(points));
  writeBytesAtomic(svg, lossSvg(points, { title }));
  return { csv, svg };
}
