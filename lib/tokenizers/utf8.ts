// An incremental UTF-8 decoder: the decoder of the WHATWG Encoding Standard (§ "UTF-8 decoder"),
// which is also what TextDecoder does. Bytes of a character split across pushes are held until the
// character is complete; a sequence that can no longer complete becomes one U+FFFD for its maximal
// subpart (Unicode's "substitution of maximal subparts"), and one still open at the end becomes
// U+FFFD on finish(). Written out rather than borrowed from TextDecoder so that what is held and
// when a replacement is emitted is explicit, and the same on every Node build (with or without ICU).

const REPLACEMENT = 0xfffd;

export class Utf8StreamDecoder {
  #codePoint = 0;
  #bytesSeen = 0;
  #bytesNeeded = 0;
  // The range the next continuation byte must fall in: narrower after E0, ED, F0 and F4, which is how
  // overlong forms, surrogates and code points above U+10FFFF are refused at their second byte.
  #lowerBoundary = 0x80;
  #upperBoundary = 0xbf;

  /** Whether bytes of an unfinished character are held. */
  get pending(): boolean {
    return this.#bytesNeeded !== 0;
  }

  /** Decodes the bytes, returning the text of every character they complete. */
  push(bytes: Uint8Array | readonly number[]): string {
    const codePoints: number[] = [];
    for (let i = 0; i < bytes.length; i++) {
      const byte = bytes[i];
      if (this.#bytesNeeded === 0) {
        this.#startSequence(byte, codePoints);
        continue;
      }
      if (byte < this.#lowerBoundary || byte > this.#upperBoundary) {
        // The open sequence cannot complete: replace it, then read this byte afresh.
        this.#reset();
        codePoints.push(REPLACEMENT);
        this.#startSequence(byte, codePoints);
        continue;
      }
      this.#lowerBoundary = 0x80;
      this.#upperBoundary = 0xbf;
      this.#codePoint = (this.#codePoint << 6) | (byte & 0x3f);
      this.#bytesSeen++;
      if (this.#bytesSeen === this.#bytesNeeded) {
        codePoints.push(this.#codePoint);
        this.#reset();
      }
    }
    return fromCodePoints(codePoints);
  }

  /** Ends the stream: an unfinished character becomes U+FFFD. The decoder is ready for a new stream. */
  finish(): string {
    if (this.#bytesNeeded === 0) return "";
    this.#reset();
    return String.fromCharCode(REPLACEMENT);
  }

  #startSequence(byte: number, codePoints: number[]): void {
    if (byte <= 0x7f) {
      codePoints.push(byte);
    } else if (byte >= 0xc2 && byte <= 0xdf) {
      this.#bytesNeeded = 1;
      this.#codePoint = byte & 0x1f;
    } else if (byte >= 0xe0 && byte <= 0xef) {
      if (byte === 0xe0) this.#lowerBoundary = 0xa0;
      if (byte === 0xed) this.#upperBoundary = 0x9f;
      this.#bytesNeeded = 2;
      this.#codePoint = byte & 0x0f;
    } else if (byte >= 0xf0 && byte <= 0xf4) {
      if (byte === 0xf0) this.#lowerBoundary = 0x90;
      if (byte === 0xf4) this.#upperBoundary = 0x8f;
      this.#bytesNeeded = 3;
      this.#codePoint = byte & 0x07;
    } else {
      // 80–C1 (a continuation byte with no lead, or an overlong lead) and F5–FF never start a character.
      codePoints.push(REPLACEMENT);
    }
  }

  #reset(): void {
    this.#codePoint = 0;
    this.#bytesSeen = 0;
    this.#bytesNeeded = 0;
    this.#lowerBoundary = 0x80;
    this.#upperBoundary = 0xbf;
  }
}

/** Decodes a whole byte string as UTF-8, with U+FFFD for invalid sequences; a BOM is kept as text. */
export function decodeUtf8(bytes: Uint8Array | readonly number[]): string {
  const decoder = new Utf8StreamDecoder();
  return decoder.push(bytes) + decoder.finish();
}

const encoder = new TextEncoder();

/** The UTF-8 bytes of a string (lone surrogates become U+FFFD, as TextEncoder does). */
export function encodeUtf8(text: string): Uint8Array {
  return encoder.encode(text);
}

function fromCodePoints(codePoints: number[]): string {
  // String.fromCodePoint takes its arguments on the stack, so long runs go in slices.
  const slice = 8192;
  if (codePoints.length <= slice) return String.fromCodePoint(...codePoints);
  let text = "";
  for (let i = 0; i < codePoints.length; i += slice) text += String.fromCodePoint(...codePoints.slice(i, i + slice));
  return text;
}
