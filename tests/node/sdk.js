// One scenario of the official Azure IoT device SDK for Node.js, unchanged,
// pointed at the gateway by GatewayHostName in its connection string, over
// the transport EDGEHUB_TRANSPORT names: mqtt (default), amqp, or either
// over WebSocket on 443 (mqttws, amqpws). Driven
// by tests/node/test_node_sdk*.py: the scenario name is the first argument,
// the connection string is EDGEHUB_CS and the CA file EDGEHUB_CA. Every
// event is one JSON line on stdout; the script exits when its scenario is
// done or when stdin closes.
'use strict';

const fs = require('fs');
const readline = require('readline');
const { Client, ModuleClient, Message } = require('azure-iot-device');
const Transport = {
  mqtt: () => require('azure-iot-device-mqtt').Mqtt,
  mqttws: () => require('azure-iot-device-mqtt').MqttWs,
  amqp: () => require('azure-iot-device-amqp').Amqp,
  amqpws: () => require('azure-iot-device-amqp').AmqpWs,
}[process.env.EDGEHUB_TRANSPORT || 'mqtt']();
// How the c2d scenario settles what it gets: complete, reject or abandon
// (abandon once, then complete the redelivery).
const settle = process.env.EDGEHUB_SETTLE || 'complete';
const { NoRetry } = require('azure-iot-common');

const scenario = process.argv[2];
const cs = process.env.EDGEHUB_CS;
const ca = fs.readFileSync(process.env.EDGEHUB_CA, 'utf8');

function say(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function fail(where, err) {
  say({ error: where, name: err && err.name, message: String(err && (err.message || err)) });
  process.exit(1);
}

function open(kind) {
  const client = (kind === 'module' ? ModuleClient : Client).fromConnectionString(cs, Transport);
  client.setRetryPolicy(new NoRetry());
  client.on('error', (e) => say({ clientError: e.name, message: e.message }));
  return new Promise((resolve, reject) => {
    client.setOptions({ ca }, (err) => {
      if (err) return reject(err);
      client.open((err2) => (err2 ? reject(err2) : resolve(client)));
    });
  });
}

// Lines on stdin are commands from the test; closing stdin ends the script.
function commands(handle) {
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => handle(JSON.parse(line)));
  rl.on('close', () => process.exit(0));
}

const scenarios = {
  // Three messages with an application property, content type and id.
  async telemetry() {
    const c = await open('device');
    for (let i = 0; i < 3; i++) {
      const m = new Message(JSON.stringify({ n: i }));
      m.properties.add('kind', 'test');
      m.contentType = 'application/json';
      m.contentEncoding = 'utf-8';
      m.messageId = `node-${i}`;
      await c.sendEvent(m);
      say({ sent: i });
    }
    await c.close();
    process.exit(0);
  },

  // Prints every cloud-to-device message and completes it.
  async c2d() {
    const c = await open('device');
    const abandoned = new Set();
    c.on('message', (m) => {
      const props = {};
      for (let i = 0; i < m.properties.count(); i++) {
        const p = m.properties.getItem(i);
        props[p.key] = p.value;
      }
      say({ c2d: m.data.toString(), messageId: m.messageId, properties: props });
      const done = (err) => err && say({ settleError: err.message });
      if (settle === 'reject') c.reject(m, done);
      else if (settle === 'abandon' && !abandoned.has(m.messageId)) {
        abandoned.add(m.messageId);
        c.abandon(m, done);
      } else c.complete(m, done);
    });
    say({ ready: true });
    commands(() => {});
  },

  // Twin read, desired patches as they come, one good and one refused
  // reported patch.
  async twin() {
    const c = await open('device');
    const twin = await c.getTwin();
    say({ desired: twin.properties.desired });
    twin.on('properties.desired', (patch) => say({ desiredPatch: patch }));
    await new Promise((resolve) =>
      twin.properties.reported.update({ firmware: '1.2.3', nested: { a: 1 } }, (err) => {
        say({ reported: err ? { error: err.name, message: err.message } : 'ok' });
        resolve();
      })
    );
    // Names with a space are refused by IoT Hub (and by the gateway).
    await new Promise((resolve) =>
      twin.properties.reported.update({ 'bad name': 1 }, (err) => {
        say({ refused: err ? { error: err.name, message: err.message } : 'accepted' });
        resolve();
      })
    );
    say({ ready: true });
    commands(() => {});
  },

  // Answers the direct method "echo" with its payload.
  async methods() {
    const c = await open('device');
    c.onDeviceMethod('echo', (req, res) => {
      say({ method: req.methodName, payload: req.payload });
      res.send(200, { echoed: req.payload }, (err) => err && say({ responseError: err.message }));
    });
    say({ ready: true });
    commands(() => {});
  },

  // A module output, published the way IoT Edge's Node module template does.
  async output() {
    const c = await open('module');
    const m = new Message(JSON.stringify({ temp: 42 }));
    m.properties.add('unit', 'C');
    await c.sendOutputEvent('out1', m);
    say({ sent: 'out1' });
    await c.close();
    process.exit(0);
  },

  // Prints every module input message and completes it.
  async input() {
    const c = await open('module');
    c.on('inputMessage', (inputName, m) => {
      const props = {};
      for (let i = 0; i < m.properties.count(); i++) {
        const p = m.properties.getItem(i);
        props[p.key] = p.value;
      }
      say({ input: inputName, body: m.data.toString(), properties: props });
      c.complete(m, (err) => err && say({ completeError: err.message }));
    });
    say({ ready: true });
    commands(() => {});
  },

  // Connects with whatever key EDGEHUB_CS carries and says what happened.
  async connect() {
    try {
      const c = await open('device');
      say({ connected: true });
      await c.close();
    } catch (e) {
      say({ connected: false, name: e.name, message: e.message });
    }
    process.exit(0);
  },
};

if (!scenarios[scenario]) {
  fail('usage', `unknown scenario ${scenario}`);
}
scenarios[scenario]().catch((e) => fail(scenario, e));
