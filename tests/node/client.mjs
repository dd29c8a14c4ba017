// A ringserve client in a second language, written from docs/protocol.md alone.
// Usage: node client.mjs PORT [HOST]. Runs health, one infer, 32 pipelined
// infers on one connection (matched by id) and feedback by a rid from an
// answer; prints a JSON summary; exits 1 on any mismatch. msgpack is decoded
// with the library's default options, so integers arrive as JS numbers
// (doubles): a rid survives only if the server keeps it below 2^53.
import net from "node:net";
import { encode, decode } from "@msgpack/msgpack";

const [port, host = "127.0.0.1"] = [Number(process.argv[2]), process.argv[3]];
const errors = [];
const check = (ok, what) => { if (!ok) errors.push(what); };
const b64 = (u8) => Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength).toString("base64");

// Frames: a 4-byte big-endian length, then one msgpack map.
const sock = net.connect(port, host);
sock.setNoDelay(true);
sock.setTimeout(30000, () => sock.destroy(new Error("no answer in 30 s")));
const queue = [], waiting = [];
let buf = Buffer.alloc(0);
sock.on("data", (chunk) => {
  buf = Buffer.concat([buf, chunk]);
  while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
    const n = buf.readUInt32BE(0);
    const msg = decode(buf.subarray(4, 4 + n));   // default options: ints are numbers
    buf = buf.subarray(4 + n);
    waiting.length ? waiting.shift().resolve(msg) : queue.push(msg);
  }
});
let failed = null;
const fail = (e) => { failed = failed || e; for (const w of waiting.splice(0)) w.reject(failed); };
sock.on("error", fail);
sock.on("close", () => fail(new Error("the server closed the connection")));
const frame = (msg) => { const body = encode(msg); const h = Buffer.alloc(4); h.writeUInt32BE(body.length); return Buffer.concat([h, body]); };
const recv = () => queue.length ? Promise.resolve(queue.shift())
  : failed ? Promise.reject(failed) : new Promise((resolve, reject) => waiting.push({ resolve, reject }));
const call = async (msg) => { sock.write(frame(msg)); return recv(); };

// Tensors: {dtype, shape, data: raw little-endian bytes}; inputs from a fixed-seed PRNG.
let seed = 12345;
const rand = () => { seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0; return seed / 2 ** 31 - 1; };
function tensor(n) {
  const data = new Uint8Array(4 * n), view = new DataView(data.buffer);
  for (let i = 0; i < n; i++) view.setFloat32(4 * i, rand(), true);
  return { dtype: "float32", shape: [n], data };
}
function outputOf(a, what) {
  const t = a.outputs || {};
  check(a.status === 0, `${what}: status ${a.status} ${a.error || ""}`);
  check(t.dtype === "float32" && JSON.stringify(t.shape) === "[2]" && t.data?.length === 8,
        `${what}: output ${JSON.stringify({ dtype: t.dtype, shape: t.shape })}`);
  return t.data ? b64(t.data) : null;
}

const summary = {};
try {
  const h = await call({ id: 1, op: "health" });
  summary.health = { status: h.status, live: h.live, ready: h.ready, models: (h.models || []).map((m) => m.name) };
  check(h.id === 1 && h.status === 0 && h.live === true && h.ready === true, `health: ${JSON.stringify(summary.health)}`);

  const x = tensor(128);
  const a = await call({ id: 2, model: "demo", inputs: x });
  summary.infer = { id: a.id, status: a.status, model: a.model, version: a.version, lane: a.lane,
                    rid: a.rid, rid_safe: Number.isSafeInteger(a.rid), timing: a.timing,
                    input: b64(x.data), output: outputOf(a, "infer") };
  check(a.id === 2 && typeof a.rid === "number", `infer: id ${a.id}, rid ${a.rid}`);

  const sent = new Map();                 // id -> input, 32 requests in one write
  for (let i = 0; i < 32; i++) sent.set(100 + i, tensor(128));
  sock.write(Buffer.concat([...sent].map(([id, t]) => frame({ id, model: "demo", inputs: t }))));
  const answers = [];
  for (let i = 0; i < 32; i++) answers.push(await recv());
  const got = new Map(answers.map((r) => [r.id, r]));
  check(got.size === 32 && [...got.keys()].every((id) => sent.has(id)), `pipelined: ids ${[...got.keys()]}`);
  summary.pipelined = {
    sent: sent.size, answered: answers.length, ids_matched: got.size === 32 && [...sent.keys()].every((id) => got.has(id)),
    in_order: answers.every((r, i) => r.id === 100 + i), max_batch: Math.max(...answers.map((r) => r.timing?.batch ?? 0)),
    answers: [...sent].map(([id, t]) => ({ id, input: b64(t.data), output: got.has(id) ? outputOf(got.get(id), `id ${id}`) : null })),
  };

  const f = await call({ id: 3, op: "feedback", ref: a.rid, outcome: 1 });
  summary.feedback = { ref: a.rid, status: f.status, joined: f.joined, error: f.error,
                       model: f.model, version: f.version, lane: f.lane };
  check(f.id === 3 && f.status === 0 && f.joined === true, `feedback by rid ${a.rid}: ${JSON.stringify(summary.feedback)}`);
} catch (e) {
  errors.push(`${e.name}: ${e.message}`);
}
sock.destroy();
summary.errors = errors;
summary.ok = errors.length === 0;
console.log(JSON.stringify(summary));
process.exit(summary.ok ? 0 : 1);
