"""A headless Chromium peer for tests: the page (peer.html, peer.js) and its driver."""
