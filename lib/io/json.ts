// JSON as Python writes it: json.dumps emits the bare tokens Infinity, -Infinity and NaN (Hugging Face
// Mamba-2 configs hold "time_step_limit": [0.0, Infinity]), which JSON.parse refuses. These helpers read
// and write that dialect; everything else is plain JSON.

const SENTINEL = "\u0000mssm-number:";

/** Parses JSON that may contain Infinity, -Infinity and NaN outside strings. */
export function parsePythonJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (first) {
    // Rewrite the bare tokens outside strings as marked strings, then turn them back into numbers.
    let out = "";
    let i = 0;
    let changed = false;
    while (i < text.length) {
      const c = text[i];
      if (c === '"') {
        let j = i + 1;
        while (j < text.length && text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
        out += text.slice(i, j + 1);
        i = j + 1;
        continue;
      }
      const token = ["-Infinity", "Infinity", "NaN"].find((t) => text.startsWith(t, i));
      if (token) {
        out += JSON.stringify(SENTINEL + token);
        i += token.length;
        changed = true;
        continue;
      }
      out += c;
      i++;
    }
    if (!changed) throw first;
    return JSON.parse(out, (_key, value) =>
      typeof value === "string" && value.startsWith(SENTINEL) ? Number(value.slice(SENTINEL.length)) : value,
    );
  }
}

/** JSON.stringify that writes non-finite numbers as Python does (Infinity, -Infinity, NaN). */
export function stringifyPythonJson(value: unknown, indent = 2): string {
  const text = JSON.stringify(
    value,
    (_key, v) => (typeof v === "number" && !Number.isFinite(v) ? SENTINEL + String(v) : v),
    indent,
  );
  return text.replace(new RegExp(`"${SENTINEL.replace("\u0000", "\\\\u0000")}(-?Infinity|NaN)"`, "g"), "$1");
}
