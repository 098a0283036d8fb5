// Load for one server: uploads of real JPEG photos, one photo per request.
// MODE, VUS, RATE, DURATION: the scenario (bench/k6-common.js: closed, open, until-stopped).
//   BODY=multipart              a multipart `file` field, like `curl -F file=@photo.jpg` (default)
//   BODY=raw                    the JPEG itself as the body, `Content-Type: image/jpeg` (TorchServe)
//   BODY=v2-bytes               an Open Inference Protocol request (POST /v2/models/<m>/infer) with
//                               the binary data extension: the JSON header, then the JPEG as a
//                               BYTES element (4-byte little-endian length, the bytes), as
//                               tritonclient sends it
// Common: URL, PHOTOS (comma-separated paths).
// Clients as the reliability tests want them (tests/reliability):
//   REFUSALS=1                  each answer other than 200 is counted in `refusals`, tagged with
//                               its status and the error body's `code`, and a 503 without
//                               Retry-After in `retry_after_missing`
//   PAUSE_AFTER_REFUSAL=S       a client waits S seconds after an answer other than 200 (a
//                               client retrying fast, well under the Retry-After it was given)
//   KEEP_ALIVE=0                a new connection for every request
// Another request format is one more entry in `bodies`, chosen with BODY; bench/run.py names it
// per server. gRPC has its own script, bench/load-grpc.js.
import http from 'k6/http';

import { sleep } from 'k6';
import { Counter } from 'k6/metrics';
import { reported, scenario, summaryTrendStats } from './k6-common.js';

const photos = __ENV.PHOTOS.split(',').map((p) => open(p, 'b'));
const countRefusals = __ENV.REFUSALS === '1';
const pauseAfterRefusal = Number(__ENV.PAUSE_AFTER_REFUSAL || 0);

export const options = {
  scenarios: { load: scenario(__ENV) },
  discardResponseBodies: true,
  noConnectionReuse: __ENV.KEEP_ALIVE === '0',
  summaryTrendStats,
  thresholds: reported([
    'http_req_duration{status:200}',
    'http_req_duration{status:503}',
    'http_reqs{status:200}',
    'http_reqs{status:503}',
  ]),
};

const refusals = new Counter('refusals');
const retryAfterMissing = new Counter('retry_after_missing');

// The bodies of the answers are read only where the refusals are counted.
const params = { tags: { name: 'predict' }, timeout: '60s', responseType: countRefusals ? 'text' : 'none' };

// One v2 request per photo, made once: ASCII JSON header + length-prefixed element.
function v2Body(photo) {
  const n = photo.byteLength;
  const header = JSON.stringify({
    inputs: [{ name: 'image', datatype: 'BYTES', shape: [1], parameters: { binary_data_size: n + 4 } }],
    outputs: [{ name: 'probabilities', parameters: { binary_data: true } }],
  });
  const out = new Uint8Array(header.length + 4 + n);
  for (let i = 0; i < header.length; i++) out[i] = header.charCodeAt(i);
  const at = header.length;
  out[at] = n & 0xff;
  out[at + 1] = (n >>> 8) & 0xff;
  out[at + 2] = (n >>> 16) & 0xff;
  out[at + 3] = (n >>> 24) & 0xff;
  out.set(new Uint8Array(photo), at + 4);
  return { body: out.buffer, headerLength: header.length };
}
const v2 = __ENV.BODY === 'v2-bytes' ? photos.map(v2Body) : [];
const bodies = {
  multipart: (i) => http.post(__ENV.URL, { file: http.file(photos[i], `photo${i}.jpg`, 'image/jpeg') }, params),
  raw: (i) => http.post(__ENV.URL, photos[i], { ...params, headers: { 'Content-Type': 'image/jpeg' } }),
  'v2-bytes': (i) => http.post(__ENV.URL, v2[i].body, {
    ...params,
    headers: { 'Content-Type': 'application/octet-stream', 'Inference-Header-Content-Length': String(v2[i].headerLength) },
  }),
};
const send = bodies[__ENV.BODY || 'multipart'];
if (!send) {
  throw new Error(`unknown BODY ${__ENV.BODY}; known: ${Object.keys(bodies).join(', ')}`);
}

// The error body's `code`, or what stood in for it.
function codeOf(r) {
  if (!r.status) return `connection error ${r.error_code}`;
  try {
    return JSON.parse(r.body).code || 'no code';
  } catch (e) {
    return 'not json';
  }
}

export default function () {
  const r = send(Math.floor(Math.random() * photos.length));
  if (r.status === 200) return;
  if (countRefusals) {
    refusals.add(1, { status: String(r.status), code: codeOf(r) });
    if (r.status === 503 && !r.headers['Retry-After']) retryAfterMissing.add(1);
  }
  if (!r.status) sleep(0.05); // a refused connection: not a tight loop
  if (pauseAfterRefusal) sleep(pauseAfterRefusal);
}
