// tether in a web page: the browser counterpart of `tether connect`, as one ES module with no
// build step and no dependencies.
//
// A TetherPeer joins a tether signaling relay as the connecting side of tunnel NAME, offers
// a tube (an RTCPeerConnection with tether's two pre-negotiated data channels: "tether" id 0
// carries the tunnel, "tether-control" id 1 keepalives), and opens streams through it; the
// exposing side (`tether expose NAME --target HOST:PORT`) dials its target per stream.
//
//   import { TetherPeer } from "./tether-peer.js";
//   const peer = new TetherPeer();
//   await peer.connect("ws://relay:8765/", token, "echo", secret);
//   const stream = await peer.openStream();
//   stream.onData = (bytes) => ...;      // Uint8Array, in order
//   await stream.send("hello");         // text (UTF-8) or bytes, within the peer's credit
//   stream.close();                     // FIN; stream.onEnd / stream.onClose(reason) follow
//   await peer.status();                // {state, ice, path, rttMs, ...} from getStats
//
// Signals are sealed end to end exactly as tether.sealing does it (format version 2): HKDF-
// SHA256 derives the conversation id and one AES-256-GCM key per direction from the tunnel
// secret and name, so the relay never sees the name, the secret or any SDP. The secret stays
// in this page: only sealed blobs and the derived conversation id leave it.
//
// Signaling speaks the relay's protocol (tether.signaling.server): per-session seq/prev,
// end-to-end acks, resend of unacknowledged signals on reconnect, on "joined" and after a
// silence. A browser WebSocket cannot send an Authorization header, so the token travels as
// a WebSocket subprotocol "tether.bearer.<base64url(token)>" next to "tether.v1" (and the
// resume credential as "tether.resume.<credential>"): the relay must accept that form
// (tether.web.credentials_from_subprotocols).

const SEAL_VERSION = 2;
const SEAL_LABEL = "tether-seal-v2";
const CONVERSATION_PREFIX = "t2-";
const MIN_SECRET_CHARS = 16;
const MAX_TUBE_ID = 1024;
const MAX_BLOB = 256 * 1024;
const SESSION_BYTES = 16;
const HEADER_SIZE = 1 + SESSION_BYTES + 8 + 8; // version, sender session, counter, time (us)
const NONCE_SIZE = 12;
const TAG_SIZE = 16;
const MIN_BLOB = HEADER_SIZE + NONCE_SIZE + TAG_SIZE;
const TRANSPORT_KEYS = new Set(["peer", "session", "seq", "prev"]);
const OPEN_KEYS = new Set([...TRANSPORT_KEYS, "tube_id", "kind", "data"]);
const ROLES = ["connect", "expose"];
export const KINDS = new Set([
  "offer", "answer", "icecandidate", "ice_restart_offer", "ice_restart_answer",
  "connection_state_changed", "network_change_detected", "keepalive", "channel_closed", "error",
]);

export const SUBPROTOCOL = "tether.v1";
export const TOKEN_SUBPROTOCOL_PREFIX = "tether.bearer.";
export const RESUME_SUBPROTOCOL_PREFIX = "tether.resume.";

const GATHER_TIMEOUT_MS = 10000;
const CONNECT_TIMEOUT_MS = 30000;
const KEEPALIVE_MESSAGE = new TextEncoder().encode("tether:keepalive");
const KEEPALIVE_EVERY_MS = 20000;
const RESEND_AFTER_MS = 5000;
const RESEND_MAX_MS = 60000;
const RECONNECT_BASE_MS = 200;
const RECONNECT_MAX_MS = 5000;
const MAX_OUTBOUND = 1024;
const MAX_HELD_CANDIDATES = 256;

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8");

export class SealError extends Error {
  constructor(message, reason = "input") {
    super(message);
    this.reason = reason;
  }
}

// -- bytes ------------------------------------------------------------------------------

function concat(...parts) {
  const size = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(size);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function u32(value) {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value);
  return out;
}

export function base64Encode(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

export function base64Decode(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function base64Url(bytes) {
  return base64Encode(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomBytes(n) {
  return crypto.getRandomValues(new Uint8Array(n));
}

function randomHex(n) {
  return Array.from(randomBytes(n), (b) => b.toString(16).padStart(2, "0")).join("");
}

function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Python's json.dumps(..., separators=(",", ":")) escapes every non-ASCII character.
function asciiJson(value) {
  return JSON.stringify(value).replace(
    /[\u0080-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

// -- sealing (tether.sealing, version 2) --------------------------------------------------

function checkText(text, what) {
  if (typeof text !== "string" || !text) throw new SealError(`${what} must be a non-empty string`);
  return encoder.encode(text);
}

function checkSecret(secret) {
  const raw = checkText(secret, "the tunnel secret");
  if ([...secret].length < MIN_SECRET_CHARS) {
    throw new SealError(`the tunnel secret is too short (at least ${MIN_SECRET_CHARS} characters; ` +
                        "use the one `tether expose` prints)");
  }
  return raw;
}

function subtle() {
  if (!globalThis.crypto || !globalThis.crypto.subtle) {
    throw new SealError("WebCrypto is missing: browsers offer it only in a secure context; open " +
                        "the page over https:// (a relay with TLS) or from http://localhost");
  }
  return globalThis.crypto.subtle;
}

async function derive(secret, purpose, name) {
  // HKDF-SHA256, salt = label, info = purpose NUL name: as tether.sealing._derive.
  const key = await subtle().importKey("raw", secret, "HKDF", false, ["deriveBits"]);
  const info = concat(encoder.encode(purpose), new Uint8Array([0]), name);
  const bits = await subtle().deriveBits(
    { name: "HKDF", hash: "SHA-256", salt: encoder.encode(SEAL_LABEL), info }, key, 256);
  return new Uint8Array(bits);
}

/** The id the relay sees for tunnel `name` (tether.sealing.conversation_id). */
export async function conversationId(secret, name) {
  const digest = await derive(checkSecret(secret), "conversation", checkText(name, "the tunnel name"));
  return CONVERSATION_PREFIX + base64Url(digest);
}

function canonicalBase64(data) {
  // Only the canonical encoding passes (atob forgives whitespace and missing padding).
  let blob;
  try {
    blob = data.length % 4 === 0 ? base64Decode(data) : null;
  } catch (err) {
    blob = null;
  }
  if (!blob || blob.length === 0 || base64Encode(blob) !== data) {
    throw new SealError("malformed sealed signal: 'data' is not base64", "malformed");
  }
  if (blob.length < MIN_BLOB) throw new SealError("malformed sealed signal: 'data' too short", "malformed");
  return blob;
}

/** Seals this side's signals and opens the other side's, for one tunnel. */
export class Sealer {
  /** Use `await Sealer.create(secret, name, role)`. */
  constructor() {
    this.conversationId = "";
    this.maxAgeUs = 600e6;
    this.maxSessions = 64;
    this.clock = () => Date.now() / 1000;
    this.session = randomBytes(SESSION_BYTES);
    this.counter = 0;
    this.seen = new Map(); // sender session (hex) -> [last counter, its time (us)], LRU order
    this.forgottenUntil = 0;
  }

  static async create(secret, name, role, { clock, maxAge = 600, maxSessions = 64 } = {}) {
    if (!ROLES.includes(role)) throw new SealError(`role must be 'connect' or 'expose', not ${role}`);
    const sealer = new Sealer();
    const rawSecret = checkSecret(secret);
    const rawName = checkText(name, "the tunnel name");
    const peer = ROLES[1 - ROLES.indexOf(role)];
    sealer.conversationId = await conversationId(secret, name);
    const keyOf = async (purpose, usage) => subtle().importKey(
      "raw", await derive(rawSecret, purpose, rawName), "AES-GCM", false, [usage]);
    sealer.sealKey = await keyOf(`${role}>${peer}`, "encrypt");
    sealer.openKey = await keyOf(`${peer}>${role}`, "decrypt");
    if (clock) sealer.clock = clock;
    sealer.maxAgeUs = Math.floor(maxAge * 1e6);
    sealer.maxSessions = maxSessions;
    const cid = encoder.encode(sealer.conversationId);
    sealer.adPrefix = concat(encoder.encode(SEAL_LABEL), new Uint8Array([cid.length]), cid);
    return sealer;
  }

  nowUs() {
    return Math.floor(this.clock() * 1e6);
  }

  ad(header, tubeId, kind) {
    const tube = encoder.encode(tubeId);
    return concat(this.adPrefix, header, u32(tube.length), tube, encoder.encode(kind));
  }

  /** The wire form of `signal`. `fixed` ({session, counter, stamp, nonce}) is for test vectors. */
  async seal(signal, fixed = null) {
    if (!signal || typeof signal !== "object") throw new SealError("a signal must be an object");
    const { tube_id: tubeId, kind } = signal;
    if (typeof tubeId !== "string" || !tubeId) throw new SealError("cannot seal: missing or empty 'tube_id'");
    if (tubeId.length > MAX_TUBE_ID) throw new SealError(`cannot seal: 'tube_id' longer than ${MAX_TUBE_ID} characters`);
    if (!KINDS.has(kind)) throw new SealError(`cannot seal: unknown kind ${kind}`);
    const data = signal.data ?? "";
    if (typeof data !== "string") throw new SealError("cannot seal: 'data' must be a string");
    const hidden = {};
    for (const [key, value] of Object.entries(signal)) if (!OPEN_KEYS.has(key)) hidden[key] = value;
    const meta = encoder.encode(asciiJson(hidden));
    const plaintext = concat(u32(meta.length), meta, encoder.encode(data));
    if (plaintext.length > MAX_BLOB - MIN_BLOB) throw new SealError(`cannot seal: signal larger than ${MAX_BLOB} bytes`);
    const header = new Uint8Array(HEADER_SIZE);
    const view = new DataView(header.buffer);
    header[0] = SEAL_VERSION;
    header.set(fixed?.session ?? this.session, 1);
    const counter = fixed?.counter ?? this.counter + 1;
    view.setBigUint64(1 + SESSION_BYTES, BigInt(counter));
    view.setBigUint64(1 + SESSION_BYTES + 8, BigInt(fixed?.stamp ?? this.nowUs()));
    if (!fixed) this.counter = counter;
    const nonce = fixed?.nonce ?? randomBytes(NONCE_SIZE);
    const ciphertext = new Uint8Array(await subtle().encrypt(
      { name: "AES-GCM", iv: nonce, additionalData: this.ad(header, tubeId, kind), tagLength: 128 },
      this.sealKey, plaintext));
    const wire = {};
    for (const [key, value] of Object.entries(signal)) if (TRANSPORT_KEYS.has(key)) wire[key] = value;
    Object.assign(wire, {
      tube_id: tubeId, kind, conversation_id: this.conversationId,
      data: base64Encode(concat(header, nonce, ciphertext)), sealed: SEAL_VERSION,
    });
    return wire;
  }

  /** The signal sealed in `wire` (plus its transport keys), or throws SealError. */
  async open(wire) {
    if (!wire || typeof wire !== "object" || Array.isArray(wire)) {
      throw new SealError("a signal must be a JSON object", "malformed");
    }
    const marker = wire.sealed;
    if (marker === undefined || marker === null) {
      throw new SealError("unsealed signal: the other side has no secret or a relay forged it", "unsealed");
    }
    if (marker !== SEAL_VERSION) throw new SealError("sealed with an unknown version", "version");
    const { tube_id: tubeId, kind, data } = wire;
    if (typeof tubeId !== "string" || !tubeId || tubeId.length > MAX_TUBE_ID) {
      throw new SealError("malformed sealed signal: bad 'tube_id'", "malformed");
    }
    if (!KINDS.has(kind)) throw new SealError("malformed sealed signal: bad 'kind'", "malformed");
    if (typeof data !== "string") throw new SealError("malformed sealed signal: 'data' is not a string", "malformed");
    if (data.length > Math.ceil(MAX_BLOB / 3) * 4) throw new SealError("malformed sealed signal: too large", "malformed");
    if (wire.conversation_id !== this.conversationId) {
      throw new SealError("does not authenticate: wrong secret or changed in transit (conversation id differs)", "unauthentic");
    }
    const blob = canonicalBase64(data);
    if (blob[0] !== SEAL_VERSION) throw new SealError("sealed with an unknown version", "version");
    const header = blob.subarray(0, HEADER_SIZE);
    const nonce = blob.subarray(HEADER_SIZE, HEADER_SIZE + NONCE_SIZE);
    let plaintext;
    try {
      plaintext = new Uint8Array(await subtle().decrypt(
        { name: "AES-GCM", iv: nonce, additionalData: this.ad(header, tubeId, kind), tagLength: 128 },
        this.openKey, blob.subarray(HEADER_SIZE + NONCE_SIZE)));
    } catch (err) {
      throw new SealError("does not authenticate: wrong secret or changed in transit", "unauthentic");
    }
    const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
    const session = toHex(header.subarray(1, 1 + SESSION_BYTES));
    const counter = Number(view.getBigUint64(1 + SESSION_BYTES));
    const stamp = Number(view.getBigUint64(1 + SESSION_BYTES + 8));
    let hidden = null;
    let text = "";
    try {
      const size = new DataView(plaintext.buffer).getUint32(0);
      hidden = JSON.parse(decoder.decode(plaintext.subarray(4, 4 + size)));
      text = decoder.decode(plaintext.subarray(4 + size));
    } catch (err) {
      hidden = null;
    }
    if (!hidden || typeof hidden !== "object" || Array.isArray(hidden)) {
      throw new SealError("malformed sealed signal: contents are not a JSON object", "malformed");
    }
    this.checkFresh(session, counter, stamp);
    const signal = { ...hidden, tube_id: tubeId, kind, data: text };
    for (const [key, value] of Object.entries(wire)) if (TRANSPORT_KEYS.has(key)) signal[key] = value;
    return signal;
  }

  checkFresh(session, counter, stamp) {
    const now = this.nowUs();
    if (stamp < now - this.maxAgeUs) throw new SealError(`too old: sealed ${((now - stamp) / 1e6).toFixed(0)} s ago`, "stale");
    if (stamp > now + this.maxAgeUs) {
      throw new SealError(`from the future: sealed ${((stamp - now) / 1e6).toFixed(0)} s ahead (clock skew?)`, "stale");
    }
    const seen = this.seen.get(session);
    if (seen && counter <= seen[0]) throw new SealError(`replayed signal (counter ${counter}, already at ${seen[0]})`, "replayed");
    if (!seen && stamp <= this.forgottenUntil) throw new SealError("replayed signal (from a session too old to remember)", "replayed");
    this.seen.delete(session);
    this.seen.set(session, [counter, stamp]);
    if (this.seen.size > this.maxSessions) {
      const [oldest, [, lastStamp]] = this.seen.entries().next().value;
      this.seen.delete(oldest);
      this.forgottenUntil = Math.max(this.forgottenUntil, lastStamp);
    }
  }
}

// -- signaling (tether.signaling.client, the parts a connecting peer needs) ----------------

function isCount(value) {
  return Number.isInteger(value) && value >= 0;
}

/**
 * One conversation on a tether relay, reconnecting on its own. send() keeps every signal
 * until the other peer's client acknowledges it and sends the kept ones again (in order)
 * after a reconnect, when the peer (re)joins, and when acks stop coming.
 */
export class SignalingLink {
  constructor(url, token, conversation, { onSignal, onPeer, onState, log } = {}) {
    this.url = url;
    this.token = token;
    this.conversation = conversation;
    this.peerId = randomHex(8);
    this.session = randomHex(8);
    this.onSignal = onSignal || (() => {});
    this.onPeer = onPeer || (() => {});
    this.onState = onState || (() => {});
    this.log = log || (() => {});
    this.ws = null;
    this.resume = null;
    this.closed = false;
    this.connected = false;
    this.peerPresent = null;
    this.outbox = new Map(); // seq -> [tube_id, encoded signal without prev]
    this.nextSeq = 1;
    this.sentUpto = 0;
    this.inbox = new Map(); // "peer session" -> last seq delivered
    this.failures = 0;
    this.resendWait = RESEND_AFTER_MS;
    this.resendTimer = null;
    this.reconnectTimer = null;
    this.delivering = Promise.resolve();
  }

  /** Resolves once connected; rejects if the first connection cannot be made. */
  start() {
    return new Promise((resolve, reject) => {
      this.firstOpen = { resolve, reject };
      this.open();
    });
  }

  protocols() {
    const out = [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + base64Url(encoder.encode(this.token))];
    if (this.resume) out.push(RESUME_SUBPROTOCOL_PREFIX + this.resume);
    return out;
  }

  open() {
    if (this.closed) return;
    const url = new URL(this.url);
    url.searchParams.set("conversation", this.conversation);
    url.searchParams.set("peer", this.peerId);
    let ws;
    try {
      ws = new WebSocket(url.toString(), this.protocols());
    } catch (err) {
      this.failed(err);
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.connected = true;
      this.failures = 0;
      this.onState("connected");
      this.rewind();
      if (this.firstOpen) {
        this.firstOpen.resolve();
        this.firstOpen = null;
      }
    };
    ws.onmessage = (event) => this.onFrame(event.data);
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.connected = false;
      if (this.closed) return;
      this.onState("disconnected");
      if (!opened) {
        this.failed(new Error(`the relay refused the connection or is unreachable (close code ${event.code})`));
        return;
      }
      this.scheduleReconnect();
    };
  }

  failed(err) {
    this.failures += 1;
    if (this.firstOpen && this.failures >= 3) {
      // A browser never sees the HTTP status: after a few tries, say what it may be.
      this.firstOpen.reject(new Error(`${err.message}: check the relay URL and the token`));
      this.firstOpen = null;
      this.closed = true;
      this.onState("failed");
      return;
    }
    this.scheduleReconnect();
  }

  scheduleReconnect() {
    if (this.closed || this.reconnectTimer) return;
    const wait = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** Math.min(this.failures, 8));
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.open();
    }, wait * (0.5 + Math.random() / 2));
  }

  /** Drop the connection and connect again at once (a network change). */
  reconnect() {
    if (this.ws) this.ws.close(1000, "reconnecting");
  }

  send(signal) {
    if (this.closed) throw new Error("the signaling link is closed");
    if (this.outbox.size >= MAX_OUTBOUND) throw new Error("too many signals wait for the peer's acknowledgement");
    const seq = this.nextSeq++;
    const text = JSON.stringify({ ...signal, session: this.session, seq });
    this.outbox.set(seq, [signal.tube_id, text]);
    this.flush();
  }

  /** Forget the unacknowledged signals of a closed tube. */
  discard(tubeId) {
    for (const [seq, [tube]] of [...this.outbox]) if (tube === tubeId) this.outbox.delete(seq);
  }

  rewind() {
    this.sentUpto = 0;
    this.flush();
  }

  flush() {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    let prev = 0;
    let wrote = false;
    for (const [seq, [, text]] of this.outbox) {
      if (seq > this.sentUpto) {
        ws.send(`${text.slice(0, -1)},"prev":${prev}}`);
        this.sentUpto = seq;
        wrote = true;
      }
      prev = seq;
    }
    if (wrote && !this.resendTimer) this.armResend();
  }

  armResend() {
    clearTimeout(this.resendTimer);
    this.resendTimer = setTimeout(() => {
      this.resendTimer = null;
      if (this.outbox.size && this.peerPresent) {
        this.log(`no acknowledgement for ${this.outbox.size} signal(s); sending them again`);
        this.resendWait = Math.min(RESEND_MAX_MS, this.resendWait * 2);
        this.rewind();
      }
      if (this.outbox.size) this.armResend();
    }, this.resendWait);
  }

  onFrame(text) {
    if (typeof text !== "string") return;
    let payload;
    try {
      payload = JSON.parse(text);
    } catch (err) {
      this.log(`a frame from the relay is not JSON: ${err}`);
      return;
    }
    if (payload && typeof payload === "object" && !Array.isArray(payload) && "control" in payload) {
      this.onControl(payload);
      return;
    }
    const items = Array.isArray(payload) ? payload : [payload];
    const accepted = [];
    let ack = null;
    const seqs = [];
    for (const signal of items) {
      if (!signal || typeof signal !== "object" || typeof signal.tube_id !== "string" || !KINDS.has(signal.kind)) {
        this.log("dropped a malformed signal from the relay");
        continue;
      }
      const { peer, session, seq, prev } = signal;
      if (typeof peer === "string" && typeof session === "string" && isCount(seq)) {
        const key = `${peer} ${session}`;
        if (ack === null) ack = [peer, session];
        else if (ack[0] !== peer || ack[1] !== session) continue;
        const last = this.inbox.get(key) || 0;
        if (seq > last && isCount(prev) && prev > last) continue; // a gap: it comes again
        seqs.push(seq);
        if (seq <= last) continue; // a duplicate: acknowledged again, not delivered
        this.inbox.delete(key);
        this.inbox.set(key, seq);
        if (this.inbox.size > 1024) this.inbox.delete(this.inbox.keys().next().value);
      } else if (signal.kind === "error" && !("peer" in signal)) {
        this.log(`the relay reported: ${String(signal.data).slice(0, 300)}`);
        continue;
      }
      accepted.push(signal);
    }
    if (ack && seqs.length && this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ control: "ack", to: ack[0], session: ack[1], seqs }));
    }
    for (const signal of accepted) {
      // One at a time, in order, whatever each handler awaits.
      this.delivering = this.delivering.then(() => this.onSignal(signal)).catch(
        (err) => this.log(`handling a ${signal.kind} signal failed: ${err}`));
    }
  }

  onControl(message) {
    if (message.control === "peer") {
      const resume = message.resume;
      if (typeof resume === "string" && resume.startsWith("tr1_") && resume.length <= 256) this.resume = resume;
      const event = message.event;
      const was = this.peerPresent;
      if (event === "joined") {
        this.peerPresent = true;
        this.resendWait = RESEND_AFTER_MS;
        this.rewind();
        this.onPeer("joined");
      } else if (event === "present") {
        // Found there on connecting: "present" (our first offer is on its way). Found
        // there again after it had left: it came back meanwhile, "joined".
        this.peerPresent = true;
        if (was === false) this.onPeer("joined");
        else if (was === null) this.onPeer("present");
      } else if (event === "left" || event === "absent") {
        this.peerPresent = false;
        if (was !== false) this.onPeer(event);
      }
      return;
    }
    if (message.control !== "ack" && message.control !== "rejected") return;
    if (message.session !== this.session && message.session !== undefined) return;
    if (!Array.isArray(message.seqs)) return;
    if (message.control === "rejected" && message.retry === true) return; // kept; resent on "joined"
    let removed = 0;
    for (const seq of message.seqs) if (this.outbox.delete(seq)) removed += 1;
    if (removed) {
      this.resendWait = RESEND_AFTER_MS;
      if (this.outbox.size) this.armResend();
      else {
        clearTimeout(this.resendTimer);
        this.resendTimer = null;
      }
    }
  }

  /** Wait (up to timeoutMs) until every signal is acknowledged. */
  async drain(timeoutMs) {
    const start = performance.now();
    while (this.outbox.size && performance.now() - start < timeoutMs) await sleep(20);
    return this.outbox.size === 0;
  }

  close() {
    this.closed = true;
    clearTimeout(this.resendTimer);
    clearTimeout(this.reconnectTimer);
    if (this.ws) this.ws.close(1000, "closing");
    this.ws = null;
    this.connected = false;
    this.onState("closed");
  }
}

// -- tunnel framing (tether.tunnel.frames) -------------------------------------------------

export const FRAME = { OPEN: 1, OPEN_OK: 2, OPEN_FAIL: 3, DATA: 4, WINDOW: 5, FIN: 6, RESET: 7, SETTINGS: 8 };
const FRAME_HEADER = 5;
const MAX_DATA = 16 * 1024; // the DATA payload every peer accepts
const MAX_DATA_LARGE = 60 * 1024; // what we accept, and send to a peer whose SETTINGS allow it
const SETTING_MAX_DATA = 1;
const MAX_SETTINGS = 16;
const MIN_WINDOW = 1024;
const MAX_WINDOW = 1 << 30;
const DEFAULT_WINDOW = 256 * 1024;
const HIGH_WATER = 1024 * 1024;
const LOW_WATER = 256 * 1024;
const MAX_REASON = 1024;
const MAX_SEND_QUEUE = 16 * 1024 * 1024;

function frame(type, streamId, payload = new Uint8Array(0)) {
  const out = new Uint8Array(FRAME_HEADER + payload.length);
  out[0] = type;
  new DataView(out.buffer).setUint32(1, streamId);
  out.set(payload, FRAME_HEADER);
  return out;
}

function reasonBytes(reason) {
  return encoder.encode(String(reason)).subarray(0, MAX_REASON);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** One stream through the tunnel: send(), onData, onEnd (peer FIN), onClose(reason), close(). */
export class TetherStream {
  constructor(tunnel, id, window) {
    this.tunnel = tunnel;
    this.id = id;
    this.window = window; // our receive window, announced in OPEN
    this.credit = 0; // bytes we may still send
    this.peerWindow = 0;
    this.unacked = 0; // bytes received and not granted back yet
    this.grantThreshold = Math.max(1, Math.min(Math.floor(window / 4), 64 * 1024));
    this.queue = []; // [Uint8Array, resolve] waiting for credit
    this.queued = 0;
    this.finPending = false;
    this.sentFin = false;
    this.gotFin = false;
    this.closed = false;
    this.closeReason = null;
    this.bytesIn = 0;
    this.bytesOut = 0;
    this.onData = null;
    this.onEnd = null;
    this.onClose = null;
  }

  /** Queue text (sent as UTF-8) or bytes; resolves once handed to the data channel. */
  send(data) {
    if (this.closed) return Promise.reject(new Error(`stream ${this.id} is closed: ${this.closeReason}`));
    if (this.finPending || this.sentFin) return Promise.reject(new Error(`stream ${this.id}: send after close()`));
    let bytes = typeof data === "string" ? encoder.encode(data) : new Uint8Array(data);
    if (!bytes.length) return Promise.resolve();
    if (this.queued + bytes.length > MAX_SEND_QUEUE) {
      return Promise.reject(new Error(`stream ${this.id}: more than ${MAX_SEND_QUEUE} bytes wait to be sent`));
    }
    bytes = bytes.slice(); // the caller may reuse its buffer
    return new Promise((resolve) => {
      this.queue.push([bytes, resolve]);
      this.queued += bytes.length;
      this.tunnel.pump();
    });
  }

  /** Our direction is done (FIN, after everything queued); the peer may still send. */
  close() {
    if (this.closed || this.finPending || this.sentFin) return;
    this.finPending = true;
    this.tunnel.pump();
  }

  /** Both directions end now (RESET). */
  reset(reason = "reset by the page") {
    if (this.closed) return;
    this.tunnel.sendControl(frame(FRAME.RESET, this.id, reasonBytes(reason)));
    this.ended(reason);
  }

  ended(reason) {
    if (this.closed) return;
    this.closed = true;
    this.closeReason = reason;
    for (const [, resolve] of this.queue) resolve();
    this.queue = [];
    this.queued = 0;
    this.tunnel.streams.delete(this.id);
    if (this.opening) this.opening.reject(new Error(reason));
    this.opening = null;
    if (this.onClose) this.onClose(reason);
  }

  received(payload) {
    if (this.unacked + payload.length > this.window) {
      this.reset(`protocol error: ${payload.length} bytes beyond the window of ${this.window}`);
      return;
    }
    this.bytesIn += payload.length;
    if (this.onData) this.onData(payload);
    // onData consumed it: grant the credit back in batches, as tether's own streams do.
    this.unacked += payload.length;
    if (this.unacked >= this.grantThreshold && !this.closed) {
      this.tunnel.sendControl(frame(FRAME.WINDOW, this.id, u32(this.unacked)));
      this.unacked = 0;
    }
  }

  finished() {
    if (this.sentFin && this.gotFin) this.ended("closed");
  }
}

/** Streams multiplexed over the "tether" data channel, as tether.tunnel.Tunnel does it. */
export class TunnelChannel {
  constructor(channel, { window = DEFAULT_WINDOW, log } = {}) {
    if (window < MIN_WINDOW || window > MAX_WINDOW) throw new Error(`window ${window} out of range`);
    this.channel = channel;
    this.window = window;
    this.log = log || (() => {});
    this.streams = new Map();
    this.nextId = 1;
    this.pumping = false;
    this.peerMaxData = MAX_DATA; // until the peer's SETTINGS say more
    this.announced = false; // our SETTINGS go just before our first frame
    channel.binaryType = "arraybuffer";
    channel.bufferedAmountLowThreshold = LOW_WATER;
    channel.addEventListener("message", (event) => this.onMessage(event.data));
    channel.addEventListener("bufferedamountlow", () => this.pump());
    channel.addEventListener("close", () => this.closeAll("the data channel closed"));
  }

  openStream(timeoutMs = CONNECT_TIMEOUT_MS) {
    if (this.channel.readyState !== "open") return Promise.reject(new Error("the tunnel channel is not open"));
    const id = this.nextId;
    this.nextId = (this.nextId % 0xffffffff) + 1;
    const stream = new TetherStream(this, id, this.window);
    this.streams.set(id, stream);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => stream.ended(`no OPEN_OK within ${timeoutMs} ms`), timeoutMs);
      stream.opening = {
        resolve: () => { clearTimeout(timer); resolve(stream); },
        reject: (err) => { clearTimeout(timer); reject(err); },
      };
      this.sendControl(frame(FRAME.OPEN, id, u32(this.window)));
    });
  }

  sendControl(bytes) {
    if (this.channel.readyState !== "open") return;
    if (!this.announced) {
      // SETTINGS (stream id 0): the largest DATA payload we accept; an older peer ignores it.
      const setting = new Uint8Array(6);
      new DataView(setting.buffer).setUint16(0, SETTING_MAX_DATA);
      new DataView(setting.buffer).setUint32(2, MAX_DATA_LARGE);
      this.channel.send(frame(FRAME.SETTINGS, 0, setting));
      this.announced = true;
    }
    this.channel.send(bytes);
  }

  pump() {
    // DATA only within each stream's credit and while the channel's buffer is below the
    // high-water mark; "bufferedamountlow" calls this again.
    if (this.channel.readyState !== "open") return;
    for (const stream of this.streams.values()) {
      while (stream.queue.length && stream.credit > 0) {
        if (this.channel.bufferedAmount >= HIGH_WATER) return;
        const entry = stream.queue[0];
        const n = Math.min(entry[0].length, stream.credit, this.peerMaxData);
        this.channel.send(frame(FRAME.DATA, stream.id, entry[0].subarray(0, n)));
        stream.credit -= n;
        stream.queued -= n;
        stream.bytesOut += n;
        if (n === entry[0].length) {
          stream.queue.shift();
          entry[1]();
        } else {
          entry[0] = entry[0].subarray(n);
        }
      }
      if (!stream.queue.length && stream.finPending && !stream.sentFin && stream.peerWindow) {
        stream.finPending = false;
        stream.sentFin = true;
        this.sendControl(frame(FRAME.FIN, stream.id));
        stream.finished();
      }
    }
  }

  onMessage(data) {
    if (typeof data === "string") {
      this.log("a text message on the tunnel channel ignored");
      return;
    }
    const bytes = new Uint8Array(data);
    if (bytes.length < FRAME_HEADER) return;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const type = bytes[0];
    const id = view.getUint32(1);
    const payload = bytes.subarray(FRAME_HEADER);
    if (type === FRAME.SETTINGS) {
      if (id !== 0 || payload.length % 6 || payload.length > 6 * MAX_SETTINGS) {
        this.log("a malformed SETTINGS frame ignored");
        return;
      }
      for (let at = FRAME_HEADER; at < bytes.length; at += 6) {
        if (view.getUint16(at) !== SETTING_MAX_DATA) continue; // ids we do not know
        this.peerMaxData = Math.max(MAX_DATA, Math.min(view.getUint32(at + 2), MAX_DATA_LARGE));
      }
      return;
    }
    const stream = this.streams.get(id);
    if (type === FRAME.OPEN) {
      this.sendControl(frame(FRAME.OPEN_FAIL, id, reasonBytes("the web page opens streams, it takes none [denied]")));
      return;
    }
    if (!stream) return; // a late frame for a stream that ended
    if (type === FRAME.OPEN_OK && payload.length === 4) {
      const window = view.getUint32(FRAME_HEADER);
      if (window < MIN_WINDOW || window > MAX_WINDOW) {
        stream.reset(`the peer's window ${window} is out of range`);
        return;
      }
      stream.peerWindow = window;
      stream.credit = window;
      const opening = stream.opening;
      stream.opening = null;
      if (opening) opening.resolve();
      this.pump();
    } else if (type === FRAME.OPEN_FAIL) {
      stream.ended(`the peer could not open the stream: ${decoder.decode(payload)}`);
    } else if (type === FRAME.DATA && payload.length) {
      stream.received(payload);
    } else if (type === FRAME.WINDOW && payload.length === 4) {
      stream.credit += view.getUint32(FRAME_HEADER);
      if (stream.credit > stream.peerWindow) stream.reset("protocol error: credit beyond the peer's window");
      else this.pump();
    } else if (type === FRAME.FIN) {
      stream.gotFin = true;
      if (stream.onEnd) stream.onEnd();
      stream.finished();
    } else if (type === FRAME.RESET) {
      stream.ended(`reset by the peer: ${decoder.decode(payload)}`);
    }
  }

  closeAll(reason) {
    for (const stream of [...this.streams.values()]) stream.ended(reason);
  }
}

// -- the connecting peer -----------------------------------------------------------------

function gathered(pc) {
  // Resolves when this round of ICE gathering ends (or after GATHER_TIMEOUT_MS).
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") {
      resolve();
      return;
    }
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", onState);
      pc.removeEventListener("icecandidate", onCandidate);
      clearTimeout(timer);
      resolve();
    };
    const onState = () => { if (pc.iceGatheringState === "complete") done(); };
    const onCandidate = (event) => { if (!event.candidate) done(); };
    const timer = setTimeout(done, GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", onState);
    pc.addEventListener("icecandidate", onCandidate);
  });
}

function ufragOf(sdp) {
  const found = sdp && /a=ice-ufrag:(\S+)/.exec(sdp);
  return found ? found[1] : null;
}

function tubeId() {
  return base64Url(randomBytes(12));
}

/**
 * The connecting side of tunnel NAME in a web page (the counterpart of `tether connect`).
 * Events (EventTarget): "state" (detail: the tube's state), "log" (detail: text).
 */
export class TetherPeer extends EventTarget {
  constructor({ iceServers = [], window = DEFAULT_WINDOW } = {}) {
    super();
    this.iceServers = iceServers;
    this.window = window;
    this.state = "new";
    this.tube = null; // {id, pc, tunnel, control, held, keepalive}
    this.restarts = 0;
    this.restartTimes = []; // ms from each restart offer to our answer (the last 100)
    this.closed = false;
    this.logs = [];
  }

  log(text) {
    this.logs.push(text);
    if (this.logs.length > 200) this.logs.shift();
    this.dispatchEvent(new CustomEvent("log", { detail: text }));
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  /** Join the relay for tunnel `name` and offer a tube; resolves when its tunnel is open. */
  async connect(relayUrl, token, name, secret, timeoutMs = CONNECT_TIMEOUT_MS) {
    if (this.link) throw new Error("connect() was called already");
    this.name = name;
    this.sealer = await Sealer.create(secret, name, "connect");
    this.setState("signaling");
    this.link = new SignalingLink(relayUrl, token, this.sealer.conversationId, {
      onSignal: (wire) => this.onWire(wire),
      onPeer: (event) => this.onPeer(event),
      onState: (state) => this.log(`signaling ${state}`),
      log: (text) => this.log(text),
    });
    await this.link.start();
    this.offerTube();
    return this.ready(timeoutMs);
  }

  /** Resolves when the current tube's tunnel channel is open. */
  async ready(timeoutMs = CONNECT_TIMEOUT_MS) {
    const start = performance.now();
    while (!(this.tube && this.tube.tunnelChannel.readyState === "open")) {
      if (this.closed) throw new Error("closed");
      if (performance.now() - start > timeoutMs) {
        throw new Error(`no tube to ${JSON.stringify(this.name)} after ${timeoutMs} ms ` +
                        `(is \`tether expose ${this.name}\` running, with the same secret?)`);
      }
      await sleep(20);
    }
    return performance.now() - start;
  }

  /** Open one stream to the exposing side's target. */
  async openStream(timeoutMs = CONNECT_TIMEOUT_MS) {
    await this.ready(timeoutMs);
    return this.tube.tunnel.openStream(timeoutMs);
  }

  async sendSignal(tube, kind, data = "", extra = {}) {
    if (this.closed || this.tube !== tube) return;
    const signal = { tube_id: tube.id, conversation_id: this.name, kind, data, ...extra };
    this.link.send(await this.sealer.seal(signal));
  }

  offerTube() {
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    const tunnelChannel = pc.createDataChannel("tether", { negotiated: true, id: 0 });
    const control = pc.createDataChannel("tether-control", { negotiated: true, id: 1 });
    control.binaryType = "arraybuffer";
    const tube = {
      id: tubeId(), pc, tunnelChannel, control, held: [],
      tunnel: new TunnelChannel(tunnelChannel, { window: this.window, log: (t) => this.log(t) }),
      keepalive: null, createdAt: performance.now(), connectedAt: null, keepalivesIn: 0,
    };
    this.tube = tube;
    this.setState("connecting");
    control.onmessage = () => { tube.keepalivesIn += 1; };
    control.onopen = () => {
      tube.keepalive = setInterval(() => {
        if (control.readyState === "open") control.send(KEEPALIVE_MESSAGE);
      }, KEEPALIVE_EVERY_MS);
    };
    tunnelChannel.addEventListener("open", () => {
      tube.connectedAt = performance.now();
      this.log(`tube ${tube.id}: connected in ${Math.round(tube.connectedAt - tube.createdAt)} ms`);
    });
    pc.addEventListener("connectionstatechange", () => {
      if (this.tube !== tube) return;
      const state = pc.connectionState;
      this.setState(state);
      if (state === "failed" && !tube.connectedAt) this.replaceTube("it never connected");
    });
    (async () => {
      const done = gathered(pc);
      await pc.setLocalDescription(await pc.createOffer());
      await done; // the candidates travel in the offer
      this.log(`tube ${tube.id}: offering to ${JSON.stringify(this.name)}`);
      await this.sendSignal(tube, "offer", base64Encode(encoder.encode(pc.localDescription.sdp)));
    })().catch((err) => this.log(`tube ${tube.id}: offer failed: ${err}`));
    // A tube that does not connect in time is replaced (the peer may have missed it).
    setTimeout(() => {
      if (this.tube === tube && !tube.connectedAt && !this.closed) this.replaceTube("no connection in time");
    }, CONNECT_TIMEOUT_MS / 2);
  }

  dropTube(tube, reason, tell = "closed") {
    if (!tube) return;
    clearInterval(tube.keepalive);
    tube.tunnel.closeAll(`tube closed: ${reason}`);
    if (this.link) this.link.discard(tube.id);
    if (tell && this.link && !this.link.closed) {
      this.goodbye = this.sealer.seal({ tube_id: tube.id, conversation_id: this.name,
                                        kind: "channel_closed", data: reason, reason: tell })
        .then((wire) => this.link.send(wire)).catch(() => {});
    }
    tube.pc.close();
    if (this.tube === tube) this.tube = null;
  }

  replaceTube(reason, tell = "closed") {
    if (this.closed) return;
    const tube = this.tube;
    this.log(`tube ${tube ? tube.id : "-"}: ${reason}; offering a new tube`);
    this.dropTube(tube, reason, tell);
    this.offerTube();
  }

  onPeer(event) {
    this.log(`the exposing side: ${event}`);
    if (event !== "joined" || !this.tube) return;
    if (this.tube.connectedAt) this.sendSignal(this.tube, "keepalive", "");
    else this.replaceTube("offering again to the peer that just joined", "closed");
  }

  async onWire(wire) {
    if (wire.kind === "error" && !("peer" in wire)) return;
    let signal;
    try {
      signal = await this.sealer.open(wire);
    } catch (err) {
      this.log(`a signal was refused (${err.reason}): ${err.message}`);
      return;
    }
    const tube = this.tube;
    if (!tube || signal.tube_id !== tube.id) {
      if (!["channel_closed", "error"].includes(signal.kind)) {
        const reply = { tube_id: signal.tube_id, conversation_id: this.name, kind: "channel_closed",
                        data: "unknown tube", reason: "unknown_tube" };
        this.link.send(await this.sealer.seal(reply));
      }
      return;
    }
    const pc = tube.pc;
    switch (signal.kind) {
      case "answer":
        await pc.setRemoteDescription({ type: "answer", sdp: decoder.decode(base64Decode(signal.data)) });
        await this.flushHeld(tube);
        break;
      case "icecandidate":
        await this.addCandidate(tube, signal.data);
        break;
      case "ice_restart_offer":
        await this.answerRestart(tube, signal);
        break;
      case "channel_closed":
        this.log(`tube ${tube.id}: the exposing side closed it (${signal.reason || signal.data})`);
        this.dropTube(tube, "closed by the peer", null);
        if (!this.closed) this.offerTube();
        break;
      case "error":
        this.log(`tube ${tube.id}: the exposing side reports: ${signal.data}`);
        break;
      default:
        break; // keepalive and the peer's state reports: activity only
    }
  }

  async addCandidate(tube, data) {
    if (!data) return; // end of candidates
    const found = / ufrag (\S+)/.exec(data);
    const ufrag = found ? found[1] : null;
    const remote = ufragOf(tube.pc.remoteDescription && tube.pc.remoteDescription.sdp);
    if (!remote || (ufrag && ufrag !== remote)) {
      // For a description not applied yet (the answer or a restart offer is on its way).
      if (tube.held.length < MAX_HELD_CANDIDATES) tube.held.push(data);
      return;
    }
    try {
      await tube.pc.addIceCandidate({ candidate: data, sdpMid: "0", sdpMLineIndex: 0, usernameFragment: ufrag || remote });
    } catch (err) {
      this.log(`tube ${tube.id}: candidate refused: ${err}`);
    }
  }

  async flushHeld(tube) {
    const held = tube.held;
    tube.held = [];
    for (const data of held) await this.addCandidate(tube, data);
  }

  async answerRestart(tube, signal) {
    // The exposing side's manager restarts ICE when the path changes or dies: apply its
    // offer (with fresh credentials), answer with ours, candidates in the SDP.
    const started = performance.now();
    const pc = tube.pc;
    await pc.setRemoteDescription({ type: "offer", sdp: decoder.decode(base64Decode(signal.data)) });
    await this.flushHeld(tube);
    const done = gathered(pc);
    await pc.setLocalDescription();
    await done;
    const extra = signal.restart_id === undefined ? {} : { restart_id: signal.restart_id };
    await this.sendSignal(tube, "ice_restart_answer", base64Encode(encoder.encode(pc.localDescription.sdp)), extra);
    this.restarts += 1;
    const ms = performance.now() - started;
    this.restartTimes.push(ms);
    if (this.restartTimes.length > 100) this.restartTimes.shift();
    this.log(`tube ${tube.id}: answered an ICE restart in ${Math.round(ms)} ms`);
  }

  /** State, path and RTT of the current tube, from RTCPeerConnection.getStats(). */
  async status() {
    const tube = this.tube;
    const out = {
      state: this.state, signaling: !!(this.link && this.link.connected),
      peer: this.link ? this.link.peerPresent : null, tube: tube ? tube.id : null,
      ice: null, path: null, rttMs: null, restarts: this.restarts,
      streams: tube ? tube.tunnel.streams.size : 0,
    };
    if (!tube) return out;
    out.ice = tube.pc.iceConnectionState;
    const stats = await tube.pc.getStats();
    stats.forEach((report) => {
      if (report.type !== "transport" || !report.selectedCandidatePairId) return;
      const pair = stats.get(report.selectedCandidatePairId);
      if (!pair) return;
      const local = stats.get(pair.localCandidateId);
      const remote = stats.get(pair.remoteCandidateId);
      const end = (c) => c && `${c.candidateType} ${c.address || c.ip || "(address hidden)"}:${c.port}`;
      out.path = `${end(local)} -> ${end(remote)} (${(local && local.protocol) || "udp"})`;
      if (typeof pair.currentRoundTripTime === "number") out.rttMs = pair.currentRoundTripTime * 1000;
    });
    return out;
  }

  /** Say goodbye to the exposing side, close the tube and the signaling link. */
  async close() {
    if (this.closed) return;
    this.closed = true;
    const tube = this.tube;
    if (tube) this.dropTube(tube, "the page closed the tunnel", "shutdown");
    if (this.link) {
      if (this.goodbye) await this.goodbye; // sealed asynchronously
      await this.link.drain(1000);
      this.link.close();
    }
    this.setState("closed");
  }
}
