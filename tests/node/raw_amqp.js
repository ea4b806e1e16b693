// A raw AMQP 1.0 client on rhea (an independent implementation, not the
// Azure SDK), driven line by line by tests/node/test_amqp_raw.py: each line
// on stdin is a JSON command, each event one JSON line on stdout. One
// connection per process, to 127.0.0.1:EDGEHUB_AMQPS_PORT over TLS with the
// hub's CA (EDGEHUB_CA).
'use strict';

const fs = require('fs');
const readline = require('readline');
const rhea = require('rhea');

const ca = fs.readFileSync(process.env.EDGEHUB_CA);
const port = Number(process.env.EDGEHUB_AMQPS_PORT);
const container = rhea.create_container({ id: 'raw-amqp-test' });
let conn = null;
const links = {};
const deliveries = {};

function say(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function linkError(link) {
  const e = link.error || (link.remote && link.remote.detach && link.remote.detach.error);
  return e ? { condition: e.condition, description: e.description } : null;
}

function watch(name, link) {
  link.on('sender_open', () => say({ attached: name }));
  link.on('receiver_open', () => say({ attached: name }));
  link.on('sender_close', () => say({ detached: name, error: linkError(link) }));
  link.on('receiver_close', () => say({ detached: name, error: linkError(link) }));
  link.on('sender_error', () => {});
  link.on('receiver_error', () => {});
}

const commands = {
  connect(c) {
    const opts = {
      host: '127.0.0.1', port, transport: 'tls', ca, servername: 'localhost',
      reconnect: false, idle_time_out: c.idleTimeout || 0,
    };
    if (c.username) {
      opts.username = c.username;
      opts.password = c.password;
    }
    if (c.sasl === false) opts.sasl = { enabled: false };
    if (c.cert) {
      opts.cert = fs.readFileSync(c.cert);
      opts.key = fs.readFileSync(c.key);
    }
    conn = container.connect(opts);
    conn.on('connection_open', () => say({ open: true }));
    conn.on('connection_error', (ctx) => say({ connectionError: String(ctx.connection.error && ctx.connection.error.condition) }));
    conn.on('disconnected', (ctx) => say({ disconnected: String(ctx.error || (ctx.connection && ctx.connection.error) || '') }));
    conn.on('error', () => {});
  },

  sender(c) {
    const s = conn.open_sender({ name: c.name, target: { address: c.address }, autosettle: true });
    links[c.name] = s;
    watch(c.name, s);
    s.on('accepted', (ctx) => say({ settled: ctx.delivery.tag.toString(), state: 'accepted' }));
    s.on('rejected', (ctx) => {
      const e = ctx.delivery.remote_state && ctx.delivery.remote_state.error;
      say({ settled: ctx.delivery.tag.toString(), state: 'rejected', condition: e && e.condition, description: e && e.description });
    });
    s.on('released', (ctx) => say({ settled: ctx.delivery.tag.toString(), state: 'released' }));
  },

  send(c) {
    const msg = { body: c.bodyBytes ? Buffer.alloc(c.bodyBytes, 0x61) : rhea.message.data_section(Buffer.from(c.body || '')) };
    if (c.bodyString !== undefined) msg.body = c.bodyString;
    if (c.id) msg.message_id = c.id;
    if (c.properties) msg.application_properties = c.properties;
    if (c.contentType) msg.content_type = c.contentType;
    links[c.name].send(msg, Buffer.from(c.tag || String(Date.now())));
  },

  // A batch as the SDKs send it: message format 0x80013700, each Data
  // section one whole encoded message.
  sendBatch(c) {
    const parts = c.bodies.map((b, i) => rhea.message.encode({
      body: rhea.message.data_section(Buffer.from(b)),
      message_id: `${c.tag}-${i}`,
      application_properties: { part: String(i) },
    }));
    const payload = rhea.message.encode({ body: rhea.message.data_sections(parts) });
    links[c.name].send(payload, Buffer.from(c.tag), 0x80013700);
  },

  receiver(c) {
    const r = conn.open_receiver({ name: c.name, source: { address: c.address }, autoaccept: false, credit_window: c.credit === undefined ? 10 : c.credit });
    links[c.name] = r;
    watch(c.name, r);
    r.on('message', (ctx) => {
      const m = ctx.message;
      const key = c.name + ':' + Object.keys(deliveries).length;
      deliveries[key] = ctx.delivery;
      let body = m.body;
      if (body && body.typecode === 0x75) body = body.content;
      if (Buffer.isBuffer(body)) body = body.toString();
      say({
        message: c.name, key, body,
        correlationId: m.correlation_id === undefined ? null : String(m.correlation_id),
        properties: m.application_properties || {},
        annotations: m.message_annotations || {},
      });
    });
  },

  flow(c) {
    links[c.name].add_credit(c.credit);
  },

  accept(c) {
    deliveries[c.key].accept();
  },

  // A put-token on $cbs: needs the "cbs" sender and "cbsReplies" receiver.
  putToken(c) {
    links.cbs.send({
      message_id: c.id,
      application_properties: { operation: 'put-token', type: c.type || 'servicebus.windows.net:sastoken', name: c.audience },
      body: c.token,
    });
  },

  close() {
    conn.close();
  },
};

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const c = JSON.parse(line);
  try {
    commands[c.op](c);
  } catch (e) {
    say({ error: c.op, message: String(e && e.message) });
  }
});
rl.on('close', () => process.exit(0));
