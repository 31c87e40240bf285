// Loopback Vapi stand-in for the webhook benchmark: POST /call answers like Vapi (a websocket
// transport call, or bypass TwiML when phoneCallProviderBypassEnabled is set); GET /count says how
// many calls were created, so the benchmark can wait for a bridge's background work to catch up.
const http = require('http');
const crypto = require('crypto');
const port = Number(process.env.PORT || 4010);
let calls = 0;
http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (req.method === 'GET' && req.url === '/count') {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      return res.end(JSON.stringify({ calls }));
    }
    let body = {};
    try { body = JSON.parse(Buffer.concat(chunks).toString() || '{}'); } catch (e) { /* count anyway */ }
    calls++;
    const id = crypto.randomUUID();
    const call = { id, status: 'queued', monitor: { controlUrl: `http://127.0.0.1:${port}/call/${id}/control` },
      transport: { provider: 'vapi.websocket', websocketCallUrl: `ws://127.0.0.1:${port}/call/${id}/transport` } };
    if (body.phoneCallProviderBypassEnabled) {
      call.phoneCallProviderDetails = { twiml: `<Response><Connect><Stream url="wss://127.0.0.1/${id}"/></Connect></Response>` };
    }
    res.writeHead(201, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify(call));
  });
}).listen(port, '127.0.0.1', () => console.log(`fake vapi on ${port}`));
