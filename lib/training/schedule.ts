// The learning-rate schedule of a training run: linear warmup, then cosine decay to a floor
// (Loshchilov & Hutter, "SGDR", 2017, eq. 5 without restarts), the schedule most language-model
// recipes use.

export interface LrSchedule {
  /** The peak learning rate, reached at the end of warmup. */
  lr: number;
  /** Steps of linear warmup; 0 starts at the peak. */
  warmupSteps: number;
  /** The step at which the cosine reaches `minLr`; later steps stay there. */
  totalSteps: number;
  /** The floor of the decay; lr / 10 when absent. */
  minLr?: number;
}

/** Throws a RangeError unless the schedule's fields are usable. */
export function checkSchedule(s: LrSchedule): void {
  if (!(Number.isFinite(s.lr) && s.lr > 0)) throw new RangeError(`lr must be a finite number > 0, got ${s.lr}`);
  if (!(Number.isInteger(s.warmupSteps) && s.warmupSteps >= 0)) {
    throw new RangeError(`warmupSteps must be an integer >= 0, got ${s.warmupSteps}`);
  }
  if (!(Number.isInteger(s.totalSteps) && s.totalSteps >= 1)) {
    throw new RangeError(`totalSteps must be an integer >= 1, got ${s.totalSteps}`);
  }
  if (s.warmupSteps > s.totalSteps) {
    throw new RangeError(`warmupSteps must be <= totalSteps, got warmupSteps ${s.warmupSteps} and totalSteps ${s.totalSteps}`);
  }
  if (s.minLr !== undefined && !(s.minLr >= 0 && s.minLr <= s.lr)) {
    throw new RangeError(`minLr must be in [0, lr] = [0, ${s.lr}], got ${s.minLr}`);
  }
}

/**
 * The learning rate for `step`, counted from 0 (the step about to be taken).
 *
 * Warmup: lr · (step + 1) / warmupSteps, so the first step already moves and step warmupSteps − 1
 * is at the peak. Decay: minLr + ½ (lr − minLr) (1 + cos(π t)) with t = (step − warmupSteps) /
 * (totalSteps − warmupSteps) clamped to [0, 1], so step totalSteps and beyond give minLr.
 */
export function learningRate(s: LrSchedule, step: number): number {
  checkSchedule(s);
  if (!(Number.isFinite(step) && step >= 0)) throw new RangeError(`step must be a finite number >= 0, got ${step}`);
  const minLr = s.minLr ?? s.lr / 10;
  if (step < s.warmupSteps) return (s.lr * (step + 1)) / s.warmupSteps;
  const decaySteps = s.totalSteps - s.warmupSteps;
  if (decaySteps === 0) return minLr;
  const t = Math.min(1, (step - s.warmupSteps) / decaySteps);
  return minLr + 0.5 * (s.lr - minLr) * (1 + Math.cos(Math.PI * t));
}
