// Graft console: the REST API under /v1, called with the key kept in sessionStorage.
// No framework and no build step; the DOM is built with textContent (never innerHTML),
// so nothing a head or a label holds is ever parsed as markup.

const KEY = "graft.key";
const IMAGE = /\.(jpe?g|png|webp)$/i;
const TEXT = /\.txt$/i;
const AUDIO = /\.(wav|flac|ogg|oga|opus|mp3)$/i;
const SVG = "http://www.w3.org/2000/svg";
const STAGES = {
  embedding: "Embedding examples",
  fitting: "Fitting the head",
  fine_tuning: "Fine-tuning its top",
  adapting: "Adapting to unlabelled examples",
};

const $ = (id) => document.getElementById(id);
let current = null; // the head on show
let chosen = null; // the create form's examples from a chosen or dropped folder, read once

// API -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(`${code}: ${message}`);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(status, text) {
  try {
    const { error } = JSON.parse(text);
    return new ApiError(status, error.code, error.message);
  } catch {
    return new ApiError(status, `http_${status}`, text.slice(0, 200) || "no answer");
  }
}

async function api(method, path, { json, body, query, raw } = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const url = `/v1${path}${query ? `?${new URLSearchParams(query)}` : ""}`;
  const response = await fetch(url, { method, headers, body });
  if (!response.ok) throw await errorOf(response.status, await response.text());
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// A JSON POST whose upload reports progress (fetch cannot).
function postWithProgress(path, json, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", `/v1${path}`);
    request.setRequestHeader("Authorization", `Bearer ${sessionStorage.getItem(KEY)}`);
    request.setRequestHeader("Content-Type", "application/json");
    request.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded, e.total);
    request.onload = async () => {
      if (request.status < 400) resolve(JSON.parse(request.responseText));
      else reject(await errorOf(request.status, request.responseText));
    };
    request.onerror = () => reject(new ApiError(0, "network", "the server did not answer"));
    request.send(JSON.stringify(json));
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function untilTrained(head) {
  while (head.status === "training") {
    showTraining(head.progress);
    await sleep(500);
    head = await api("GET", `/heads/${head.id}`);
  }
  return head;
}

// Messages ----------------------------------------------------------------------------------

function showError(error) {
  const alert = $("alert");
  alert.textContent = error.message ?? String(error); // an ApiError's is "code: message"
  alert.hidden = false;
}

function clearError() {
  $("alert").hidden = true;
}

// Run a handler with its button disabled; any error is shown, never thrown away.
async function busy(button, work) {
  clearError();
  button.disabled = true;
  try {
    await work();
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const pct = (x) => `${(100 * x).toFixed(1)}%`;

// Examples from folders, drops and text --------------------------------------------------

// Files of a folder picker: "root/label/…/file"; the label is the folder below the root.
function fromPicker(files) {
  const found = [];
  for (const file of files) {
    const parts = file.webkitRelativePath.split("/");
    if (parts.length >= 3 && !parts.some((p) => p.startsWith("."))) {
      found.push({ label: parts[1], file });
    }
  }
  return found;
}

function readEntries(reader) {
  return new Promise((resolve, reject) => reader.readEntries(resolve, reject));
}

async function filesUnder(entry) {
  if (entry.isFile) return [await new Promise((resolve, reject) => entry.file(resolve, reject))];
  const reader = entry.createReader();
  const files = [];
  for (let batch = await readEntries(reader); batch.length; batch = await readEntries(reader)) {
    for (const child of batch) if (!child.name.startsWith(".")) files.push(...(await filesUnder(child)));
  }
  return files;
}

// A drop of one folder holding label folders, or of the label folders themselves.
async function fromDrop(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry()).filter(Boolean);
  const folders = entries.filter((e) => e.isDirectory);
  let labelled = folders;
  if (folders.length === 1) {
    const children = await readEntries(folders[0].createReader());
    if (children.some((c) => c.isDirectory)) labelled = children.filter((c) => c.isDirectory);
  }
  const found = [];
  for (const folder of labelled) {
    if (folder.name.startsWith(".")) continue;
    for (const file of await filesUnder(folder)) found.push({ label: folder.name, file });
  }
  return found;
}

function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// [{label, file}] as the API's examples: images and clips as base64, .txt files one per line.
async function examplesOf(found) {
  const examples = [];
  for (const { label, file } of found) {
    if (IMAGE.test(file.name)) examples.push({ label, image: await base64(file) });
    else if (AUDIO.test(file.name)) examples.push({ label, audio: await base64(file) });
    else if (TEXT.test(file.name)) {
      for (const line of (await file.text()).split(/\r?\n/)) {
        if (line.trim()) examples.push({ label, text: line.trim() });
      }
    }
  }
  return examples;
}

function examplesOfText(text) {
  const examples = [];
  for (const [index, line] of text.split(/\r?\n/).entries()) {
    if (!line.trim()) continue;
    const colon = line.indexOf(":");
    if (colon < 1) throw new Error(`line ${index + 1}: write it as "label: text"`);
    examples.push({ label: line.slice(0, colon).trim(), text: line.slice(colon + 1).trim() });
  }
  return examples;
}

function describe(examples) {
  const labels = new Set(examples.map((e) => e.label));
  return `${examples.length} examples, ${labels.size} labels: ${[...labels].sort().join(", ")}`;
}

async function createExamples() {
  return chosen?.length ? chosen : examplesOfText($("texts").value);
}

// Heads list --------------------------------------------------------------------------------

async function loadHeads() {
  const { heads } = await api("GET", "/heads");
  const body = $("heads").tBodies[0];
  body.replaceChildren();
  for (const head of heads) {
    const row = el("tr");
    const open = el("button", head.name, { type: "button", "aria-label": `Open head ${head.name}` });
    open.addEventListener("click", () => busy(open, () => showHead(head.id)));
    const name = el("td");
    name.append(open);
    const metrics = head.metrics ?? {};
    const accuracy = metrics.cv_accuracy == null ? "" : pct(metrics.cv_accuracy);
    row.append(name, el("td", head.backbone), el("td", head.status), el("td", String(head.version)),
      el("td", metrics.n_examples == null ? "" : String(metrics.n_examples)), el("td", accuracy));
    if (current && current.id === head.id) row.className = "selected";
    body.append(row);
  }
  $("heads").hidden = heads.length === 0;
  $("no-heads").hidden = heads.length > 0;
}

async function loadBackbones() {
  const { backbones } = await api("GET", "/backbones");
  const select = $("backbone");
  select.replaceChildren(el("option", "auto (chosen on your examples)", { value: "auto" }));
  for (const b of backbones) {
    select.append(el("option", `${b.id} (${b.modality}, ${b.family})`, { value: b.id }));
  }
}

// Create ------------------------------------------------------------------------------------

function showTraining(progress) {
  const bar = $("train-bar");
  if (!progress) {
    bar.removeAttribute("value");
    $("train-detail").textContent = "waiting to start";
    return;
  }
  $("train-label").textContent = STAGES[progress.stage] ?? progress.stage;
  bar.max = Math.max(progress.total, 1);
  bar.value = progress.done;
  $("train-detail").textContent = `${progress.done} of ${progress.total}`;
}

async function createHead() {
  const examples = await createExamples();
  if (!examples.length) throw new Error("no examples: choose or drop a folder, or type texts");
  $("create-progress").hidden = false;
  $("upload-bar").value = 0;
  $("upload-detail").textContent = "";
  $("train-bar").removeAttribute("value");
  $("train-label").textContent = "Training";
  $("train-detail").textContent = "";
  const spec = {
    name: $("head-name").value,
    backbone: $("backbone").value,
    fine_tune: $("fine-tune").value,
    examples,
  };
  let head = await postWithProgress("/heads", spec, (sent, total) => {
    $("upload-bar").value = sent / total;
    $("upload-detail").textContent = `${(sent / 1e6).toFixed(1)} of ${(total / 1e6).toFixed(1)} MB`;
  });
  $("upload-bar").value = 1;
  head = await untilTrained(head);
  $("train-label").textContent = head.status === "ready" ? "Trained" : "Failed";
  $("train-bar").max = 1;
  $("train-bar").value = 1;
  $("train-detail").textContent = "";
  $("create-form").reset();
  chosen = null;
  $("found").textContent = "";
  await loadHeads();
  await showHead(head.id);
  $("head-section").scrollIntoView();
}

// One head: summary and pictures ---------------------------------------------------------

async function showHead(id) {
  current = await api("GET", `/heads/${id}`);
  const head = current;
  const m = head.metrics ?? {};
  $("head-section").hidden = false;
  $("head-title").textContent = `${head.name} (v${head.version})`;
  let summary = `${head.status} on ${head.backbone}`;
  if (m.n_examples != null) summary += `, ${m.n_examples} examples`;
  if (m.cv_accuracy != null) {
    const margin = m.cv_accuracy_margin == null ? "" : ` ± ${pct(m.cv_accuracy_margin)}`;
    summary += `. Held-out accuracy ${pct(m.cv_accuracy)}${margin} over ${m.cv_folds} folds`;
    summary += ` (always the most common label: ${pct(m.majority_baseline)})`;
  }
  if (m.fine_tuning) summary += `. Top: ${m.fine_tuning.chosen.replace("_", "-")}`;
  // A ready head still training: `auto` publishes a first version, then better ones.
  if (head.status === "ready" && head.progress) summary += ". A next version is on its way";
  if (head.error) summary += `. Error: ${head.error}`;
  $("head-summary").textContent = summary + ".";
  $("head-warnings").replaceChildren(...(m.warnings ?? []).map((w) => el("li", w)));
  drawConfusion(head.labels, m.cv_confusion_matrix);
  drawPerLabel(head.labels, m.cv_per_label);
  drawReliability(m.cv_reliability, m.cv_ece);
  drawBackboneChoice(head.backbone, m.backbone_selection);
  $("predictions").hidden = true;
  await loadHeads();
}

function figure(id, node, note) {
  const fig = $(id);
  fig.replaceChildren(fig.querySelector("figcaption"));
  if (node) fig.append(node);
  if (note) fig.append(el("p", note));
}

function chart(width, height, label) {
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label });
}

function drawConfusion(labels, matrix) {
  if (!matrix) return figure("confusion", null, "Not measured: too few examples to hold any out.");
  const n = labels.length;
  const cell = Math.max(22, Math.min(48, Math.floor(320 / n)));
  const left = 110;
  const top = 16 + 5 * Math.min(16, Math.max(...labels.map((l) => l.length))); // room for slanted labels
  const total = matrix.flat().reduce((a, b) => a + b, 0);
  const right = labels.reduce((a, _, i) => a + matrix[i][i], 0);
  const picture = chart(left + n * cell + 4, top + n * cell + 4,
    `Confusion matrix: ${right} of ${total} held-out examples on the diagonal`);
  labels.forEach((label, i) => {
    picture.append(svg("text", { x: left - 6, y: top + i * cell + cell / 2 + 4, "text-anchor": "end" },
      label.slice(0, 16)));
    const x = left + i * cell + cell / 2;
    picture.append(svg("text", { x, y: top - 6, transform: `rotate(-45 ${x} ${top - 6})` }, label.slice(0, 16)));
    const rowTotal = matrix[i].reduce((a, b) => a + b, 0) || 1;
    matrix[i].forEach((count, j) => {
      const share = count / rowTotal; // of the true label's examples
      const lightness = 97 - 62 * share;
      const rect = svg("rect", {
        x: left + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1,
        fill: `hsl(215, 70%, ${lightness}%)`,
      });
      rect.append(svg("title", {}, `true ${label}, predicted ${labels[j]}: ${count}`));
      picture.append(rect);
      picture.append(svg("text", {
        x: left + j * cell + cell / 2, y: top + i * cell + cell / 2 + 4, "text-anchor": "middle",
        class: lightness < 60 ? "on-dark" : "",
      }, String(count)));
    });
  });
  figure("confusion", picture, `${right} of ${total} held-out examples right; shade: share of the row.`);
}

function drawPerLabel(labels, perLabel) {
  if (!perLabel) return figure("per-label", null, "Not measured.");
  const row = 40;
  const left = 110;
  const width = 220;
  const picture = chart(left + width + 50, labels.length * row + 24, "Precision and recall per label");
  labels.forEach((label, i) => {
    const { precision, recall, support } = perLabel[label];
    const y = i * row;
    picture.append(svg("text", { x: left - 6, y: y + 20, "text-anchor": "end" }, label.slice(0, 16)));
    [["precision", precision, "#1f5fbf"], ["recall", recall, "#b34700"]].forEach(
      ([name, value, colour], k) => {
        const bar = svg("rect", { x: left, y: y + 4 + k * 16, width: Math.max(1, value * width), height: 14, fill: colour });
        bar.append(svg("title", {}, `${label} ${name}: ${pct(value)} (${support} examples)`));
        picture.append(bar, svg("text", { x: left + value * width + 4, y: y + 15 + k * 16 }, pct(value)));
      });
  });
  const legendY = labels.length * row + 16;
  picture.append(svg("rect", { x: left, y: legendY - 9, width: 10, height: 10, fill: "#1f5fbf" }),
    svg("text", { x: left + 14, y: legendY }, "precision"),
    svg("rect", { x: left + 90, y: legendY - 9, width: 10, height: 10, fill: "#b34700" }),
    svg("text", { x: left + 104, y: legendY }, "recall"));
  figure("per-label", picture);
}

function drawReliability(bins, ece) {
  if (!bins) return figure("reliability", null, "Not measured.");
  const size = 220;
  const pad = 34;
  const margin = 14; // room for a full dot at (1, 1)
  const picture = chart(size + pad + margin, size + pad + margin, `Reliability diagram, calibration error ${ece}`);
  const x = (v) => pad + v * size;
  const y = (v) => margin + size - v * size;
  picture.append(
    svg("line", { class: "axis", x1: x(0), y1: y(0), x2: x(1), y2: y(0) }),
    svg("line", { class: "axis", x1: x(0), y1: y(0), x2: x(0), y2: y(1) }),
    svg("line", { class: "ideal", x1: x(0), y1: y(0), x2: x(1), y2: y(1) }),
    svg("text", { x: x(0.5), y: y(0) + 28, "text-anchor": "middle" }, "score"),
    svg("text", { x: 10, y: y(0.5), transform: `rotate(-90 10 ${y(0.5)})`, "text-anchor": "middle" }, "share right"),
  );
  for (const v of [0, 0.5, 1]) {
    picture.append(svg("text", { x: x(v), y: y(0) + 14, "text-anchor": "middle" }, String(v)),
      svg("text", { x: pad - 4, y: y(v) + 4, "text-anchor": "end" }, String(v)));
  }
  const most = Math.max(...bins.map((b) => b.count));
  for (const bin of bins) {
    const dot = svg("circle", { cx: x(bin.confidence), cy: y(bin.accuracy), r: 3 + 7 * Math.sqrt(bin.count / most), fill: "#1f5fbf", "fill-opacity": 0.75 });
    dot.append(svg("title", {}, `scores near ${pct(bin.confidence)}: ${pct(bin.accuracy)} right (${bin.count} examples)`));
    picture.append(dot);
  }
  figure("reliability", picture, `On the dashed line, a score of 80% is right 80% of the time. Calibration error ${ece == null ? "–" : pct(ece)}.`);
}

function drawBackboneChoice(backbone, selection) {
  if (!selection) return figure("backbone-choice", null, `${backbone}, as asked (not chosen by auto).`);
  // Ranked by LogME; the shortlist's bars are their held-out accuracy (0 to 1).
  const ids = Object.keys(selection.logme).sort((a, b) => selection.logme[b] - selection.logme[a]);
  const row = 26;
  const left = 150;
  const width = 180;
  const picture = chart(left + width + 150, ids.length * row + 4, `Backbones ranked by LogME; chosen ${selection.chosen}`);
  ids.forEach((id, i) => {
    const chosen = id === selection.chosen;
    const accuracy = selection.cv_accuracy[id];
    const logme = `LogME ${selection.logme[id].toFixed(3)}`;
    picture.append(svg("text", { x: left - 6, y: i * row + 16, "text-anchor": "end", "font-weight": chosen ? "bold" : "normal" },
      `${chosen ? "✓ " : ""}${id}`));
    if (accuracy == null) {
      picture.append(svg("text", { x: left, y: i * row + 16 }, `not trained (${logme})`));
      return;
    }
    const bar = svg("rect", { x: left, y: i * row + 5, width: Math.max(2, accuracy * width), height: 14, fill: chosen ? "#1f5fbf" : "#8a96a8" });
    bar.append(svg("title", {}, `${id}: held-out accuracy ${pct(accuracy)}, ${logme}`));
    picture.append(bar, svg("text", { x: left + accuracy * width + 4, y: i * row + 16 }, `${pct(accuracy)} (${logme})`));
  });
  figure("backbone-choice", picture, `Every backbone scored by LogME on your examples; the best ${selection.shortlist.length} trained (bars: held-out accuracy) and the lower held-out log-loss kept.`);
}

// The microphone ---------------------------------------------------------------------------

let recording = null; // while recording: its audio context, stream and samples so far
let recorded = null; // the last recording, a WAV File

// Float samples in [-1, 1] as a 16-bit mono WAV file (what every decoder reads; the
// browser's own recorder writes WebM, which the server's decoder does not).
function wavFile(chunks, rate) {
  const n = chunks.reduce((total, c) => total + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (offset, s) => [...s].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + 2 * n, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true); // the format chunk's size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, 2 * rate, true); // bytes per second
  view.setUint16(32, 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  text(36, "data");
  view.setUint32(40, 2 * n, true);
  let offset = 44;
  for (const chunk of chunks) {
    for (const sample of chunk) {
      view.setInt16(offset, Math.round(32767 * Math.max(-1, Math.min(1, sample))), true);
      offset += 2;
    }
  }
  return new File([view], "recording.wav", { type: "audio/wav" });
}

async function toggleRecording() {
  const button = $("record");
  if (!recording) {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const context = new AudioContext();
    await context.audioWorklet.addModule("/console/capture.js");
    const capture = new AudioWorkletNode(context, "graft-capture");
    const chunks = [];
    capture.port.onmessage = (e) => chunks.push(e.data);
    context.createMediaStreamSource(stream).connect(capture);
    capture.connect(context.destination); // pulled by the graph; it writes silence
    recording = { context, stream, chunks };
    button.textContent = "Stop recording";
    $("record-status").textContent = "recording…";
    return;
  }
  const { context, stream, chunks } = recording;
  recording = null;
  stream.getTracks().forEach((track) => track.stop());
  await context.close();
  recorded = wavFile(chunks, context.sampleRate);
  droppedFiles = null;
  $("playback").src = URL.createObjectURL(recorded);
  $("playback").hidden = false;
  button.textContent = "Record again";
  const seconds = chunks.reduce((total, c) => total + c.length, 0) / context.sampleRate;
  $("record-status").textContent = `${seconds.toFixed(1)} s recorded: Predict sends it`;
}

// Try it, add examples, download, delete --------------------------------------------------

let droppedFiles = null;

async function predict() {
  const topK = $("top-k").value || "1";
  const files = recorded ? [recorded] : (droppedFiles ?? [...$("predict-files").files]);
  const texts = $("predict-texts").value.split(/\r?\n/).map((t) => t.trim()).filter(Boolean);
  let answer;
  let names;
  if (files.length) {
    const kinds = new Set(files.map((f) => (AUDIO.test(f.name) ? "audio" : "image")));
    if (kinds.size > 1) throw new Error("predict images or clips, not both at once");
    const form = new FormData();
    for (const file of files) form.append([...kinds][0], file);
    answer = await api("POST", `/heads/${current.id}/predict`, { body: form, query: { top_k: topK } });
    names = files;
  } else if (texts.length) {
    answer = await api("POST", `/heads/${current.id}/predict`, {
      json: { inputs: texts.map((text) => ({ text })), top_k: Number(topK) },
    });
    names = texts;
  } else {
    throw new Error("choose, drop or record images or clips, or type texts");
  }
  const body = $("predictions").tBodies[0];
  body.replaceChildren();
  answer.predictions.forEach((p, i) => {
    const label = el("td", p.label ?? "—");
    if (p.unknown) label.append(" ", el("span", "unknown", { class: "badge", title: "far from every label this head knows" }));
    const ranked = p.top_k.map((s) => `${s.label} ${pct(s.score)}`).join(", ");
    const row = el("tr");
    row.append(inputCell(names[i]), label, el("td", ranked));
    body.append(row);
  });
  $("predictions").hidden = false;
}

// A predict's input as its row shows it: a text, a file's name, and a clip's player.
function inputCell(input) {
  if (typeof input === "string") return el("td", input);
  const cell = el("td", input.name);
  if (AUDIO.test(input.name)) {
    const player = el("audio", null, { controls: "", "aria-label": `Play ${input.name}` });
    player.src = URL.createObjectURL(input);
    cell.append(" ", player);
  }
  return cell;
}

async function addExamples() {
  const examples = await examplesOf(fromPicker($("more-folder").files));
  if (!examples.length) throw new Error("choose a folder holding one folder per label");
  let head = await api("POST", `/heads/${current.id}/examples`, { json: { examples } });
  head = await untilTrained(head);
  $("examples-form").reset();
  await showHead(head.id);
}

async function download() {
  const response = await api("GET", `/heads/${current.id}/model.onnx`, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", null, { href: url, download: `${current.name}-v${current.version}.onnx` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function deleteHead() {
  if (!confirm(`Delete head "${current.name}"? Its examples and versions go with it.`)) return;
  await api("DELETE", `/heads/${current.id}`);
  current = null;
  $("head-section").hidden = true;
  await loadHeads();
}

// Wiring ------------------------------------------------------------------------------------

function dropZone(id, onFiles) {
  const zone = $(id);
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles(e.dataTransfer).catch(showError);
  });
}

async function start() {
  clearError();
  await Promise.all([loadHeads(), loadBackbones()]);
  $("app").hidden = false;
  $("welcome").hidden = true;
}

function on(id, event, handler) {
  $(id).addEventListener(event, handler);
}

document.addEventListener("DOMContentLoaded", () => {
  on("key-form", "submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("api-key").value.trim());
    $("api-key").value = "";
    start().catch((error) => {
      $("app").hidden = true;
      $("welcome").hidden = false;
      showError(error);
    });
  });
  on("forget-key", "click", () => {
    sessionStorage.removeItem(KEY);
    $("app").hidden = true;
    $("welcome").hidden = false;
    current = null;
  });
  on("refresh", "click", (e) => busy(e.target, loadHeads));
  on("folder", "change", async () => {
    chosen = await examplesOf(fromPicker($("folder").files));
    $("found").textContent = describe(chosen);
  });
  dropZone("create-drop", async (transfer) => {
    chosen = await examplesOf(await fromDrop(transfer));
    $("found").textContent = `dropped: ${describe(chosen)}`;
  });
  dropZone("predict-drop", async (transfer) => {
    droppedFiles = [...transfer.files].filter((f) => IMAGE.test(f.name) || AUDIO.test(f.name));
    recorded = null;
    $("predict-drop").textContent = `${droppedFiles.length} files dropped`;
  });
  on("predict-files", "change", () => {
    droppedFiles = null;
    recorded = null;
  });
  on("record", "click", (e) => busy(e.target, toggleRecording));
  on("create-form", "submit", (e) => {
    e.preventDefault();
    busy($("create"), createHead);
  });
  on("predict-form", "submit", (e) => {
    e.preventDefault();
    busy($("predict"), predict);
  });
  on("examples-form", "submit", (e) => {
    e.preventDefault();
    busy($("add-examples"), addExamples);
  });
  on("download", "click", (e) => busy(e.target, download));
  on("delete", "click", (e) => busy(e.target, deleteHead));
  if (sessionStorage.getItem(KEY)) start().catch(showError);
});
