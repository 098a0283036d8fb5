// Load for one server: uploads of real JPEG photos, one photo per request.
//   MODE=closed  VUS=N          N clients, each sending its next request when the last returns
//   MODE=open    RATE=R         R requests/s arriving at a constant rate, whatever the latency
//   BODY=multipart              a multipart `file` field, like `curl -F file=@photo.jpg` (default)
//   BODY=raw                    the JPEG itself as the body, `Content-Type: image/jpeg` (TorchServe)
// Common: URL, DURATION (e.g. 15s), PHOTOS (comma-separated paths).
//   BODY=v2-bytes               an Open Inference Protocol request (POST /v2/models/<m>/infer) with
//                               the binary data extension: the JSON header, then the JPEG as a
//                               BYTES element (4-byte little-endian length, the bytes), as
//                               tritonclient sends it
// Another request format is one more entry in `bodies`, chosen with BODY; bench/run.py names it
// per server. gRPC has its own script, bench/load-grpc.js.
import http from 'k6/http';

const photos = __ENV.PHOTOS.split(',').map((p) => open(p, 'b'));
const mode = __ENV.MODE || 'closed';
const duration = __ENV.DURATION || '15s';

const scenario = mode === 'open'
  ? {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE),
      timeUnit: '1s',
      duration,
      preAllocatedVUs: Math.max(8, Math.ceil(Number(__ENV.RATE) * 2)),
      maxVUs: Math.max(16, Math.ceil(Number(__ENV.RATE) * 4)),
    }
  : { executor: 'constant-vus', vus: Number(__ENV.VUS || 1), duration };

export const options = {
  scenarios: { load: scenario },
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
  thresholds: {
    // Declared so that k6 reports these sub-metrics in the summary; they never fail the run.
    'http_req_duration{status:200}': ['max>=0'],
    'http_req_duration{status:503}': ['max>=0'],
    'http_reqs{status:200}': ['count>=0'],
    'http_reqs{status:503}': ['count>=0'],
  },
};

const params = { tags: { name: 'predict' }, timeout: '60s' };

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

export default function () {
  send(Math.floor(Math.random() * photos.length));
}
