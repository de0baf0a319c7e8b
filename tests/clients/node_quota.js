// The connection and session quotas from Node's @grpc/grpc-js: 16 clients
// with connections of their own, of which those past
// limits.connections_per_client_max (CONNECTIONS) are refused at once with
// RESOURCE_EXHAUSTED naming the limit and how to raise it; then SESSIONS
// sessions over 8 clients (grpc-js shares one connection between them, so
// past HTTP/2's stream limit), every one welcomed, and the next ones refused
// just as plainly, naming limits.sessions_per_uid_max.
// Usage: node node_quota.js TARGET PROTO_DIR SESSIONS CONNECTIONS
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, protoDir, sessionsArg, connectionsArg] = process.argv.slice(2);
const SESSIONS = Number(sessionsArg);
const CONNECTIONS = Number(connectionsArg);
const definition = protoLoader.loadSync('dlm/v1/dlm.proto', {
  includeDirs: [protoDir], longs: Number, enums: String, defaults: true, oneofs: true,
});
const dlm = grpc.loadPackageDefinition(definition).dlm.v1;
const ANSWER_WITHIN_MS = 5000;
let checks = 0;

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
  checks += 1;
}

// A session's first answer: { call } once welcomed, or { error }.
function openSession(client) {
  return new Promise((resolve) => {
    const call = client.Session();
    const timer = setTimeout(() => check(false, `no welcome and no error within ${ANSWER_WITHIN_MS} ms`),
      ANSWER_WITHIN_MS);
    call.once('data', (message) => {
      clearTimeout(timer);
      check(message.body === 'welcome', `a welcome, got ${JSON.stringify(message)}`);
      resolve({ call });
    });
    call.once('error', (error) => {
      clearTimeout(timer);
      resolve({ error });
    });
  });
}

function refusedFor(error, limit) {
  check(error !== undefined, `refused for ${limit}`);
  check(error.code === grpc.status.RESOURCE_EXHAUSTED, `RESOURCE_EXHAUSTED, got ${error.code}`);
  check(error.details.includes(`limits.${limit}`) && error.details.includes('raise'),
    `the refusal names limits.${limit} and how to raise it: ${error.details}`);
}

async function connectionsUpToTheLimit() {
  const own = Array.from({ length: 16 },
    () => new dlm.Dlm(target, grpc.credentials.createInsecure(), { 'grpc.use_local_subchannel_pool': 1 }));
  const welcomed = [];
  const refusals = [];
  for (const client of own) {
    const { call, error } = await openSession(client);
    if (error) refusals.push(error); else welcomed.push(call);
  }
  check(welcomed.length === CONNECTIONS, `${CONNECTIONS} connections served, got ${welcomed.length}`);
  refusals.forEach((error) => refusedFor(error, 'connections_per_client_max'));
  welcomed.forEach((call) => { call.on('error', () => {}); call.cancel(); });
  own.forEach((client) => client.close());
}

async function sessionsUpToTheLimit() {
  const clients = Array.from({ length: 8 }, () => new dlm.Dlm(target, grpc.credentials.createInsecure()));
  // The first part's connections close as the agent sees them go: the
  // first session waits for room.
  const until = Date.now() + ANSWER_WITHIN_MS;
  let first;
  for (;;) {
    first = await openSession(clients[0]);
    if (!first.error) break;
    check(Date.now() < until, `connections given back are not free again: ${first.error.details}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const calls = [first.call];
  for (let n = 1; n < SESSIONS; n += 1) {
    const { call, error } = await openSession(clients[n % clients.length]);
    check(!error, `session ${n + 1} of ${SESSIONS} refused: ${error && error.details}`);
    calls.push(call);
  }
  for (let n = 0; n < 3; n += 1) {
    const { error } = await openSession(clients[0]);
    refusedFor(error, 'sessions_per_uid_max');
  }
  calls.forEach((call) => { call.on('error', () => {}); call.cancel(); });
  clients.forEach((client) => client.close());
}

(async () => {
  await connectionsUpToTheLimit();
  await sessionsUpToTheLimit();
  console.log(`${checks} passed, 0 failed`);
  process.exit(0);
})();
