// Validates custom resources (KEDA ScaledObject, Gateway API HTTPRoute and GRPCRoute,
// Prometheus Operator ServiceMonitor) against the models of the kubernetes-models npm packages,
// which are generated from the projects' own Go API types (field names, types, required
// fields, enums and patterns from their validation markers):
//
//   node scripts/k8s/crd-validate.mjs MODULES_DIR WORK_DIR resources.json
//
// resources.json: [{"source": "...", "doc": {...}}, ...]. Two checks per object:
//   1. the package's validator (ajv, compiled from the schema): types, required fields, enums,
//      patterns, formats. It lets unknown fields through, as the API server's pruning would.
//   2. TypeScript's excess-property check against the package's declarations (tsc --noEmit):
//      an unknown or misspelt field at any depth is an error, as `kubectl apply` (strict
//      field validation) makes it.
// Then a self-test per kind: a copy with a misspelt field and one with a wrong type must be
// rejected, so that a validator that stopped checking cannot pass silently.
// Prints "PASS<TAB>message" / "FAIL<TAB>message" lines; exits 0.
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [modulesDir, workDir, inputPath] = process.argv.slice(2).map((p) => path.resolve(p));

// apiVersion/kind -> package module, exported names, and a nested object (not a free-form map)
// where the self-test misspells a field.
const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ["@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", "ScaledObject", "IScaledObject", ["spec", "triggers", 0]],
  "gateway.networking.k8s.io/v1/HTTPRoute": ["@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute", "HTTPRoute", "IHTTPRoute", ["spec", "rules", 0]],
  "gateway.networking.k8s.io/v1/GRPCRoute": ["@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/GRPCRoute", "GRPCRoute", "IGRPCRoute", ["spec", "rules", 0]],
  "monitoring.coreos.com/v1/ServiceMonitor": ["@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor", "ServiceMonitor", "IServiceMonitor", ["spec", "endpoints", 0]],
};

const out = (ok, msg) => console.log(`${ok ? "PASS" : "FAIL"}\t${msg}`);
const keyOf = (d) => `${d.apiVersion}/${d.kind}`;
const ident = (d) => `${d.kind}/${d.metadata?.name} (${d.apiVersion})`;

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

// One tsc run for many objects: each is a typed literal; errors map back by line.
function tscErrors(docs) {
  const dir = path.join(workDir, "tsc");
  mkdirSync(dir, { recursive: true });
  const imports = new Set();
  const lines = [];
  const lineOf = [];
  docs.forEach((doc, i) => {
    const [mod, , iface] = MODELS[keyOf(doc)];
    imports.add(`import type { ${iface} } from "${mod}";`);
    lineOf.push(i);
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
  let text = "";
  try {
    execFileSync(process.execPath, [path.join(modulesDir, "node_modules/typescript/bin/tsc"), "-p", dir],
      { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    text = (e.stdout || "") + (e.stderr || "");
  }
  for (const line of text.split("\n")) {
    const m = line.match(/resources\.ts\((\d+),\d+\): error (TS\d+: .*)/);
    if (!m) {
      if (line.trim() && !line.startsWith(" ")) errors.forEach((e) => e.push(line.trim()));
      continue;
    }
    const idx = Number(m[1]) - 1 - head.length;
    if (idx >= 0 && idx < docs.length) errors[lineOf[idx]].push(m[2]);
    else errors.forEach((e) => e.push(m[2]));
  }
  return errors;
}

// Self-test mutations: a misspelt field (an existing one with an "s" added, the original kept)
// in spec and in a nested object, and a string turned into a number.
function misspelt(doc, where) {
  const copy = structuredClone(doc);
  const target = where.reduce((o, k) => o[k], copy);
  const k = Object.keys(target)[0];
  target[`${k}s`] = target[k];
  return [copy, `${where.join(".")}.${k}s`];
}
function wrongType(doc) {
  const copy = structuredClone(doc);
  const walk = (o) => {
    for (const [k, v] of Object.entries(o)) {
      if (typeof v === "string") { o[k] = 42; return k; }
      if (v && typeof v === "object") { const r = walk(v); if (r) return r; }
    }
    return null;
  };
  const k = walk(copy.spec);
  return [copy, `${k} a number`];
}

const items = JSON.parse(readFileSync(inputPath, "utf8"));
const known = items.filter((it) => MODELS[keyOf(it.doc)]);
for (const it of items.filter((it) => !MODELS[keyOf(it.doc)])) {
  out(false, `${it.source}: ${ident(it.doc)}: no model for this kind`);
}

const selfTests = [];
const seen = new Set();
for (const it of known) {
  const k = keyOf(it.doc);
  if (seen.has(k)) continue;
  seen.add(k);
  // The misspelt field must be caught by the unknown-field check, the wrong type by the schema.
  const tests = [[misspelt(it.doc, ["spec"]), "fields"], [misspelt(it.doc, MODELS[k][3]), "fields"],
    [wrongType(it.doc), "schema"]];
  for (const [[doc, what], by] of tests) {
    selfTests.push({ doc, by, what: `${it.doc.kind} with ${what}` });
  }
}
const all = [...known.map((it) => it.doc), ...selfTests.map((t) => t.doc)];
const tsc = tscErrors(all);
for (const [i, it] of known.entries()) {
  const ajv = await ajvErrors(it.doc);
  const errs = [...ajv.map((e) => `schema: ${e}`), ...tsc[i].map((e) => `fields: ${e}`)];
  out(!errs.length, `${it.source}: ${ident(it.doc)} against ${MODELS[keyOf(it.doc)][0].split("/").slice(0, 2).join("/")} (schema + unknown fields)`
    + errs.map((e) => `\n      ${e}`).join(""));
}
for (const [j, t] of selfTests.entries()) {
  const ajv = await ajvErrors(t.doc);
  const ts = tsc[known.length + j];
  const caught = t.by === "fields" ? ts : ajv;
  out(caught.length > 0, `self-test: ${t.what} is rejected by the ${t.by === "fields" ? "unknown-field check" : "schema"}`
    + (caught.length ? `: ${caught[0].slice(0, 120)}` : ": accepted"));
}
