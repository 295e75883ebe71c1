// The demo page: join a tunnel as the connecting side, show state/path/RTT live, send text
// through one stream and show what comes back. Fields can be prefilled from the URL fragment
// (#relay=...&token=...&name=...&secret=...): a fragment never goes to any server, and the
// page removes it from the address bar at once.
import { TetherPeer } from "./tether-peer.js";

const $ = (id) => document.getElementById(id);
const decoder = new TextDecoder();

const demo = {
  peer: null,
  stream: null,
  received: "",
  receivedBytes: 0,
  error: null,

  async connect(relay, token, name, secret) {
    if (this.peer) await this.disconnect();
    this.error = null;
    this.received = "";
    this.receivedBytes = 0;
    const peer = new TetherPeer();
    this.peer = peer;
    peer.addEventListener("log", (event) => log(event.detail));
    peer.addEventListener("state", (event) => { $("state").textContent = event.detail; });
    const started = performance.now();
    await peer.connect(relay, token, name, secret);
    const stream = await peer.openStream();
    this.stream = stream;
    stream.onData = (bytes) => {
      this.receivedBytes += bytes.length;
      const text = decoder.decode(bytes, { stream: true });
      this.received += text;
      const box = $("received");
      box.textContent = this.received.slice(-4000);
      box.scrollTop = box.scrollHeight;
    };
    stream.onEnd = () => log("the target closed its side of the stream");
    stream.onClose = (reason) => {
      log(`stream closed: ${reason}`);
      if (this.stream === stream) this.stream = null;
      enableSending(false);
    };
    enableSending(true);
    const ms = performance.now() - started;
    log(`tunnel and stream open in ${Math.round(ms)} ms`);
    return ms;
  },

  send(text) {
    if (!this.stream) return Promise.reject(new Error("no open stream"));
    return this.stream.send(text);
  },

  async disconnect() {
    const peer = this.peer;
    this.peer = null;
    this.stream = null;
    enableSending(false);
    if (peer) await peer.close();
  },

  async status() {
    return this.peer ? this.peer.status() : { state: "not connected" };
  },
};

function log(text) {
  const line = `${new Date().toISOString().slice(11, 23)} ${text}\n`;
  const box = $("log");
  box.textContent = (box.textContent + line).slice(-8000);
  box.scrollTop = box.scrollHeight;
}

function enableSending(on) {
  $("text").disabled = !on;
  $("send").disabled = !on;
  $("disconnect").disabled = !demo.peer;
  $("connect").disabled = !!demo.peer;
}

async function refresh() {
  if (demo.peer) {
    const s = await demo.peer.status();
    $("state").textContent = `${s.state}${s.signaling ? "" : " (signaling down)"}`;
    $("path").textContent = s.path || "-";
    $("rtt").textContent = s.rttMs === null ? "-" : `${s.rttMs.toFixed(1)} ms`;
    $("restarts").textContent = String(s.restarts);
    const out = demo.stream ? demo.stream.bytesOut : 0;
    $("bytes").textContent = `${out} sent, ${demo.receivedBytes} received`;
  }
  setTimeout(refresh, 1000);
}

function prefill() {
  const given = new URLSearchParams(location.hash.slice(1));
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  $("relay").value = given.get("relay") || (location.host ? `${scheme}//${location.host}/` : "");
  for (const key of ["token", "name", "secret"]) $(key).value = given.get(key) || "";
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
}

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  $("connect").disabled = true;
  demo.connect($("relay").value, $("token").value, $("name").value, $("secret").value)
    .catch((err) => {
      demo.error = String(err);
      log(`connect failed: ${err.message || err}`);
      $("state").innerHTML = "";
      const span = document.createElement("span");
      span.className = "bad";
      span.textContent = `failed: ${err.message || err}`;
      $("state").appendChild(span);
      demo.disconnect();
    });
});
$("disconnect").addEventListener("click", () => demo.disconnect());
$("echo").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  $("text").value = "";
  demo.send(text + "\n").catch((err) => log(`send failed: ${err.message || err}`));
});

prefill();
refresh();
window.demo = demo;
