import * as fs from "fs";
import * as path from "path";
import { packageRoot } from "./native";

/** The package's version, from its package.json. */
export const version: string = (
  JSON.parse(fs.readFileSync(path.join(packageRoot, "package.json"), "utf8")) as { version: string }
).version;
