// Load for tch-serve's gRPC port: inference.GRPCInferenceService/ModelInfer with the JPEG as a
// BYTES element in raw_input_contents (as tritonclient[grpc] sends it), one photo per request.
// MODE, VUS, RATE, DURATION: the scenario (bench/k6-common.js: closed, open, until-stopped).
// Common: ADDR (host:port), MODEL, PHOTOS (comma-separated paths), PROTO_DIR (proto/).
// Reported as counters grpc_ok, grpc_refused (RESOURCE_EXHAUSTED, the 503 of gRPC), grpc_total,
// and grpc_req_duration by status (0 OK, 8 RESOURCE_EXHAUSTED).
import grpc from 'k6/net/grpc';
import encoding from 'k6/encoding';
import { Counter } from 'k6/metrics';
import { reported, scenario, summaryTrendStats } from './k6-common.js';

const photos = __ENV.PHOTOS.split(',').map((p) => open(p, 'b'));

const client = new grpc.Client();
client.load([__ENV.PROTO_DIR], 'grpc_predict_v2.proto');

// raw_input_contents of each photo: 4-byte little-endian length, then the bytes (base64 in the
// JSON form of the message that k6 takes).
const raws = photos.map((p) => {
  const n = p.byteLength;
  const out = new Uint8Array(n + 4);
  out[0] = n & 0xff;
  out[1] = (n >>> 8) & 0xff;
  out[2] = (n >>> 16) & 0xff;
  out[3] = (n >>> 24) & 0xff;
  out.set(new Uint8Array(p), 4);
  return encoding.b64encode(out.buffer);
});

export const options = {
  scenarios: { load: scenario(__ENV) },
  summaryTrendStats,
  thresholds: reported([
    'grpc_req_duration{status:0}',
    'grpc_req_duration{status:8}',
    'grpc_ok',
    'grpc_refused',
    'grpc_total',
  ]),
};

const ok = new Counter('grpc_ok');
const refused = new Counter('grpc_refused');
const total = new Counter('grpc_total');
let connected = false;

export default function () {
  if (!connected) {
    client.connect(__ENV.ADDR, { plaintext: true, timeout: '10s' });
    connected = true;
  }
  const i = Math.floor(Math.random() * photos.length);
  const r = client.invoke('inference.GRPCInferenceService/ModelInfer', {
    model_name: __ENV.MODEL,
    inputs: [{ name: 'image', datatype: 'BYTES', shape: [1] }],
    raw_input_contents: [raws[i]],
  }, { timeout: '60s' });
  total.add(1);
  if (r && r.status === grpc.StatusOK) ok.add(1);
  else if (r && r.status === grpc.StatusResourceExhausted) refused.add(1);
}
