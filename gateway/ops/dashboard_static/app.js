// The dashboard's triage worklist: sign-in (OpenID Connect authorization code with PKCE, or a service token),
// the studies from GET /studies, kept current by the server-sent events of GET /events/worklist.
// No framework, no build step, nothing loaded from elsewhere.

const TOKEN_KEY = "gateway.token";
const RANK = { STAT: 0, URGENT: 1, ROUTINE: 2 };
const rows = new Map(); // study UID -> the latest row
// When each study first appeared on this page, and when it first showed as STAT (ms since the epoch): read by
// the browser tests for the live-update latency.
window.gatewayDashboard = { appeared: {}, stat: {} };

const $ = (id) => document.getElementById(id);

function show(id, visible) { $(id).hidden = !visible; }

function message(text) { $("message").textContent = text; show("message", Boolean(text)); }

function base64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomString(n) { return base64url(crypto.getRandomValues(new Uint8Array(n))); }

function claims(token) {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try { return JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/"))); } catch { return null; }
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${token}` } });
  if (response.status === 401) { signOut("Your sign-in has expired or was refused: sign in again."); throw new Error("401"); }
  return response;
}

// -- sign-in ---------------------------------------------------------------------------------------------------

async function startOidc(config) {
  const verifier = randomString(48);
  const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  const state = randomString(16);
  sessionStorage.setItem("gateway.pkce", JSON.stringify({ verifier, state }));
  const url = new URL(config.authorization_endpoint);
  url.search = new URLSearchParams({
    response_type: "code", client_id: config.client_id, redirect_uri: `${location.origin}/ui/`,
    scope: config.scope, state, code_challenge: challenge, code_challenge_method: "S256",
  }).toString();
  location.assign(url.toString());
}

async function finishOidc(config, params) {
  const pending = JSON.parse(sessionStorage.getItem("gateway.pkce") || "null");
  sessionStorage.removeItem("gateway.pkce");
  history.replaceState(null, "", "/ui/");
  if (!pending || pending.state !== params.get("state")) { message("The sign-in answer did not match: try again."); return; }
  const response = await fetch(config.token_endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code", code: params.get("code"), redirect_uri: `${location.origin}/ui/`,
      client_id: config.client_id, code_verifier: pending.verifier,
    }),
  });
  if (!response.ok) { message(`The identity provider refused the sign-in (${response.status}).`); return; }
  const answer = await response.json();
  sessionStorage.setItem(TOKEN_KEY, answer.access_token || answer.id_token);
}

function signOut(text = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  show("worklist", false); show("who", false); show("sign-out", false); show("sign-in", true);
  message(text);
}

// -- the worklist ----------------------------------------------------------------------------------------------

function priorityOf(row) { return row.stat ? "STAT" : row.priority; }

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function render() {
  const body = $("studies").tBodies[0];
  const sorted = [...rows.values()].sort((a, b) =>
    (RANK[priorityOf(a)] - RANK[priorityOf(b)]) || (b.first_received_at - a.first_received_at));
  body.replaceChildren(...sorted.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.studyUid = row.study_uid;
    tr.dataset.stat = String(priorityOf(row) === "STAT");
    tr.tabIndex = 0;
    tr.setAttribute("aria-label", `Open study ${row.study_uid}`);
    const open = () => { location.hash = `#study/${row.study_uid}`; };
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
    const cells = [
      () => { const b = document.createElement("span"); b.className = `badge ${priorityOf(row)}`; b.textContent = priorityOf(row); return b; },
      () => row.study_uid,
      () => row.calling_ae || "-",
      () => pipelinesOf(row),
      () => row.state.replace("_", " "),
      () => String(row.findings),
      () => ago(row.first_received_at),
    ];
    cells.forEach((cell, i) => {
      const td = document.createElement("td");
      if (i === 1) td.className = "uid";
      const value = cell();
      if (typeof value === "string") td.textContent = value; else td.append(value);
      tr.append(td);
    });
    return tr;
  }));
}

// Which pipelines analysed the study and their rollout mode: a silent pipeline's results are recorded, not shown.
function pipelinesOf(row) {
  const list = document.createElement("span");
  list.className = "pipelines";
  if (!row.pipelines || !row.pipelines.length) { list.textContent = "-"; return list; }
  for (const p of row.pipelines) {
    const item = document.createElement("span");
    item.className = `pipeline mode-${p.mode}`;
    item.dataset.pipeline = p.name;
    item.dataset.mode = p.mode;
    item.textContent = `${p.name} (${p.mode})`;
    list.append(item);
  }
  return list;
}

function upsert(row) {
  const known = rows.get(row.study_uid);
  if (!known) window.gatewayDashboard.appeared[row.study_uid] = Date.now();
  if (priorityOf(row) === "STAT" && (!known || priorityOf(known) !== "STAT")) {
    window.gatewayDashboard.stat[row.study_uid] = Date.now();
    $("announce").textContent = `STAT study from ${row.calling_ae || "a PACS"}: ${row.state.replace("_", " ")}`;
  }
  rows.set(row.study_uid, row);
}

async function listen() {
  $("live").classList.remove("off");
  try {
    const response = await api("/events/worklist", { headers: { Accept: "text/event-stream" } });
    if (!response.ok) throw new Error(String(response.status));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (block.includes("event: study") && data) { upsert(JSON.parse(data)); render(); }
      }
    }
  } catch (error) {
    if (error.message === "401") return;
  }
  $("live").classList.add("off");
  setTimeout(listen, 2000); // the server went away or the network dropped: listen again
}

// -- the study view -------------------------------------------------------------------------------------------

const REASONS = ["false positive", "not clinically relevant", "wrong location", "wrong measurement", "other"];

function stamp(at) { return new Date(at * 1000).toLocaleString(); }

async function keyImage(uid, imageUid, findings) {
  const response = await api(`/studies/${uid}/images/${imageUid}/rendered?pipeline=${encodeURIComponent(findings[0].pipeline)}`);
  const figure = document.createElement("figure");
  figure.className = "key";
  figure.dataset.imageUid = imageUid;
  if (!response.ok) {
    figure.textContent = `The image is no longer in the spool (${response.status}).`;
    return figure;
  }
  const columns = Number(response.headers.get("X-Image-Columns"));
  const rowsOf = Number(response.headers.get("X-Image-Rows"));
  const img = document.createElement("img");
  img.src = URL.createObjectURL(await response.blob());
  img.alt = `Key image with ${findings.length} AI finding(s)`;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${columns} ${rowsOf}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");
  for (const f of findings) {
    if (!f.box) continue;
    const [x0, y0, x1, y1] = f.box;
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0 }).forEach(([k, v]) => rect.setAttribute(k, v));
    rect.dataset.trackingUid = f.tracking_uid;
    svg.append(rect);
  }
  const caption = document.createElement("figcaption");
  caption.textContent = findings.map((f) => `${f.finding_meaning} ${(100 * f.confidence).toFixed(0)} %`).join(", ");
  figure.append(img);
  // The model's segmentation of this image (its SEG), where the pipeline makes one: a translucent heat map.
  const heat = await api(`/studies/${uid}/images/${imageUid}/heatmap`);
  if (heat.ok) {
    const overlay = document.createElement("img");
    overlay.className = "heatmap";
    overlay.alt = "";
    overlay.src = URL.createObjectURL(await heat.blob());
    figure.append(overlay);
    caption.textContent += " - heat map: the AI's segmentation";
  }
  figure.append(svg, caption);
  return figure;
}

async function verdict(uid, finding, kind, reason, correction) {
  const body = { kind, sr_uid: finding.sr_uid, tracking_uid: finding.tracking_uid };
  if (kind === "reject") body.reason = reason;
  if (correction) body.correction = correction;
  const response = await api(`/studies/${uid}/verdicts`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) { message(`The verdict was not recorded: ${(await response.json()).error}`); return; }
  message("");
  await showStudy(uid);
  $("announce").textContent = `Verdict recorded: ${kind}`;
}

const UNITS = { "[hnsf'U]": "HU", mm2: "mm²", mm3: "mm³" };

// The SR's measurements of a finding: "Long axis 12.0 mm, Area 144.0 mm², Mean 62.4 HU".
function measured(f) {
  if (!f.measurements || !f.measurements.length) return "-";
  return f.measurements.map((m) => `${m.name} ${m.value.toFixed(1)} ${UNITS[m.unit] || m.unit}`).join(", ");
}

// Modify: the radiologist corrects the box (the image's pixels); recorded as a "modify" verdict.
function modifyBox(uid, f) {
  const details = document.createElement("details");
  details.className = "modify";
  const summary = document.createElement("summary");
  summary.textContent = "Modify";
  details.append(summary);
  const inputs = ["left x", "top y", "right x", "bottom y"].map((name, i) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "number"; input.step = "1"; input.min = "0"; input.value = f.box[i].toFixed(0);
    input.dataset.edge = String(i);
    label.append(`${name} `, input);
    details.append(label, " ");
    return input;
  });
  const save = document.createElement("button");
  save.type = "button"; save.textContent = "Save the corrected box";
  save.addEventListener("click", () => verdict(uid, f, "modify", undefined, {
    box: inputs.map((input) => Number(input.value)), image_uid: f.image_uid,
  }));
  details.append(save);
  return details;
}

function findingRow(uid, f) {
  const tr = document.createElement("tr");
  tr.dataset.trackingUid = f.tracking_uid;
  const cells = [f.finding_meaning, f.pipeline, `${(100 * f.confidence).toFixed(1)} %`, measured(f),
    f.box ? f.box.map((v) => v.toFixed(0)).join(", ") : "whole image",
    f.verdict ? `${f.verdict.kind}${f.verdict.reason ? ` (${f.verdict.reason})` : ""}` : "none yet"];
  for (const text of cells) { const td = document.createElement("td"); td.textContent = text; tr.append(td); }
  const actions = document.createElement("td");
  const accept = document.createElement("button");
  accept.type = "button"; accept.textContent = "Accept";
  accept.addEventListener("click", () => verdict(uid, f, "accept"));
  const reason = document.createElement("select");
  reason.setAttribute("aria-label", "Reason for rejecting");
  for (const r of REASONS) { const o = document.createElement("option"); o.value = r; o.textContent = r; reason.append(o); }
  const reject = document.createElement("button");
  reject.type = "button"; reject.textContent = "Reject";
  reject.addEventListener("click", () => verdict(uid, f, "reject", reason.value));
  actions.append(accept, " ", reason, reject);
  if (f.box) actions.append(modifyBox(uid, f));
  tr.append(actions);
  return tr;
}

async function showStudy(uid) {
  show("worklist", false); show("study", true);
  $("study-title").textContent = `Study ${uid}`;
  const about = await api(`/studies/${uid}`);
  if (about.ok) {
    const t = await about.json();
    $("study-summary").textContent =
      `${t.study.stat ? "STAT" : t.study.priority} - ${t.study.state.replace("_", " ")} - from ${t.study.calling_ae || "-"}`;
    $("timeline").replaceChildren(...t.steps.map((s) => {
      const li = document.createElement("li");
      li.textContent = `${stamp(s.at)}: ${s.stage.replace(/_/g, " ")}${s.detail ? ` (${s.detail})` : ""}`;
      return li;
    }));
  }
  const response = await api(`/studies/${uid}/findings`);
  if (response.status === 403) {
    message("This account does not see AI results (radiologist or qa role).");
    $("findings").tBodies[0].replaceChildren(); $("key-images").replaceChildren();
    return;
  }
  const findings = await response.json();
  $("findings").tBodies[0].replaceChildren(...findings.map((f) => findingRow(uid, f)));
  const byImage = new Map();
  for (const f of findings) if (f.box) byImage.set(f.image_uid, [...(byImage.get(f.image_uid) || []), f]);
  const best = [...byImage.entries()].sort((a, b) =>
    Math.max(...b[1].map((f) => f.confidence)) - Math.max(...a[1].map((f) => f.confidence))).slice(0, 4);
  $("key-images").replaceChildren(...await Promise.all(best.map(([image, fs]) => keyImage(uid, image, fs))));
}

// -- QA, models, operations -------------------------------------------------------------------------------------

function cells(tr, values) {
  for (const value of values) {
    const td = document.createElement("td");
    if (value instanceof Node) td.append(value); else td.textContent = value;
    tr.append(td);
  }
  return tr;
}

function button(text, onClick) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = text; b.addEventListener("click", onClick);
  return b;
}

function pct(value) { return value == null ? "-" : `${(100 * value).toFixed(1)} %`; }

async function refused(response, what) {
  if (response.status !== 403) return false;
  message(`This account may not see ${what} (${(await response.json()).error}).`);
  return true;
}

let qaShown = 0; // the latest request wins: an older answer arriving late never overwrites a newer one

async function showQa() {
  const mine = ++qaShown;
  const response = await api(`/qa/discrepancies?state=${$("qa-state").value}`);
  if (await refused(response, "the QA worklist")) return;
  message("");
  const items = await response.json();
  if (mine !== qaShown) return;
  $("discrepancies").tBodies[0].replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    tr.dataset.item = item.id;
    const who = document.createElement("input");
    who.setAttribute("aria-label", "Peer reviewer's user id");
    who.size = 10;
    const act = document.createElement("span");
    if (item.qa_state === "open") {
      act.append(who, button("Assign", async () => {
        await api(`/qa/discrepancies/${item.id}/assign`, {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ to: who.value || "unassigned" }),
        });
        await showQa();
        $("announce").textContent = "Assigned for peer review";
      }));
    } else if (item.qa_state === "assigned") {
      act.append(button("Close", async () => {
        await api(`/qa/discrepancies/${item.id}/close`, {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ note: "reviewed" }),
        });
        await showQa();
        $("announce").textContent = "Closed";
      }));
    }
    const link = document.createElement("a");
    link.href = `#study/${item.study_uid}`; link.textContent = item.accession_number;
    const outcome = item.outcome === "ai_only" ? "AI only (possible false positive)" : "report only (AI miss)";
    return cells(tr, [link, item.pipeline, item.finding_type, outcome,
      item.ai_positive ? `found (${pct(item.max_confidence)})` : "nothing",
      `${item.report_label}: "${item.evidence}"`, `${item.qa_state}${item.assigned_to ? ` (${item.assigned_to})` : ""}`, act]);
  }));
}

function histogram(shares) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "histogram");
  svg.setAttribute("viewBox", "0 0 100 28");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `score histogram: ${shares.map((s) => (100 * s).toFixed(0)).join(", ")} % per tenth`);
  const top = Math.max(...shares, 0.01);
  shares.forEach((share, i) => {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const h = (26 * share) / top;
    Object.entries({ x: i * 10 + 1, y: 27 - h, width: 8, height: h }).forEach(([k, v]) => rect.setAttribute(k, v));
    svg.append(rect);
  });
  return svg;
}

async function showModels() {
  const response = await api("/models/statistics");
  if (await refused(response, "the model statistics")) return;
  message("");
  const stats = await response.json();
  $("model-stats").tBodies[0].replaceChildren(...stats.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.model = s.model_name;
    const alarms = document.createElement("span");
    alarms.textContent = s.alarms.length ? s.alarms.map((a) => `${a.kind} (${a.value})`).join(", ") : "none";
    if (s.alarms.length) alarms.className = "alarm";
    const baseline = document.createElement("span");
    baseline.className = "baseline";
    if (s.baseline_histogram.length) {
      const chart = histogram(s.baseline_histogram);
      chart.classList.add("baseline");
      chart.setAttribute("aria-label", `baseline (${s.baseline_source}) ${chart.getAttribute("aria-label")}`);
      baseline.append(chart, ` ${s.baseline_source}`);
    } else baseline.textContent = "-";
    return cells(tr, [s.model_name, s.model_version, s.site || "-", String(s.studies), pct(s.positive_rate),
      s.score_histogram.length ? histogram(s.score_histogram) : "-", baseline, `${pct(s.acceptance_rate)} of ${s.verdicts}`,
      pct(s.sensitivity), pct(s.ppv), s.psi == null ? "-" : s.psi.toFixed(3), alarms]);
  }));
}

// The gateway's own Prometheus histogram of the per-study latency, by priority: {priority: [[bound, studies]]}.
function studyBuckets(text) {
  const found = {};
  const line = /^gateway_study_seconds_bucket\{([^}]*)\}\s+([0-9.e+-]+)$/;
  for (const row of text.split("\n")) {
    const match = row.match(line);
    if (!match) continue;
    const labels = Object.fromEntries([...match[1].matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]));
    (found[labels.priority] ||= []).push([labels.le === "+Inf" ? Infinity : Number(labels.le), Number(match[2])]);
  }
  for (const list of Object.values(found)) list.sort((a, b) => a[0] - b[0]);
  return found;
}

function within(cumulative, share) {
  const total = cumulative[cumulative.length - 1][1];
  const bound = cumulative.find(([, count]) => count >= share * total);
  return bound && Number.isFinite(bound[0]) ? `${bound[0]} s` : "longer";
}

function sloRow(priority, cumulative) {
  const total = cumulative[cumulative.length - 1][1];
  const counts = cumulative.map(([, count], i) => count - (i ? cumulative[i - 1][1] : 0));
  const chart = histogram(counts.map((c) => c / Math.max(total, 1)));
  chart.setAttribute("viewBox", `0 0 ${counts.length * 10} 28`);
  chart.setAttribute("aria-label", `${priority}: ` + cumulative.map(([le], i) =>
    `${counts[i]} within ${Number.isFinite(le) ? `${le} s` : "longer"}`).join(", "));
  const tr = cells(document.createElement("tr"), [priority, String(total), chart, within(cumulative, 0.5), within(cumulative, 0.95)]);
  tr.dataset.priority = priority;
  return tr;
}

async function showOps() {
  const health = await (await fetch("/health")).json();
  $("ops-status").textContent =
    `Gateway ${health.status}${health.reasons && health.reasons.length ? `: ${health.reasons.join("; ")}` : ""}` +
    ` - Triton ${health.triton && health.triton.ready ? "ready" : "not ready"}`;
  const queues = Object.entries(health.queue || {}).map(([k, v]) => [`priority ${k}`, v])
    .concat(Object.entries(health.queue_by_pacs || {}).map(([k, v]) => [`PACS ${k}`, v]));
  $("queues").tBodies[0].replaceChildren(...queues.map(([k, v]) => cells(document.createElement("tr"), [k, String(v)])));
  const buckets = studyBuckets(await (await fetch("/metrics")).text());
  const order = ["STAT", "URGENT", "ROUTINE"];
  $("slo").tBodies[0].replaceChildren(...Object.entries(buckets)
    .filter(([, cumulative]) => cumulative[cumulative.length - 1][1] > 0)
    .sort(([a], [b]) => order.indexOf(a) - order.indexOf(b))
    .map(([priority, cumulative]) => sloRow(priority, cumulative)));
  const response = await api("/admin/dead-letters");
  if (!response.ok) { $("dead-letters").tBodies[0].replaceChildren(); return; }
  const letters = await response.json();
  $("dead-letters").tBodies[0].replaceChildren(...letters.map((job) => cells(document.createElement("tr"), [
    job.job_id || job.id || "-", job.destination || "-", job.study_uid || "-", job.reason || job.last_error || "-",
    button("Resend", async () => {
      const answer = await api("/admin/resend", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ jobs: [job.job_id || job.id] }),
      });
      if (!answer.ok) message(`Not resent: ${(await answer.json()).error}`); else showOps();
    }),
  ])));
}

const PAGES = { worklist: null, qa: showQa, models: showModels, ops: showOps };

function route() {
  const match = location.hash.match(/^#study\/([0-9.]+)$/);
  const page = (location.hash || "#worklist").slice(1);
  for (const id of ["worklist", "study", "qa", "models", "ops"]) show(id, false);
  document.querySelectorAll("nav a").forEach((a) => {
    if (a.getAttribute("href") === `#${page}`) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  });
  if (match) { showStudy(match[1]); return; }
  const name = page in PAGES ? page : "worklist";
  show(name, true);
  if (PAGES[name]) PAGES[name]();
}

async function showWorklist() {
  const response = await api("/studies?limit=200");
  if (response.status === 403) {
    const reason = (await response.json()).error;
    message(`Signed in, but this account may not see the worklist (${reason}). Ask for the radiologist, qa or read-only role.`);
    return;
  }
  if (!response.ok) { message(`The gateway answered ${response.status}.`); return; }
  for (const row of await response.json()) upsert(row);
  render();
  show("sign-in", false); show("worklist", true);
  window.addEventListener("hashchange", route);
  $("heatmap-toggle").addEventListener("change", (event) => {
    document.body.classList.toggle("hide-heatmap", !event.target.checked);
  });
  $("overlay-toggle").addEventListener("change", (event) => {
    document.body.classList.toggle("hide-overlay", !event.target.checked);
  });
  $("qa-state").addEventListener("change", showQa);
  route();
  listen();
  setInterval(render, 30000); // "arrived ... ago" stays true
}

async function main() {
  const config = await (await fetch("/ui/config.json")).json();
  const params = new URLSearchParams(location.search);
  if (config.oidc && params.has("code")) await finishOidc(config.oidc, params);
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    location.reload();
  });
  $("sign-out").addEventListener("click", () => signOut());
  if (config.oidc) { show("oidc-box", true); $("oidc").addEventListener("click", () => startOidc(config.oidc)); }
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) { show("sign-in", true); return; }
  const who = claims(token);
  $("who").textContent = who ? `signed in as ${who.sub} (${(who.roles || []).join(", ") || "no role"})` : "service token";
  show("who", true); show("sign-out", true);
  await showWorklist();
}

main().catch((error) => message(`The dashboard could not start: ${error.message}`));
