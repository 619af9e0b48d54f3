#!/usr/bin/env node
// A fedtray device written in Node.js from docs/protocol.md alone (no Python sources read).
//
// Usage: node fedtray-node-client.mjs URL ROUNDS [options]
//   --chunk-bytes N    maxChunkBytes announced to the server, and the largest chunk / inline
//                      document this client sends (default 524288; a small value forces
//                      the blob sub-protocol in both directions)
//   --tasks a,b        capabilities.tasks (default: the server's task from GET /api/status,
//                      else "synthetic,digits")
//   --delta X          the "training": add X to every float (default 0.01)
//   --num-samples N    numSamples of every update (default 100)
//   --timeout S        give up (exit 1) after S seconds (default 90)
//   --probe-errors     send malformed payloads and print the answers
//   --device-id UUID   deviceId (default: a random UUID)
//
// Prints one JSON object per line on stdout for every event handled; exits 0 after ROUNDS
// updates were accepted and the global model aggregated from the last one was received.

import { createHash, randomUUID } from "node:crypto";
import { io } from "socket.io-client";

// ------------------------------------------------------------------ arguments and output

function usage(msg) {
  process.stderr.write(`${msg}\nusage: fedtray-node-client.mjs URL ROUNDS [options]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const pos = [];
  const opts = {
    chunkBytes: 512 * 1024,
    tasks: null,
    delta: 0.01,
    numSamples: 100,
    timeout: 90,
    probeErrors: false,
    deviceId: randomUUID(),
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`missing value for ${a}`);
      return argv[++i];
    };
    if (a === "--chunk-bytes") opts.chunkBytes = Number.parseInt(next(), 10);
    else if (a === "--tasks") opts.tasks = next().split(",").filter(Boolean);
    else if (a === "--delta") opts.delta = Number.parseFloat(next());
    else if (a === "--num-samples") opts.numSamples = Number.parseInt(next(), 10);
    else if (a === "--timeout") opts.timeout = Number.parseFloat(next());
    else if (a === "--probe-errors") opts.probeErrors = true;
    else if (a === "--device-id") opts.deviceId = next();
    else if (a.startsWith("--")) usage(`unknown option ${a}`);
    else pos.push(a);
  }
  if (pos.length !== 2) usage("need URL and ROUNDS");
  const rounds = Number.parseInt(pos[1], 10);
  if (!(rounds >= 1)) usage("ROUNDS must be >= 1");
  if (!(opts.chunkBytes >= 1)) usage("--chunk-bytes must be >= 1");
  return { url: pos[0], rounds, ...opts };
}

const args = parseArgs(process.argv.slice(2));

function emitLine(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, t: Date.now() / 1000, ...fields })}\n`);
}

function toBuffer(x) {
  if (Buffer.isBuffer(x)) return x;
  if (x instanceof ArrayBuffer) return Buffer.from(x);
  if (ArrayBuffer.isView(x)) return Buffer.from(x.buffer, x.byteOffset, x.byteLength);
  return null;
}

const sha256hex = (buf) => createHash("sha256").update(buf).digest("hex");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

class ProtoError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}
const errorAck = (code, message) => ({ ok: false, code, message: String(message).slice(0, 1000) });

// ------------------------------------------------------------------ validation helpers

const ID_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
const SHA_RE = /^[0-9a-f]{64}$/;
const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const isInt = (v) => typeof v === "number" && Number.isInteger(v);

function need(cond, what) {
  if (!cond) throw new ProtoError("bad_request", what);
}

// ------------------------------------------------------------------ weight formats

// json: {name: {dtype, shape, data: [...]}}, values flattened in C order.
// safetensors: u64 LE header length, JSON header, little-endian tensor bytes.
const ST_DTYPES = {
  F32: ["float32", 4, (dv, o) => dv.getFloat32(o, true), (dv, o, v) => dv.setFloat32(o, v, true)],
  F64: ["float64", 8, (dv, o) => dv.getFloat64(o, true), (dv, o, v) => dv.setFloat64(o, v, true)],
  I8: ["int8", 1, (dv, o) => dv.getInt8(o), (dv, o, v) => dv.setInt8(o, v)],
  I16: ["int16", 2, (dv, o) => dv.getInt16(o, true), (dv, o, v) => dv.setInt16(o, v, true)],
  I32: ["int32", 4, (dv, o) => dv.getInt32(o, true), (dv, o, v) => dv.setInt32(o, v, true)],
  I64: [
    "int64",
    8,
    (dv, o) => Number(dv.getBigInt64(o, true)),
    (dv, o, v) => dv.setBigInt64(o, BigInt(v), true),
  ],
  U8: ["uint8", 1, (dv, o) => dv.getUint8(o), (dv, o, v) => dv.setUint8(o, v)],
  BOOL: ["bool", 1, (dv, o) => dv.getUint8(o) !== 0, (dv, o, v) => dv.setUint8(o, v ? 1 : 0)],
};
const NP_TO_ST = Object.fromEntries(Object.entries(ST_DTYPES).map(([k, v]) => [v[0], k]));
const JSON_DTYPES = new Set([
  "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
]);
const isFloat = (dtype) => dtype.startsWith("float");
const numel = (shape) => shape.reduce((a, b) => a * b, 1);

function decodeWeights(buf, format) {
  let doc;
  if (format === "json") {
    try {
      doc = JSON.parse(buf.toString("utf8"));
    } catch (e) {
      throw new ProtoError("malformed", `not JSON: ${e.message}`);
    }
    if (!isObj(doc)) throw new ProtoError("malformed", "top level is not an object");
    for (const [name, t] of Object.entries(doc)) {
      if (!isObj(t) || !Array.isArray(t.shape) || !Array.isArray(t.data))
        throw new ProtoError("malformed", `tensor ${name} lacks dtype/shape/data`);
      if (!JSON_DTYPES.has(t.dtype)) throw new ProtoError("unknown_dtype", `${name}: ${t.dtype}`);
      if (t.data.length !== numel(t.shape))
        throw new ProtoError("malformed", `${name}: ${t.data.length} values for shape ${t.shape}`);
    }
  } else if (format === "safetensors") {
    if (buf.length < 8) throw new ProtoError("truncated", "shorter than the header length");
    const n = Number(buf.readBigUInt64LE(0));
    if (8 + n > buf.length) throw new ProtoError("truncated", "header runs past the end");
    let header;
    try {
      header = JSON.parse(buf.subarray(8, 8 + n).toString("utf8"));
    } catch (e) {
      throw new ProtoError("malformed", `bad header: ${e.message}`);
    }
    const body = buf.subarray(8 + n);
    const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
    doc = {};
    for (const [name, t] of Object.entries(header)) {
      if (name === "__metadata__") continue;
      const spec = ST_DTYPES[t.dtype];
      if (!spec) throw new ProtoError("unknown_dtype", `${name}: ${t.dtype}`);
      const [np, size, get] = spec;
      const [begin, end] = t.data_offsets;
      if (end - begin !== numel(t.shape) * size)
        throw new ProtoError("bad_offsets", `${name}: offsets disagree with shape`);
      if (end > body.length) throw new ProtoError("truncated", `${name} runs past the end`);
      const data = [];
      for (let o = begin; o < end; o += size) data.push(get(dv, o));
      doc[name] = { dtype: np, shape: t.shape, data };
    }
  } else {
    throw new ProtoError("unsupported_format", `format ${format}`);
  }
  for (const [name, t] of Object.entries(doc)) {
    if (isFloat(t.dtype) && !t.data.every((v) => typeof v === "number" && Number.isFinite(v)))
      throw new ProtoError("non_finite", `${name} holds a non-finite value`);
  }
  return doc;
}

function encodeWeights(doc, format) {
  if (format === "json") return Buffer.from(JSON.stringify(doc), "utf8");
  if (format !== "safetensors") throw new ProtoError("unsupported_format", format);
  const header = {};
  let offset = 0;
  const names = Object.keys(doc).sort();
  for (const name of names) {
    const t = doc[name];
    const st = NP_TO_ST[t.dtype];
    if (!st) throw new ProtoError("unknown_dtype", `${name}: ${t.dtype}`);
    const bytes = numel(t.shape) * ST_DTYPES[st][1];
    header[name] = { dtype: st, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let hjson = Buffer.from(JSON.stringify(header), "utf8");
  const pad = (8 - (hjson.length % 8)) % 8; // aligned header, padded with spaces
  hjson = Buffer.concat([hjson, Buffer.alloc(pad, 0x20)]);
  const out = Buffer.alloc(8 + hjson.length + offset);
  out.writeBigUInt64LE(BigInt(hjson.length), 0);
  hjson.copy(out, 8);
  const dv = new DataView(out.buffer, out.byteOffset + 8 + hjson.length, offset);
  for (const name of names) {
    const t = doc[name];
    const [, size, , set] = ST_DTYPES[NP_TO_ST[t.dtype]];
    let o = header[name].data_offsets[0];
    for (const v of t.data) {
      set(dv, o, v);
      o += size;
    }
  }
  return out;
}

/** The "training": add `delta` to every float, rounded to the tensor's precision. */
function train(doc, delta) {
  const out = {};
  for (const [name, t] of Object.entries(doc)) {
    let data = t.data;
    if (isFloat(t.dtype)) {
      data = data.map((v) => (t.dtype === "float64" ? v + delta : Math.fround(v + delta)));
    }
    out[name] = { dtype: t.dtype, shape: t.shape, data };
  }
  return out;
}

function summary(doc) {
  const tensors = {};
  let count = 0;
  for (const [name, t] of Object.entries(doc)) {
    tensors[name] = { dtype: t.dtype, shape: t.shape, sum: t.data.reduce((a, b) => a + Number(b), 0) };
    count += t.data.length;
  }
  // Full values only for small models, so a test can compare them exactly.
  return count <= 20000 ? { tensors, values: doc } : { tensors };
}

// ------------------------------------------------------------------ blob receiver

const BLOB_KEEP_MS = 10 * 60 * 1000;
const MAX_BLOB_BYTES = 512 * 1024 * 1024;

class BlobStore {
  constructor(maxChunkBytes) {
    this.maxChunkBytes = maxChunkBytes;
    this.blobs = new Map(); // blobId -> {total, sha256, parts, received, touched}
  }

  expire() {
    const now = Date.now();
    for (const [id, b] of this.blobs) if (now - b.touched > BLOB_KEEP_MS) this.blobs.delete(id);
  }

  accept(p) {
    need(isObj(p), "blob:chunk payload must be an object");
    need(typeof p.blobId === "string" && ID_RE.test(p.blobId), "bad blobId");
    need(isInt(p.offset) && p.offset >= 0, "bad offset");
    need(isInt(p.total) && p.total >= 1, "bad total");
    need(typeof p.sha256 === "string" && SHA_RE.test(p.sha256), "bad sha256");
    const data = toBuffer(p.data);
    need(data !== null, "data must be a binary attachment");
    if (data.length > this.maxChunkBytes)
      throw new ProtoError("chunk_too_large", `${data.length} > ${this.maxChunkBytes}`);
    if (p.total > MAX_BLOB_BYTES) throw new ProtoError("blob_too_large", `${p.total}`);
    this.expire();
    let b = this.blobs.get(p.blobId);
    if (!b) {
      b = { total: p.total, sha256: p.sha256, parts: [], received: 0, touched: Date.now() };
      this.blobs.set(p.blobId, b);
    } else if (b.total !== p.total || b.sha256 !== p.sha256) {
      throw new ProtoError("blob_mismatch", "total or sha256 differ from the first chunk");
    }
    b.touched = Date.now();
    if (p.offset > b.received)
      throw new ProtoError("offset_gap", `offset ${p.offset} > received ${b.received}`);
    if (p.offset === b.received && data.length > 0) {
      if (b.received + data.length > b.total)
        throw new ProtoError("size_mismatch", "chunk runs past the announced total");
      b.parts.push(Buffer.from(data));
      b.received += data.length;
      // The chunk that completes the blob is checked; a blob that fails is dropped.
      if (b.received === b.total && sha256hex(Buffer.concat(b.parts)) !== b.sha256) {
        this.blobs.delete(p.blobId);
        throw new ProtoError("checksum_mismatch", "the complete blob does not hash to sha256");
      }
    }
    return { ok: true, received: b.received, complete: b.received === b.total };
  }

  status(p) {
    need(isObj(p) && typeof p.blobId === "string" && ID_RE.test(p.blobId), "bad blobId");
    this.expire();
    const b = this.blobs.get(p.blobId);
    return b
      ? { ok: true, received: b.received, complete: b.received === b.total }
      : { ok: true, received: 0, complete: false };
  }

  /** The bytes a WeightsRef names, verified against its size and sha256. */
  take(ref) {
    need(isObj(ref), "weights must be an object");
    need(ref.format === "json" || ref.format === "safetensors", "bad weights.format");
    need(isInt(ref.size) && ref.size >= 0, "bad weights.size");
    need(typeof ref.sha256 === "string" && SHA_RE.test(ref.sha256), "bad weights.sha256");
    let bytes;
    let inline = false;
    if (ref.data !== undefined && ref.data !== null) {
      bytes = toBuffer(ref.data);
      need(bytes !== null, "weights.data must be a binary attachment");
      inline = true;
    } else {
      need(typeof ref.blobId === "string" && ID_RE.test(ref.blobId), "neither data nor blobId");
      const b = this.blobs.get(ref.blobId);
      if (!b) throw new ProtoError("blob_unknown", `no blob ${ref.blobId}`);
      if (b.received !== b.total) throw new ProtoError("blob_incomplete", `${b.received}/${b.total}`);
      bytes = Buffer.concat(b.parts);
    }
    if (bytes.length !== ref.size)
      throw new ProtoError("size_mismatch", `${bytes.length} bytes, announced ${ref.size}`);
    if (sha256hex(bytes) !== ref.sha256) throw new ProtoError("checksum_mismatch", "sha256 differs");
    return { bytes, inline };
  }

  drop(blobId) {
    if (blobId) this.blobs.delete(blobId);
  }
}

// ------------------------------------------------------------------ the device

const ACK_TIMEOUT_MS = 15000;
const state = {
  registered: null, // DeviceRegistered
  global: null, // {version, weights, task}
  busy: null, // roundId being trained / uploaded
  phase: "idle",
  accepted: [], // SubmitAccepted acks
  lastRound: null,
  finished: false,
  heartbeatTimer: null,
  heartbeats: 0,
};
const blobs = new BlobStore(args.chunkBytes);

async function discoverTasks() {
  if (args.tasks) return args.tasks;
  // Not in the protocol itself: the HTTP status API names the server's task. A device must
  // list the task in capabilities.tasks at registration, before the ack tells it the task.
  try {
    const ctl = AbortSignal.timeout(5000);
    const res = await fetch(new URL("/api/status", args.url), { signal: ctl });
    const body = await res.json();
    if (typeof body.task === "string") return [body.task];
  } catch (e) {
    emitLine("task_discovery_failed", { error: String(e) });
  }
  return ["synthetic", "digits"];
}

function resources() {
  return { cpuPercent: 10.0, ramUsedPercent: 50.0, ramAvailableMb: 2048, battery: null };
}

function registerPayload(tasks) {
  return {
    protocol: 1,
    deviceId: args.deviceId,
    name: "node-interop",
    deviceType: "desktop",
    platform: { os: process.platform, release: process.version, arch: process.arch, python: "n/a" },
    hardware: { cpuCores: 1, ramTotalMb: 4096, gpu: null, batteryPresent: false },
    resources: resources(),
    capabilities: {
      torchVersion: null,
      simulation: true,
      tasks,
      weightFormats: ["json"],
      maxChunkBytes: args.chunkBytes,
      maxBlobBytes: MAX_BLOB_BYTES,
      maxInflightChunks: 4,
    },
    clientVersion: "node-interop/0.0.0",
    weightsVersion: state.global ? state.global.version : null,
  };
}

function fail(msg, extra = {}) {
  emitLine("fatal", { message: msg, ...extra });
  process.exitCode = 1;
  shutdown();
}

let socket = null;
function shutdown() {
  if (state.heartbeatTimer) clearInterval(state.heartbeatTimer);
  state.heartbeatTimer = null;
  if (socket) socket.disconnect();
  clearTimeout(overall);
  // Give stdout a moment to flush, then leave even if something still holds the loop.
  setTimeout(() => process.exit(process.exitCode ?? 0), 200).unref();
}

const overall = setTimeout(() => {
  fail(`timed out after ${args.timeout} s`, {
    accepted: state.accepted.length,
    globalVersion: state.global?.version ?? null,
  });
}, args.timeout * 1000);

async function call(event, payload, timeoutMs = ACK_TIMEOUT_MS) {
  return socket.timeout(timeoutMs).emitWithAck(event, payload);
}

function heartbeatPayload() {
  return {
    state: state.phase,
    roundId: state.busy,
    weightsVersion: state.global ? state.global.version : null,
    resources: resources(),
  };
}

async function sendHeartbeat() {
  try {
    const ack = await call("device:heartbeat", heartbeatPayload());
    state.heartbeats += 1;
    if (!ack || ack.ok !== true) emitLine("heartbeat_refused", { ack });
    else if (state.heartbeats === 1) emitLine("heartbeat_ack", { ack });
  } catch (e) {
    emitLine("heartbeat_failed", { error: String(e) });
  }
}

async function probeErrors() {
  const probes = [
    ["cpuPercent_string", { state: "idle", resources: { ...resources(), cpuPercent: "12.5" } }],
    ["state_missing", { resources: resources() }],
    ["cpuPercent_out_of_range", { state: "idle", resources: { ...resources(), cpuPercent: 150 } }],
    ["payload_not_object", "hello"],
    ["unknown_field_ignored", { ...heartbeatPayload(), someFutureField: { x: 1 } }],
  ].map(([name, payload]) => [name, "device:heartbeat", payload]);
  const fakeSha = "0".repeat(64);
  const big = (state.registered?.limits?.maxChunkBytes ?? 512 * 1024) + 1;
  probes.push(
    ["blob_status_unknown", "blob:status", { blobId: "node-probe-unknown" }],
    [
      "blob_offset_gap",
      "blob:chunk",
      { blobId: "node-probe-gap", offset: 10, total: 20, sha256: fakeSha, data: Buffer.alloc(10) },
    ],
    [
      "blob_chunk_too_large",
      "blob:chunk",
      { blobId: "node-probe-big", offset: 0, total: big, sha256: fakeSha, data: Buffer.alloc(big) },
    ],
    [
      "blob_past_total",
      "blob:chunk",
      { blobId: "node-probe-past", offset: 0, total: 4, sha256: fakeSha, data: Buffer.alloc(5) },
    ],
    [
      "blob_bad_checksum",
      "blob:chunk",
      { blobId: "node-probe-sum", offset: 0, total: 4, sha256: fakeSha, data: Buffer.alloc(4) },
    ],
    ["blob_status_after_bad_checksum", "blob:status", { blobId: "node-probe-sum" }],
    [
      "blob_data_base64_string",
      "blob:chunk",
      { blobId: "node-probe-b64", offset: 0, total: 4, sha256: fakeSha, data: "AAAAAA==" },
    ],
    [
      "submit_unknown_round",
      "weights:submit",
      {
        roundId: "no-such-round",
        baseVersion: 0,
        numSamples: 1,
        metrics: {},
        weights: { format: "json", size: 2, sha256: sha256hex(Buffer.from("{}")), data: Buffer.from("{}") },
      },
    ],
  );
  for (const [name, event, payload] of probes) {
    try {
      const ack = await call(event, payload);
      emitLine("probe", { probe: name, ack });
    } catch (e) {
      emitLine("probe", { probe: name, error: String(e) });
    }
  }
}

async function register(tasks, first) {
  if (first && args.probeErrors) {
    for (const [name, event, payload] of [
      ["heartbeat_before_register", "device:heartbeat", heartbeatPayload()],
      ["blob_status_before_register", "blob:status", { blobId: "node-probe-early" }],
    ]) {
      try {
        const ack = await call(event, payload);
        emitLine("probe", { probe: name, ack });
      } catch (e) {
        emitLine("probe", { probe: name, error: String(e) });
      }
    }
  }
  if (first && args.probeErrors) {
    for (const [name, protocol] of [["register_protocol_2", 2], ["register_protocol_string", "1"]]) {
      try {
        const bad = await call("device:register", { ...registerPayload(tasks), protocol });
        emitLine("probe", { probe: name, ack: bad });
      } catch (e) {
        emitLine("probe", { probe: name, error: String(e) });
      }
    }
  }
  let ack;
  try {
    ack = await call("device:register", registerPayload(tasks));
  } catch (e) {
    return fail(`device:register got no ack: ${e}`);
  }
  emitLine("register_ack", { ack });
  if (!ack || ack.ok !== true) return fail("registration refused", { ack });
  state.registered = ack;
  if (state.heartbeatTimer) clearInterval(state.heartbeatTimer);
  const every = Math.max(0.05, Number(ack.heartbeatIntervalSec)) * 1000;
  state.heartbeatTimer = setInterval(sendHeartbeat, every);
  sendHeartbeat();
  if (first && args.probeErrors) await probeErrors();
}

function onGlobal(payload, ack) {
  const reply = typeof ack === "function" ? ack : () => {};
  try {
    need(isObj(payload), "weights:global payload must be an object");
    need(isInt(payload.version) && payload.version >= 0, "bad version");
    need(typeof payload.task === "string", "bad task");
    const { bytes, inline } = blobs.take(payload.weights);
    const weights = decodeWeights(bytes, payload.weights.format);
    blobs.drop(payload.weights.blobId);
    state.global = { version: payload.version, task: payload.task, weights };
    emitLine("weights:global", {
      version: payload.version,
      roundId: payload.roundId ?? null,
      metrics: payload.metrics ?? {},
      format: payload.weights.format,
      size: payload.weights.size,
      inline,
      ...summary(weights),
    });
    reply({ ok: true });
    maybeFinish();
  } catch (e) {
    const code = e instanceof ProtoError ? e.code : "internal_error";
    emitLine("weights:global_refused", { code, message: e.message });
    reply(errorAck(code, e.message));
  }
}

function maybeFinish() {
  if (state.finished || state.accepted.length < args.rounds || !state.global) return;
  // Done once the global model aggregated from our last accepted update has arrived.
  if (state.global.version > state.lastRound.baseVersion) {
    state.finished = true;
    emitLine("done", { rounds: state.accepted.length, globalVersion: state.global.version });
    shutdown();
  }
}

function onTrainingStart(p, ack) {
  const reply = typeof ack === "function" ? ack : () => {};
  const refuse = (reason, detail) => {
    emitLine("training:start", { roundId: p?.roundId ?? null, accepted: false, reason, detail });
    reply({ accepted: false, reason, detail });
  };
  try {
    need(isObj(p), "training:start payload must be an object");
    need(typeof p.roundId === "string" && ID_RE.test(p.roundId), "bad roundId");
    need(isInt(p.baseVersion) && p.baseVersion >= 0, "bad baseVersion");
    need(typeof p.deadline === "number", "bad deadline");
    need(isObj(p.config) && isInt(p.config.epochs), "bad config");
  } catch (e) {
    // TrainingStartAck has no error form; refuse with the closest reason.
    return refuse("busy", `bad training:start: ${e.message}`);
  }
  if (state.busy) return refuse("busy", `training ${state.busy}`);
  if (p.baseWeights != null) {
    // A small new global rides in training:start: taken exactly as a weights:global; an
    // ErrorAck answers the start when the weights are refused.
    let globalAck;
    onGlobal(p.baseWeights, (a) => (globalAck = a));
    if (!globalAck || globalAck.ok !== true) return reply(globalAck);
  }
  if (!state.tasks.includes(p.task))
    return refuse("unknown_task", `task ${p.task} is not installed`);
  if (!state.global || state.global.version !== p.baseVersion)
    return refuse("missing_base", `holding ${state.global?.version ?? "nothing"}`);
  if (p.deadline * 1000 < Date.now()) return refuse("deadline_passed", "deadline is over");
  const format = p.weightFormat ?? "safetensors";
  emitLine("training:start", {
    roundId: p.roundId,
    accepted: true,
    baseVersion: p.baseVersion,
    weightFormat: format,
    task: p.task,
    config: p.config,
    partition: p.partition,
  });
  state.busy = p.roundId;
  state.phase = "training";
  reply({ accepted: true });
  runRound(p, format).catch((e) => {
    emitLine("round_failed", { roundId: p.roundId, error: String(e) });
    socket.emit("training:error", {
      roundId: p.roundId,
      code: e instanceof ProtoError ? e.code : "training_failed",
      message: String(e.message ?? e).slice(0, 1000),
    });
    state.busy = null;
    state.phase = "idle";
  });
}

const cancelled = new Set();
function onCancel(p) {
  emitLine("training:cancel", { payload: p });
  if (isObj(p) && typeof p.roundId === "string") cancelled.add(p.roundId);
}

async function runRound(start, format) {
  const roundId = start.roundId;
  const t0 = Date.now();
  const steps = 2;
  for (let step = 1; step <= steps; step++) {
    if (cancelled.has(roundId)) throw new Error("cancelled");
    await sleep(500); // at most 2 progress events per second
    const progress = {
      roundId,
      epoch: start.config.epochs,
      epochs: start.config.epochs,
      step,
      steps,
      fraction: step / steps,
      loss: 1.0 / step,
      samplesPerSec: 1000.0,
      batchSize: start.config.batchSize,
      state: "training",
      pauseReason: null,
    };
    socket.emit("training:progress", progress);
    emitLine("training:progress", { roundId, step, steps, fraction: progress.fraction });
  }
  const update = train(state.global.weights, args.delta);
  const bytes = encodeWeights(update, format);
  const sha = sha256hex(bytes);
  const ref = { format, size: bytes.length, sha256: sha };
  const serverChunk = state.registered.limits?.maxChunkBytes ?? 1 << 20;
  const chunkBytes = Math.min(serverChunk, args.chunkBytes);
  state.phase = "uploading";
  if (bytes.length <= chunkBytes) {
    ref.data = bytes;
  } else {
    ref.blobId = sha;
    await sendBlob(sha, bytes, chunkBytes);
  }
  const submit = {
    roundId,
    baseVersion: start.baseVersion,
    numSamples: args.numSamples,
    metrics: { trainLoss: 0.5, seconds: (Date.now() - t0) / 1000 },
    weights: ref,
  };
  let ack = null;
  for (let attempt = 1; attempt <= 3 && ack === null; attempt++) {
    try {
      ack = await call("weights:submit", submit);
    } catch (e) {
      emitLine("submit_retry", { roundId, attempt, error: String(e) });
    }
  }
  emitLine("weights:submit", {
    roundId,
    baseVersion: start.baseVersion,
    inline: ref.data !== undefined,
    format,
    size: bytes.length,
    ack,
    ...summary(update),
  });
  state.busy = null;
  state.phase = "idle";
  if (ack && (ack.ok === true || ack.code === "duplicate")) {
    state.accepted.push(ack);
    state.lastRound = { roundId, baseVersion: start.baseVersion };
    maybeFinish();
  } else if (ack && ack.code === "round_closed") {
    emitLine("round_closed", { roundId });
  } else {
    fail("weights:submit refused", { ack });
  }
}

async function sendBlob(blobId, bytes, chunkBytes) {
  const inflight = Math.max(1, state.registered.limits?.maxInflightChunks ?? 1);
  let st = await call("blob:status", { blobId });
  emitLine("blob:status_ack", { blobId, ack: st });
  let offset = st && st.ok === true ? st.received : 0;
  let sent = 0;
  while (offset < bytes.length) {
    const batch = [];
    for (let k = 0; k < inflight && offset < bytes.length; k++) {
      const data = bytes.subarray(offset, Math.min(offset + chunkBytes, bytes.length));
      batch.push(
        call("blob:chunk", { blobId, offset, total: bytes.length, sha256: blobId, data }),
      );
      offset += data.length;
      sent += 1;
    }
    const acks = await Promise.all(batch);
    const bad = acks.find((a) => !a || a.ok !== true);
    if (bad) {
      if (bad.code !== "offset_gap") throw new ProtoError(bad.code ?? "internal_error", bad.message);
      st = await call("blob:status", { blobId });
      offset = st.received;
      continue;
    }
    offset = Math.max(...acks.map((a) => a.received));
  }
  emitLine("blob:sent", { blobId, total: bytes.length, chunks: sent, chunkBytes });
}

// ------------------------------------------------------------------ main

const tasks = await discoverTasks();
state.tasks = tasks;
emitLine("start", { url: args.url, rounds: args.rounds, deviceId: args.deviceId, tasks });
socket = io(args.url, {
  transports: ["websocket"],
  reconnectionAttempts: 5,
  reconnectionDelay: 500,
  timeout: 10000,
});
let connects = 0;
socket.on("connect", () => {
  connects += 1;
  emitLine("connect", { sid: socket.id, n: connects });
  register(tasks, connects === 1);
});
socket.on("disconnect", (reason) => {
  emitLine("disconnect", { reason });
  if (state.heartbeatTimer) clearInterval(state.heartbeatTimer);
  state.heartbeatTimer = null;
});
socket.on("connect_error", (err) => {
  emitLine("connect_error", { message: String(err?.message ?? err) });
  if (String(err?.message ?? "").startsWith("unauthorized:")) fail("token refused");
});
socket.io.on("reconnect_failed", () => fail("could not reconnect"));
socket.on("device:registered", (p) => emitLine("device:registered", { payload: p }));
socket.on("weights:global", onGlobal);
socket.on("training:start", onTrainingStart);
socket.on("training:cancel", onCancel);
socket.on("blob:chunk", (p, ack) => {
  const reply = typeof ack === "function" ? ack : () => {};
  try {
    const progress = blobs.accept(p);
    emitLine("blob:chunk", { blobId: p.blobId, offset: p.offset, total: p.total, ...progress });
    reply(progress);
  } catch (e) {
    const code = e instanceof ProtoError ? e.code : "internal_error";
    emitLine("blob:chunk_refused", { code, message: e.message });
    reply(errorAck(code, e.message));
  }
});
socket.on("blob:status", (p, ack) => {
  const reply = typeof ack === "function" ? ack : () => {};
  try {
    const progress = blobs.status(p);
    emitLine("blob:status", { blobId: p.blobId, ...progress });
    reply(progress);
  } catch (e) {
    reply(errorAck(e instanceof ProtoError ? e.code : "internal_error", e.message));
  }
});
socket.onAny((event) => {
  const known = [
    "device:registered", "weights:global", "training:start", "training:cancel",
    "blob:chunk", "blob:status",
  ];
  if (!known.includes(event)) emitLine("unknown_event", { name: event });
});
