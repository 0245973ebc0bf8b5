// The byte-level alphabet of GPT-2-style BPE (GPT-2, GPT-NeoX, and so the Mamba checkpoints): every
// byte is written as one printable character so that BPE vocabularies and merges are plain strings.
// Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
// bytes (controls, space, DEL, NBSP, soft hyphen, …) take U+0100, U+0101, … in byte order — so the
// space 0x20 is 'Ġ' (U+0120) and the newline 0x0A is 'Ċ' (U+010A).
import { encodeUtf8 } from "./utf8";

function isPrintableLatin1(byte: number): boolean {
  return (byte >= 0x21 && byte <= 0x7e) || (byte >= 0xa1 && byte <= 0xac) || (byte >= 0xae && byte <= 0xff);
}

/** BYTE_TO_CHAR[b] is the character that stands for byte b. */
export const BYTE_TO_CHAR: readonly string[] = (() => {
  const table: string[] = new Array<string>(256);
  let next = 0x100;
  for (let byte = 0; byte < 256; byte++) {
    table[byte] = String.fromCharCode(isPrintableLatin1(byte) ? byte : next++);
  }
  return Object.freeze(table);
})();

/** The inverse of BYTE_TO_CHAR. */
export const CHAR_TO_BYTE: ReadonlyMap<string, number> = new Map(BYTE_TO_CHAR.map((char, byte) => [char, byte]));

/** The byte-level spelling of some bytes (what a byte-level vocabulary stores). */
export function bytesToByteLevel(bytes: Uint8Array | readonly number[]): string {
  let text = "";
  for (let i = 0; i < bytes.length; i++) text += BYTE_TO_CHAR[bytes[i]];
  return text;
}

/**
 * The bytes a byte-level token stands for. A character outside the alphabet (not found in real
 * vocabularies) stands for its own UTF-8 bytes rather than being dropped.
 */
export function byteLevelToBytes(token: string): Uint8Array {
  const bytes: number[] = [];
  for (const char of token) {
    const byte = CHAR_TO_BYTE.get(char);
    if (byte !== undefined) bytes.push(byte);
    else bytes.push(...encodeUtf8(char));
  }
  return Uint8Array.from(bytes);
}
