// Atomic file writes: the bytes go to a temporary file in the destination's folder, are flushed to
// disk, and only then renamed over the destination, so a reader sees the old file or the whole new
// one, never a half-written one. On any error the temporary file is removed.
import * as fs from "fs";
import * as path from "path";

function temporaryPath(destination: string): string {
  const random = Math.floor(Math.random() * 0x7fffffff).toString(36);
  return path.join(path.dirname(destination), `.${path.basename(destination)}.${process.pid}.${random}.tmp`);
}

/** Writes all of `bytes` at the file position, looping over short writes. */
export function writeAll(fd: number, bytes: Uint8Array): void {
  // Large views are written in slices: one write call is limited to about 2 GiB on Linux.
  const slice = 1 << 30;
  let done = 0;
  while (done < bytes.byteLength) {
    const end = Math.min(bytes.byteLength, done + slice);
    done += fs.writeSync(fd, bytes, done, end - done);
  }
}

/**
 * Runs `write(fd)` on a temporary file next to `destination`, then renames it into place. Returns
 * what `write` returns.
 */
export function writeFileAtomic<T>(destination: string, write: (fd: number) => T): T {
  const temporary = temporaryPath(destination);
  let fd: number | undefined;
  try {
    fd = fs.openSync(temporary, "wx", 0o644);
    const result = write(fd);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = undefined;
    fs.renameSync(temporary, destination);
    return result;
  } catch (err) {
    if (fd !== undefined) {
      try {
        fs.closeSync(fd);
      } catch {
        // Already failing; the original error is the one to report.
      }
    }
    try {
      fs.unlinkSync(temporary);
    } catch {
      // Never created, or already renamed.
    }
    throw err;
  }
}

/** Writes a whole file atomically from bytes or text. */
export function writeBytesAtomic(destination: string, bytes: Uint8Array | string): void {
  const data = typeof bytes === "string" ? Buffer.from(bytes, "utf8") : bytes;
  writeFileAtomic(destination, (fd) => writeAll(fd, data));
}
