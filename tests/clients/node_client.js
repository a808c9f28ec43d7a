#!/usr/bin/env node
// Node `ws` client run against eval-proxy as a real client would be.
//
// Usage:
//   node_client.js URL                      echo check: "hello" and 1 MiB of
//                                           binary come back exactly, then
//                                           Close 1000 "bye" is answered with 1000
//   node_client.js --expect-close CODE URL  the server must close with CODE
//                                           right after the handshake; prints
//                                           its reason
//   --timeout SECONDS                       for the whole check (default 30)
//   --ca FILE                               wss://: trust only this CA (PEM)
//   --server-name NAME                      wss://: SNI and the name to verify
//   --binary-size BYTES                     of the binary echo (default 1 MiB)
//   --expect-tls-error                      the TLS handshake must fail (the
//                                           certificate is not trusted or does
//                                           not match); prints the error code
//
// Exit 0 on success; 1 with one line on stderr otherwise; 2 on bad usage.
// Needs `npm ci` in this folder (.ci/install-deps.sh does it).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const BINARY_SIZE = 1024 * 1024;

// Set once the outcome is known, so the exit hook can tell a check that
// finished from one whose connection went quiet with nothing left to wait on.
let finished = false;

function fail(reason) {
  finished = true;
  process.stderr.write(`node_client: FAIL: ${reason}\n`);
  process.exit(1);
}

let WebSocket;
try {
  WebSocket = require(path.join(__dirname, 'node_modules', 'ws'));
} catch (e) {
  fail(`cannot load ws (run npm ci in ${__dirname}): ${e.message.split('\n')[0]}`);
}

function usage(reason) {
  process.stderr.write(`node_client: ${reason}\nusage: node_client.js [--timeout S] [--expect-close CODE] URL\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { timeout: 30, expectClose: null, url: null, ca: null, serverName: null, binarySize: BINARY_SIZE, expectTlsError: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--timeout' || a === '--expect-close' || a === '--binary-size') {
      const v = Number(argv[++i]);
      if (!Number.isFinite(v) || v <= 0) usage(`${a} needs a positive number`);
      if (a === '--timeout') args.timeout = v;
      else if (a === '--binary-size') args.binarySize = v;
      else args.expectClose = v;
    } else if (a === '--ca') {
      args.ca = argv[++i];
      if (!args.ca) usage('--ca needs a file');
    } else if (a === '--server-name') {
      args.serverName = argv[++i];
      if (!args.serverName) usage('--server-name needs a name');
    } else if (a === '--expect-tls-error') {
      args.expectTlsError = true;
    } else if (a.startsWith('-')) {
      usage(`unknown option ${a}`);
    } else if (args.url === null) {
      args.url = a;
    } else {
      usage('more than one URL');
    }
  }
  if (args.url === null) usage('missing URL');
  return args;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  let step = 'connecting';
  const timer = setTimeout(() => fail(`timed out after ${args.timeout}s while ${step}`), args.timeout * 1000);

  function succeed() {
    finished = true;
    clearTimeout(timer);
  }

  let ws;
  try {
    const opts = {
      handshakeTimeout: args.timeout * 1000,
      maxPayload: 4 * args.binarySize,
    };
    if (args.ca !== null) opts.ca = fs.readFileSync(args.ca);
    if (args.serverName !== null) opts.servername = args.serverName;
    ws = new WebSocket(args.url, opts);
  } catch (e) {
    fail(`${e.name}: ${e.message}`);
  }

  ws.on('unexpected-response', (_req, res) => fail(`handshake rejected: HTTP ${res.statusCode}`));
  if (args.expectTlsError) {
    ws.on('open', () => fail('the TLS handshake succeeded'));
    ws.on('error', (e) => {
      if (!e.code) fail(`error without a code: ${e.message}`);
      succeed();
      process.stdout.write(`${e.code}\n`);
      process.exit(0);
    });
    return;
  }
  ws.on('error', (e) => fail(`error while ${step}: ${e.message}`));

  if (args.expectClose !== null) {
    ws.on('open', () => {
      step = `waiting for Close ${args.expectClose}`;
    });
    ws.on('message', (_data, isBinary) => {
      fail(`expected Close ${args.expectClose}, got a ${isBinary ? 'binary' : 'text'} message first`);
    });
    ws.on('close', (code, reason) => {
      if (step === 'connecting') fail('connection closed during the handshake');
      if (code === 1006) fail(`connection dropped without a Close frame, expected Close ${args.expectClose}`);
      if (code !== args.expectClose) {
        fail(`server closed with ${code} ${JSON.stringify(reason.toString())}, expected ${args.expectClose}`);
      }
      succeed();
      process.stdout.write(`${reason.toString()}\n`);
    });
    return;
  }

  const text = 'hello';
  const binary = crypto.randomBytes(args.binarySize);
  let closing = false;

  ws.on('open', () => {
    step = 'waiting for the text echo';
    ws.send(text);
  });

  ws.on('message', (data, isBinary) => {
    if (step === 'waiting for the text echo') {
      if (isBinary) fail('text echo came back as a binary message');
      if (data.toString() !== text) fail(`text echo differs: got ${JSON.stringify(data.toString().slice(0, 80))}`);
      step = 'waiting for the binary echo';
      ws.send(binary);
    } else if (step === 'waiting for the binary echo') {
      if (!isBinary) fail('binary echo came back as a text message');
      if (!binary.equals(data)) {
        fail(`binary echo differs: sent ${binary.length} bytes, got ${data.length}, first difference at ${firstDiff(binary, data)}`);
      }
      step = 'closing with 1000';
      closing = true;
      ws.close(1000, 'bye');
    } else {
      fail(`unexpected ${isBinary ? 'binary' : 'text'} message while ${step}`);
    }
  });

  ws.on('close', (code, reason) => {
    if (!closing) fail(`connection closed while ${step}: ${describeClose(code, reason)}`);
    // ws reports 1006 when no Close frame came back, so 1000 here means the
    // server answered the closing handshake with 1000.
    if (code !== 1000) fail(`closing handshake answered with ${describeClose(code, reason)}, expected 1000`);
    succeed();
  });

  process.on('exit', () => {
    if (!finished) {
      process.stderr.write(`node_client: FAIL: event loop ran dry while ${step}\n`);
      process.exitCode = 1;
    }
  });
}

function describeClose(code, reason) {
  if (code === 1006) return 'no Close frame received';
  return `server sent Close ${code} ${JSON.stringify(reason.toString())}`;
}

function firstDiff(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

main();
