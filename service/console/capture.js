// The microphone's samples, passed on as they come (an AudioWorklet of the console's
// recorder: console.js writes them out as a WAV clip).
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0]?.[0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("graft-capture", Capture);
