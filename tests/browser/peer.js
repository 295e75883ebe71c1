// A WebRTC peer for tether's browser tests: the same two pre-negotiated data channels as
// tether's aiortc core ("tether" id 0, "tether-control" id 1); every message on "tether"
// is echoed back. Signaling is done by the test (Runtime.evaluate): with complete SDPs
// (each call waits for ICE gathering to end, so the candidates travel in the SDP), or
// trickled (the calls return at once; candidates go through takeCandidates/addCandidate).
"use strict";

(function () {
  const GATHER_TIMEOUT_MS = 10000;

  function gathered(pc) {
    // Resolves when this round of gathering ends (the null candidate or "complete").
    return new Promise((resolve) => {
      const done = () => {
        pc.removeEventListener("icecandidate", onCandidate);
        pc.removeEventListener("icegatheringstatechange", onState);
        clearTimeout(timer);
        resolve();
      };
      const onCandidate = (event) => { if (!event.candidate) done(); };
      const onState = () => { if (pc.iceGatheringState === "complete") done(); };
      const timer = setTimeout(done, GATHER_TIMEOUT_MS);
      pc.addEventListener("icecandidate", onCandidate);
      pc.addEventListener("icegatheringstatechange", onState);
    });
  }

  function remoteUfrag(pc) {
    const found = pc.remoteDescription && /a=ice-ufrag:(\S+)/.exec(pc.remoteDescription.sdp);
    return found ? found[1] : null;
  }

  const peer = {
    pc: null,
    gathered: [],  // our trickled candidates, until takeCandidates()
    held: [],  // the test's candidates for a description not applied yet
    tunnel: null,
    control: null,
    echoed: 0,
    echoedBytes: 0,
    controlMessages: 0,
    errors: [],

    create() {
      if (this.pc) this.pc.close();
      const pc = new RTCPeerConnection({ iceServers: [] });
      this.pc = pc;
      this.echoed = this.echoedBytes = this.controlMessages = 0;
      this.errors = [];
      this.gathered = [];
      this.held = [];
      pc.addEventListener("icecandidate", (event) => {
        if (event.candidate && event.candidate.candidate) {
          this.gathered.push(event.candidate.candidate);
        }
      });
      this.tunnel = pc.createDataChannel("tether", { negotiated: true, id: 0 });
      this.control = pc.createDataChannel("tether-control", { negotiated: true, id: 1 });
      this.tunnel.binaryType = "arraybuffer";
      this.control.binaryType = "arraybuffer";
      this.tunnel.onmessage = (event) => {
        try {
          this.tunnel.send(event.data);
          this.echoed += 1;
          this.echoedBytes += event.data.byteLength ?? event.data.length;
        } catch (err) {
          this.errors.push(String(err));
        }
      };
      this.control.onmessage = () => { this.controlMessages += 1; };
      return true;
    },

    async offer(iceRestart, trickle) {
      const pc = this.pc;
      const offer = await pc.createOffer({ iceRestart: !!iceRestart });
      const done = gathered(pc);
      await pc.setLocalDescription(offer);
      if (!trickle) await done;
      return pc.localDescription.sdp;
    },

    async answer(sdp, trickle) {
      const pc = this.pc;
      await pc.setRemoteDescription({ type: "offer", sdp });
      await this.flushHeld();
      const done = gathered(pc);
      await pc.setLocalDescription();
      if (!trickle) await done;
      return pc.localDescription.sdp;
    },

    async accept(sdp) {
      await this.pc.setRemoteDescription({ type: "answer", sdp });
      await this.flushHeld();
      return this.pc.signalingState;
    },

    takeCandidates() {
      const out = this.gathered;
      this.gathered = [];
      return out;
    },

    async addCandidate(candidate, ufrag) {
      // A candidate for a description not applied yet waits for it.
      if (ufrag !== remoteUfrag(this.pc)) {
        this.held.push([candidate, ufrag]);
        return false;
      }
      await this.pc.addIceCandidate({ candidate, sdpMid: "0", usernameFragment: ufrag });
      return true;
    },

    async flushHeld() {
      const held = this.held;
      this.held = [];
      for (const [candidate, ufrag] of held) await this.addCandidate(candidate, ufrag);
    },

    async opened(timeoutMs) {
      const channels = [this.tunnel, this.control];
      const start = performance.now();
      while (channels.some((c) => c.readyState !== "open")) {
        if (performance.now() - start > timeoutMs) {
          throw new Error("channels not open: " + channels.map((c) => c.readyState));
        }
        await new Promise((r) => setTimeout(r, 20));
      }
      return performance.now() - start;
    },

    async pairs() {
      // Every candidate pair Chromium knows, for diagnostics.
      const stats = await this.pc.getStats();
      const out = [];
      stats.forEach((p) => {
        if (p.type !== "candidate-pair") return;
        const local = stats.get(p.localCandidateId);
        const remote = stats.get(p.remoteCandidateId);
        out.push({
          state: p.state, nominated: p.nominated, priority: p.priority,
          local: local && `${local.candidateType} ${local.address}:${local.port}`,
          remote: remote && `${remote.candidateType} ${remote.address}:${remote.port} ${remote.usernameFragment}`,
          requestsSent: p.requestsSent, responsesReceived: p.responsesReceived,
          requestsReceived: p.requestsReceived,
        });
      });
      return out;
    },

    async state() {
      const pc = this.pc;
      let pair = null;
      const stats = await pc.getStats();
      stats.forEach((report) => {
        if (report.type === "transport" && report.selectedCandidatePairId) {
          const p = stats.get(report.selectedCandidatePairId);
          if (p) {
            const local = stats.get(p.localCandidateId);
            const remote = stats.get(p.remoteCandidateId);
            pair = {
              local: local && `${local.candidateType} ${local.address}:${local.port}`,
              remote: remote && `${remote.candidateType} ${remote.address}:${remote.port}`,
            };
          }
        }
      });
      return {
        ice: pc.iceConnectionState,
        connection: pc.connectionState,
        signaling: pc.signalingState,
        echoed: this.echoed,
        echoedBytes: this.echoedBytes,
        errors: this.errors,
        pair,
      };
    },

    close() {
      if (this.pc) this.pc.close();
      this.pc = null;
      return true;
    },
  };

  window.peer = peer;
})();
