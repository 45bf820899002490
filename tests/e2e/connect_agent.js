// Node (v20, no NODE_USE_ENV_PROXY) through an HTTPS proxy: a keep-alive https.Agent whose
// connections are CONNECT tunnels (http.request({method: 'CONNECT'}) + tls.connect).
// Usage: node connect_agent.js <proxy url> <https url> <ca file> <out file>...
// Fetches the URL once per out file, one after another, on the agent's kept connection.
'use strict';
const fs = require('fs');
const http = require('http');
const https = require('https');
const tls = require('tls');

const [proxyUrl, targetUrl, caFile, ...outs] = process.argv.slice(2);
const proxy = new URL(proxyUrl);
const ca = fs.readFileSync(caFile);

class TunnelAgent extends https.Agent {
  createConnection(options, callback) {
    const authority = `${options.host}:${options.port}`;
    const connect = http.request({
      host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: authority,
      headers: { host: authority }, agent: false,
    });
    connect.on('connect', (res, socket) => {
      if (res.statusCode !== 200) {
        socket.destroy();
        callback(new Error(`CONNECT answered ${res.statusCode}`));
        return;
      }
      callback(null, tls.connect({ socket, servername: options.servername || options.host, ca }));
    });
    connect.on('error', callback);
    connect.end();
  }
}

const agent = new TunnelAgent({ keepAlive: true, maxSockets: 1, ca });

function fetchTo(out) {
  return new Promise((resolve, reject) => {
    https.get(targetUrl, { agent, ca }, (res) => {
      const file = fs.createWriteStream(out);
      res.pipe(file);
      file.on('finish', () => resolve(res.statusCode));
      res.on('error', reject);
    }).on('error', reject);
  });
}

(async () => {
  const statuses = [];
  for (const out of outs) statuses.push(await fetchTo(out));
  agent.destroy();
  process.stdout.write(JSON.stringify({ statuses }) + '\n');
})().catch((err) => { console.error(err); process.exit(1); });
