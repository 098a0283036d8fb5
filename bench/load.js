// Load for one server: uploads of real JPEG photos, one photo per request.
//   MODE=closed  VUS=N          N clients, each sending its next request when the last returns
//   MODE=open    RATE=R         R requests/s arriving at a constant rate, whatever the latency
//   BODY=multipart              a multipart `file` field, like `curl -F file=@photo.jpg` (default)
//   BODY=raw                    the JPEG itself as the body, `Content-Type: image/jpeg` (TorchServe)
// Common: URL, DURATION (e.g. 15s), PHOTOS (comma-separated paths).
// Another request format (e.g. an Open Inference Protocol request with a BYTES input) is one
// more entry in `bodies`, chosen with BODY; bench/run.py names it per server.
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
const bodies = {
  multipart: (i) => http.post(__ENV.URL, { file: http.file(photos[i], `photo${i}.jpg`, 'image/jpeg') }, params),
  raw: (i) => http.post(__ENV.URL, photos[i], { ...params, headers: { 'Content-Type': 'image/jpeg' } }),
};
const send = bodies[__ENV.BODY || 'multipart'];
if (!send) {
  throw new Error(`unknown BODY ${__ENV.BODY}; known: ${Object.keys(bodies).join(', ')}`);
}

export default function () {
  send(Math.floor(Math.random() * photos.length));
}
