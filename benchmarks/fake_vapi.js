// Loopback Vapi stand-in for the webhook benchmark: POST /call answers like Vapi (a websocket
// transport call, or bypass TwiML when phoneCallProviderBypassEnabled is set); GET /count says how
// many calls were created, so the benchmark can wait for a bridge's background work to catch up.
// DELAY_MS (default 0) holds every POST /call that long before answering, like the real Vapi's
// hundreds of milliseconds; GET /calls lists each created call's metadata.twilioCallSid (top level or
// in assistantOverrides) with receivedAt/createdAt (epoch ms), for bench_burst.
const http = require('http');
const crypto = require('crypto');
const port = Number(process.env.PORT || 4010);
const delayMs = Number(process.env.DELAY_MS || 0);
let calls = 0;
const created = [];
http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (req.method === 'GET' && req.url === '/count') {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      return res.end(JSON.stringify({ calls }));
    }
    if (req.method === 'GET' && req.url === '/calls') {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      return res.end(JSON.stringify(created));
    }
    const receivedAt = Date.now();
    let body = {};
    try { body = JSON.parse(Buffer.concat(chunks).toString() || '{}'); } catch (e) { /* count anyway */ }
    if (delayMs > 0) return setTimeout(() => answer(res, body, receivedAt), delayMs);
    answer(res, body, receivedAt);
  });
}).listen(port, '127.0.0.1', () => console.log(`fake vapi on ${port}`));

function answer(res, body, receivedAt) {
  calls++;
  const meta = body.metadata || (body.assistantOverrides || {}).metadata || {};
  created.push({ twilioCallSid: meta.twilioCallSid || null, receivedAt, createdAt: Date.now() });
  const id = crypto.randomUUID();
  const call = { id, status: 'queued', monitor: { controlUrl: `http://127.0.0.1:${port}/call/${id}/control` },
    transport: { provider: 'vapi.websocket', websocketCallUrl: `ws://127.0.0.1:${port}/call/${id}/transport` } };
  if (body.phoneCallProviderBypassEnabled) {
    call.phoneCallProviderDetails = { twiml: `<Response><Connect><Stream url="wss://127.0.0.1/${id}"/></Connect></Response>` };
  }
  res.writeHead(201, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(call));
}
