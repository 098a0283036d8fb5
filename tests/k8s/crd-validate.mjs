// Validates custom resources (KEDA ScaledObject, Gateway API HTTPRoute and GRPCRoute,
// Prometheus Operator ServiceMonitor) against the models of the kubernetes-models npm packages,
// which are generated from the projects' own Go API types (field names, types, required
// fields, enums and patterns from their validation markers):
//
//   node tests/k8s/crd-validate.mjs MODULES_DIR WORK_DIR resources.json verdicts.json
//
// resources.json: [object, ...]; verdicts.json, one entry per object, in the same order:
//   {"model": "<package>" or null when no model covers the kind, "schema": [...], "fields": [...]}
// with two lists of errors:
//   schema  the package's validator (ajv, compiled from the schema): types, required fields,
//           enums, patterns, formats. It lets unknown fields through, as the API server's
//           pruning would.
//   fields  TypeScript's excess-property check against the package's declarations (tsc
//           --noEmit): an unknown or misspelt field at any depth is an error, as `kubectl
//           apply` (strict field validation) makes it.
// The verdicts are the tests' (tests/k8s/test_k8s_schemas.py), self-tests included: they pass
// objects with a misspelt field and with a wrong type, which must come back with errors.
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [modulesDir, workDir, inputPath, outputPath] = process.argv.slice(2).map((p) => path.resolve(p));

// apiVersion/kind -> package module, exported class, exported interface.
const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ["@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", "ScaledObject", "IScaledObject"],
  "gateway.networking.k8s.io/v1/HTTPRoute": ["@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute", "HTTPRoute", "IHTTPRoute"],
  "gateway.networking.k8s.io/v1/GRPCRoute": ["@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/GRPCRoute", "GRPCRoute", "IGRPCRoute"],
  "monitoring.coreos.com/v1/ServiceMonitor": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor", "ServiceMonitor", "IServiceMonitor"],
};

const keyOf = (d) => `${d.apiVersion}/${d.kind}`;

async function model(key) {
  const [mod, cls] = MODELS[key];
  // The packages export "./<group>/<version>/*" as "./<group>/<version>/*.js" (import only).
  const file = path.join(modulesDir, "node_modules", `${mod}.js`);
  return (await import(pathToFileURL(file).href))[cls];
}

async function ajvErrors(doc) {
  const Cls = await model(keyOf(doc));
  try {
    new Cls(doc).validate();
    return [];
  } catch (e) {
    return String(e.message).split(", ");
  }
}

// One tsc run for many objects: each is a typed literal on its own line; errors map back by
// line. An error that names no line of an object is every object's.
function tscErrors(docs) {
  const dir = path.join(workDir, "tsc");
  mkdirSync(dir, { recursive: true });
  const imports = new Set();
  const lines = [];
  docs.forEach((doc, i) => {
    const [mod, , iface] = MODELS[keyOf(doc)];
    imports.add(`import type { ${iface} } from "${mod}";`);
    lines.push(`export const o${i}: ${iface} = ${JSON.stringify(doc)};`);
  });
  const head = [...imports];
  writeFileSync(path.join(dir, "resources.ts"), [...head, ...lines].join("\n") + "\n");
  writeFileSync(path.join(dir, "tsconfig.json"), JSON.stringify({
    compilerOptions: {
      strict: true, noEmit: true, module: "nodenext", moduleResolution: "nodenext",
      target: "es2022", skipLibCheck: true, types: [],
    },
    files: ["resources.ts"],
  }));
  // Resolve packages from MODULES_DIR: a node_modules link beside the file.
  try {
    execFileSync("ln", ["-sfn", path.join(modulesDir, "node_modules"), path.join(dir, "node_modules")]);
  } catch { /* already there */ }
  const errors = docs.map(() => []);
  if (!docs.length) return errors;
  let text = "";
  try {
    execFileSync(process.execPath, [path.join(modulesDir, "node_modules/typescript/bin/tsc"), "-p", dir],
      { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    text = (e.stdout || "") + (e.stderr || "") || String(e);
  }
  for (const line of text.split("\n")) {
    const m = line.match(/resources\.ts\((\d+),\d+\): error (TS\d+: .*)/);
    if (!m) {
      if (line.trim() && !line.startsWith(" ")) errors.forEach((e) => e.push(line.trim()));
      continue;
    }
    const idx = Number(m[1]) - 1 - head.length;
    if (idx >= 0 && idx < docs.length) errors[idx].push(m[2]);
    else errors.forEach((e) => e.push(m[2]));
  }
  return errors;
}

const items = JSON.parse(readFileSync(inputPath, "utf8"));
const known = items.filter((d) => MODELS[keyOf(d)]);
const tsc = tscErrors(known);
const verdicts = [];
for (const doc of items) {
  if (!MODELS[keyOf(doc)]) {
    verdicts.push({ model: null, schema: [], fields: [] });
    continue;
  }
  verdicts.push({
    model: MODELS[keyOf(doc)][0].split("/").slice(0, 2).join("/"),
    schema: await ajvErrors(doc),
    fields: tsc[known.indexOf(doc)],
  });
}
writeFileSync(outputPath, JSON.stringify(verdicts, null, 1));
