// A dlm session from Node's @grpc/grpc-js, unmodified: the service loaded
// from the repository's .proto at test time with @grpc/proto-loader, the
// channel opened with the library's defaults on the agent's Unix socket or
// TCP listener. Usage: node node_grpc.js TARGET PROTO_DIR, TARGET being
// unix:PATH or HOST:PORT
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, protoDir] = process.argv.slice(2);
const definition = protoLoader.loadSync('dlm/v1/dlm.proto', {
  includeDirs: [protoDir], longs: Number, enums: String, defaults: true, oneofs: true,
});
const dlm = grpc.loadPackageDefinition(definition).dlm.v1;
const fs = require('fs');
// TCP: TLS against the cluster's CA, with a client certificate (the
// client's identity for the agent's access policy).
const tls = !target.startsWith('unix:') && process.env.DLM_TLS_CA;
const client = tls
  ? new dlm.Dlm(target, grpc.credentials.createSsl(
    fs.readFileSync(process.env.DLM_TLS_CA), fs.readFileSync(process.env.DLM_TLS_KEY),
    fs.readFileSync(process.env.DLM_TLS_CERT)), { 'grpc.ssl_target_name_override': process.env.DLM_TLS_NAME })
  : new dlm.Dlm(target, grpc.credentials.createInsecure());

const WAIT_MS = 10000;
const NOQUEUE = 1, VALBLK = 4, UNLOCK_VALBLK = 2;
let checks = 0;

function check(condition, what) {
  if (!condition) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
  checks += 1;
}

function unary(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + WAIT_MS }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

// One Session stream: answers are queued, and `next` waits for the next one.
class Session {
  constructor() {
    this.answers = [];
    this.waiting = null;
    this.stream = client.Session();
    this.stream.on('data', (message) => this.push(message));
    this.stream.on('error', (error) => this.push(error));
  }

  push(message) {
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = null;
      resolve(message);
    } else {
      this.answers.push(message);
    }
  }

  async next(ms = WAIT_MS) {
    const message = this.answers.length
      ? this.answers.shift()
      : await new Promise((resolve) => {
        this.waiting = resolve;
        setTimeout(() => {
          if (this.waiting === resolve) {
            this.waiting = null;
            resolve(null);
          }
        }, ms);
      });
    if (message instanceof Error) check(false, `the session broke: ${message.message}`);
    return message;
  }

  async welcome() {
    const message = await this.next();
    check(message && message.body === 'welcome', `a welcome first: ${JSON.stringify(message)}`);
  }

  lock(handle, name, mode, flags = 0, timeoutMs = 0, lockspace = 'js') {
    this.stream.write({ lock: { handle, lockspace, name: Buffer.from(name), mode, flags, timeoutMs } });
  }

  async completion(handle) {
    const message = await this.next();
    check(message && message.body === 'completion' && message.completion.handle === handle,
      `a completion of ${handle}: ${JSON.stringify(message)}`);
    return message.completion;
  }
}

async function main() {
  const status = await unary('Status', {});
  check(status.version !== '', 'Status answers');
  await unary('CreateLockspace', { name: 'js', lvbLen: 16 });
  const listed = (await unary('Lockspaces', {})).lockspaces.map((ls) => ls.name);
  check(listed.includes('js'), `the new lockspace is listed: ${listed}`);

  const a = new Session();
  const b = new Session();
  await a.welcome();
  await b.welcome();

  // Lock, try-lock, blocking callback, value block, fencing tokens.
  a.lock(1, 'r', 'MODE_EX', VALBLK);
  const first = await a.completion(1);
  check(first.status === 'STATUS_GRANTED' && first.fencingToken > 0, `EX granted: ${JSON.stringify(first)}`);
  b.lock(1, 'r', 'MODE_EX', NOQUEUE);
  check((await b.completion(1)).status === 'STATUS_WOULD_BLOCK', 'a try-lock would block');
  b.lock(2, 'r', 'MODE_PR', VALBLK);
  const blocking = await a.next();
  check(blocking && blocking.body === 'blocking' && blocking.blocking.mode === 'MODE_PR', 'the holder hears it blocks PR');
  a.stream.write({ unlock: { handle: 1, flags: UNLOCK_VALBLK, lvb: Buffer.from('hello') } });
  check((await a.completion(1)).status === 'STATUS_UNLOCKED', 'unlocked');
  const read = await b.completion(2);
  check(read.status === 'STATUS_GRANTED' && read.lvb.subarray(0, 5).toString() === 'hello', 'PR reads the value block');
  check(read.fencingToken > first.fencingToken, 'tokens increase');

  // Conversion, timeout, cancel.
  b.stream.write({ convert: { handle: 2, mode: 'MODE_EX' } });
  const converted = await b.completion(2);
  check(converted.status === 'STATUS_GRANTED' && converted.mode === 'MODE_EX', 'converted to EX');
  a.lock(2, 'r', 'MODE_EX', 0, 50);
  check((await a.completion(2)).status === 'STATUS_TIMED_OUT', 'a request times out');
  check((await b.next()).body === 'blocking', 'the holder heard of it');
  a.lock(3, 'r', 'MODE_EX');
  a.stream.write({ cancel: { handle: 3 } });
  check((await a.completion(3)).status === 'STATUS_CANCELLED', 'a waiting request is cancelled');
  b.stream.write({ unlock: { handle: 2 } });
  check((await b.completion(2)).status === 'STATUS_UNLOCKED', 'unlocked');

  // A deadlock: each session holds one resource and asks for the other's.
  a.lock(10, 'x', 'MODE_EX');
  b.lock(10, 'y', 'MODE_EX');
  check((await a.completion(10)).status === 'STATUS_GRANTED', 'a holds x');
  check((await b.completion(10)).status === 'STATUS_GRANTED', 'b holds y');
  a.lock(11, 'y', 'MODE_EX');
  b.lock(11, 'x', 'MODE_EX');
  const seen = [];
  const deadline = Date.now() + WAIT_MS;
  const isVictim = (m) => m && m.body === 'completion' && m.completion.status === 'STATUS_DEADLOCK';
  while (Date.now() < deadline && !seen.some(isVictim)) {
    for (const session of [a, b]) {
      const message = await session.next(50);
      if (message) seen.push(message);
    }
  }
  const victims = seen.filter(isVictim);
  check(victims.length === 1 && victims[0].completion.handle === 11, `one deadlock victim: ${JSON.stringify(seen)}`);

  // A typed rejection.
  a.lock(20, 'r', 'MODE_EX', 0, 0, 'no-such-lockspace');
  const rejected = await a.next();
  check(rejected && rejected.body === 'rejected' && rejected.rejected.code === 'unknown_lockspace',
    `a typed rejection: ${JSON.stringify(rejected)}`);

  // The dump sees the locks; a forced release ends them.
  const dump = await unary('Dump', { lockspace: 'js' });
  check(dump.resources.some((r) => ['x', 'y'].includes(r.name.toString())), 'the dump shows the resources');
  // A forced release takes the locks from their holders: each is told at
  // once, on its own stream, which lock it lost and why.
  await unary('ReleaseLockspace', { name: 'js', force: true });
  const told = [];
  const until = Date.now() + WAIT_MS;
  while (Date.now() < until && told.length < 2) {
    for (const session of [a, b]) {
      const message = await session.next(50);
      if (message && message.body === 'revoked') told.push(message.revoked);
    }
  }
  check(told.length >= 2 && told.every((r) => r.reason.length > 0),
    `each holder is told its lock was revoked: ${JSON.stringify(told)}`);
  a.stream.end();
  b.stream.end();
  try {
    await unary('Dump', { lockspace: 'js' });
    check(false, 'a released lockspace is gone');
  } catch (error) {
    check(error.code === grpc.status.NOT_FOUND, `NOT_FOUND after release: ${error.code}`);
  }
  console.log(`${checks} passed, 0 failed`);
  client.close();
  process.exit(0);
}

main().catch((error) => {
  console.error(`FAILED: ${error.stack || error}`);
  process.exit(1);
});
