// Stop strings over streamed text: text is released only once it can no longer be the start of a
// stop string, and generation ends at the first complete one (which is not emitted).

export class StopMatcher {
  private held = "";

  constructor(private readonly stops: readonly string[]) {
    for (const s of stops) {
      if (typeof s !== "string" || s.length === 0) throw new Error(`stop strings must be non-empty strings, got ${JSON.stringify(s)}`);
    }
  }

  /** Adds text; returns what may be emitted now and whether a stop string was reached. */
  push(text: string): { emit: string; stopped: boolean } {
    this.held += text;
    let first = -1;
    for (const s of this.stops) {
      const i = this.held.indexOf(s);
      if (i >= 0 && (first < 0 || i < first)) first = i;
    }
    if (first >= 0) {
      const emit = this.held.slice(0, first);
      this.held = "";
      return { emit, stopped: true };
    }
    // Keep the longest suffix that is a proper prefix of some stop string.
    let keep = 0;
    for (const s of this.stops) {
      for (let n = Math.min(s.length - 1, this.held.length); n > keep; n--) {
        if (this.held.endsWith(s.slice(0, n))) {
          keep = n;
          break;
        }
      }
    }
    const emit = this.held.slice(0, this.held.length - keep);
    this.held = this.held.slice(this.held.length - keep);
    return { emit, stopped: false };
  }

  /** What is still held when generation ends for another reason. */
  flush(): string {
    const rest = this.held;
    this.held = "";
    return rest;
  }
}
