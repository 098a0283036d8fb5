// What the k6 load scripts share (bench/load.js, bench/load-grpc.js): the scenario that MODE
// names and the statistics the summary reports.
//   MODE=closed         VUS=N, DURATION   N clients, each sending its next request when the
//                                         last returns
//   MODE=open           RATE=R, DURATION  R requests/s arriving at a constant rate, whatever
//                                         the latency
//   MODE=until-stopped  VUS=N             N closed-loop clients until k6's REST API pauses and
//                                         stops the run (k6 run --address ...): requests in
//                                         flight finish first (tests/reliability)

export function scenario(env) {
  const mode = env.MODE || 'closed';
  const duration = env.DURATION || '15s';
  const vus = Number(env.VUS || 1);
  if (mode === 'open') {
    const rate = Number(env.RATE);
    return {
      executor: 'constant-arrival-rate',
      rate,
      timeUnit: '1s',
      duration,
      preAllocatedVUs: Math.max(8, Math.ceil(rate * 2)),
      maxVUs: Math.max(16, Math.ceil(rate * 4)),
    };
  }
  if (mode === 'until-stopped') {
    return { executor: 'externally-controlled', vus, maxVUs: vus, duration: env.DURATION || '60m' };
  }
  if (mode !== 'closed') {
    throw new Error(`unknown MODE ${mode}; known: closed, open, until-stopped`);
  }
  return { executor: 'constant-vus', vus, duration };
}

export const summaryTrendStats = ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'];

// Thresholds that never fail the run, declared so that k6 reports these sub-metrics in the
// summary.
export function reported(names) {
  return Object.fromEntries(names.map((n) => [n, n.startsWith('http_req_duration') || n.startsWith('grpc_req_duration') ? ['max>=0'] : ['count>=0']]));
}
