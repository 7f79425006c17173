// The prompt page. Model output is only ever set with textContent: never parsed as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const root = $("app");
  const limits = JSON.parse(root.dataset.limits);
  const keyRequired = root.dataset.apiKeyRequired === "true";
  const form = $("form");
  const promptBox = $("prompt");
  const generateBtn = $("generate");
  const stopBtn = $("stop");
  const output = $("output");
  const outPrompt = $("out-prompt");
  const outCompletion = $("out-completion");
  const summary = $("summary");
  const errorBox = $("error");
  const backendPill = $("backend");
  const modelLabel = $("model");
  const keyField = $("apikey-field");
  const keyInput = $("apikey");
  const FIELDS = ["temperature", "top_k", "top_p", "max_new_tokens", "seed"];
  const KEY_STORE = "medgpt-api-key";

  let controller = null; // the running generation's AbortController

  // --- small helpers --------------------------------------------------------------------------

  function headers() {
    const h = { "Content-Type": "application/json", Accept: "application/json" };
    const key = keyInput.value.trim();
    if (key) h["X-API-Key"] = key;
    return h;
  }

  function setState(state) {
    output.dataset.state = state;
    const busy = state === "connecting" || state === "streaming";
    output.setAttribute("aria-busy", busy ? "true" : "false");
    generateBtn.disabled = busy;
    stopBtn.disabled = !busy;
    generateBtn.textContent = busy ? "Generating…" : "Generate";
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.dataset.kind = "";
    $("error-title").textContent = "";
    $("error-message").textContent = "";
    for (const name of ["prompt", ...FIELDS]) $(name).removeAttribute("aria-invalid");
  }

  const TITLES = {
    invalid: "Invalid input.",
    backend_down: "The model server is unavailable.",
    timeout: "The model server took too long.",
    busy: "The model server is busy.",
    too_large: "The request is too large.",
    auth: "API key needed.",
    interrupted: "The generation was interrupted.",
    network: "This page lost its connection.",
    error: "Something went wrong.",
  };

  function showError(kind, message, param) {
    errorBox.hidden = false;
    errorBox.dataset.kind = kind;
    $("error-title").textContent = TITLES[kind] || TITLES.error;
    $("error-message").textContent = " " + message;
    if (param && $(param)) {
      $(param).setAttribute("aria-invalid", "true");
      $(param).focus();
    }
    if (kind === "auth") {
      keyField.hidden = false;
      keyInput.focus();
    }
  }

  // An /api error response (or a Serve error event) → the right readable state.
  function kindOf(status, type) {
    if (status === 401 || type === "authentication_error") return "auth";
    if (status === 413) return "too_large";
    if (status === 504 || type === "backend_timeout") return "timeout";
    if (type === "server_overloaded") return "busy";
    if (status === 503 || status === 502 || type === "backend_unavailable") return "backend_down";
    if (status >= 400 && status < 500) return "invalid";
    return "error";
  }

  async function readError(resp) {
    let err = null;
    try {
      err = (await resp.json()).error;
    } catch (e) {
      err = null;
    }
    const message = (err && err.message) || `HTTP ${resp.status} from the page's server.`;
    return { kind: kindOf(resp.status, err && err.type), message, param: err && err.param };
  }

  // --- the form -------------------------------------------------------------------------------

  // Reads the controls; numbers are sent as typed so the server's range check answers (one
  // source of truth for the limits). Returns null (with an error shown) when a box is not a
  // number at all.
  function readForm() {
    const body = { prompt: promptBox.value };
    for (const name of FIELDS) {
      const el = $(name);
      const raw = el.value.trim();
      if (raw === "") {
        if (name === "seed") continue;
        if (el.validity && el.validity.badInput) {
          showError("invalid", `${name}: enter a number.`, name);
          return null;
        }
        showError("invalid", `${name}: enter a value.`, name);
        return null;
      }
      const value = Number(raw);
      if (!Number.isFinite(value)) {
        showError("invalid", `${name}: enter a number.`, name);
        return null;
      }
      body[name] = value;
    }
    return body;
  }

  function handleEvent(raw) {
    const data = raw
      .split("\n")
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (!data) return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (e) {
      return; // a partial event cut by a lost connection; the end of stream reports it
    }
    if (msg.error) {
      showError(kindOf(0, msg.error.type), msg.error.message, msg.error.param);
      setState("error");
      return "error";
    }
    if (msg.model && !msg.done) showModel(msg.model); // the version answering, before its text
    if (typeof msg.text === "string" && msg.text) {
      if (output.dataset.state === "connecting") setState("streaming");
      outCompletion.textContent += msg.text;
      summary.textContent = `Generating… ${outCompletion.textContent.length} characters so far`;
    }
    if (msg.done) {
      setState("done");
      summary.textContent = describe(msg);
      if (msg.model) showModel(msg.model);
      return "done";
    }
    return null;
  }

  function describe(s) {
    const parts = [`${s.completion_tokens} tokens in ${Number(s.seconds).toFixed(2)} s`];
    if (s.tokens_per_s) parts.push(`${s.tokens_per_s} tokens/s`);
    if (s.ttft_s != null) parts.push(`first token after ${Number(s.ttft_s).toFixed(2)} s`);
    const why = s.finish_reason === "length" ? "reached max tokens" : s.finish_reason;
    return `Done: ${parts.join(" · ")} (${why}).`;
  }

  async function generate() {
    if (controller) return;
    clearError();
    const body = readForm();
    if (!body) return;
    const mine = new AbortController();
    controller = mine;
    outPrompt.textContent = "";
    outCompletion.textContent = "";
    summary.textContent = "Waiting for the first token…";
    setState("connecting");
    let ending = null;
    try {
      const resp = await fetch("api/generate/stream", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(body),
        signal: mine.signal,
        cache: "no-store",
      });
      if (!resp.ok) {
        const err = await readError(resp);
        showError(err.kind, err.message, err.param);
        setState("error");
        summary.textContent = "";
        return;
      }
      if (keyInput.value.trim()) sessionStorage.setItem(KEY_STORE, keyInput.value.trim());
      outPrompt.textContent = body.prompt;
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          ending = handleEvent(event) || ending;
        }
      }
      if (!ending) {
        showError("interrupted", "The stream ended before the model finished; try again.");
        setState("error");
      }
    } catch (e) {
      if (mine.signal.aborted) {
        setState("stopped");
        summary.textContent =
          `Stopped after ${outCompletion.textContent.length} characters (the generation was cancelled).`;
      } else {
        showError("network", "The request to this page's server failed; is it still running?");
        setState("error");
      }
    } finally {
      controller = null;
      if (output.dataset.state === "connecting" || output.dataset.state === "streaming") {
        setState("error");
      }
    }
  }

  function stop() {
    if (controller) controller.abort(); // closing the stream cancels the generation upstream
  }

  // --- model identity and the server's state ---------------------------------------------------

  function fmt(x) {
    return typeof x === "number" ? x.toFixed(3) : "—";
  }

  function showModel(m) {
    const version = m.registry_version != null ? `registry version ${m.registry_version}` : "no registry version";
    const lineage = m.lineage || {};
    const run = lineage.training_run_id ? ` · run ${String(lineage.training_run_id).slice(0, 8)}` : "";
    const data = lineage.data_hash ? ` · data ${String(lineage.data_hash).slice(0, 8)}` : "";
    modelLabel.textContent = `Model: ${m.id} · ${version} · val loss ${fmt(m.val_loss)}` +
      (m.eval_loss != null ? ` · eval loss ${fmt(m.eval_loss)}` : "") + run + data;
    modelLabel.dataset.id = m.id || "";
    if (m.context_length) {
      const max = Math.min(limits.max_new_tokens[1], m.context_length - 1);
      $("max_new_tokens").max = String(max);
      $("max_new_tokens-help").textContent =
        `1–${max} · prompt + tokens ≤ ${m.context_length} (the model's context)`;
    }
  }

  async function loadModel() {
    try {
      const resp = await fetch("api/model", { headers: headers(), cache: "no-store" });
      if (resp.ok) {
        showModel(await resp.json());
      } else if (resp.status === 401) {
        keyField.hidden = false;
      }
    } catch (e) {
      /* the health check reports it */
    }
  }

  let lastBackend = null;
  async function checkHealth() {
    let state = "down";
    let text = "Model server: unreachable";
    try {
      const resp = await fetch("healthz", { cache: "no-store" });
      const h = await resp.json();
      if (h.backend && h.backend.status === "ok") {
        state = "ok";
        text = "Model server: ready";
        if (typeof h.backend.running === "number") text += ` (${h.backend.running} generating)`;
      } else if (h.backend && h.backend.status === "error") {
        state = "error";
        text = `Model server: error (${h.backend.message})`;
      }
    } catch (e) {
      text = "Page server: unreachable";
    }
    backendPill.dataset.state = state;
    backendPill.textContent = text;
    if (state === "ok" && lastBackend !== "ok") loadModel();
    lastBackend = state;
  }

  // --- wiring ---------------------------------------------------------------------------------

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  stopBtn.addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    } else if (e.key === "Escape" && controller) {
      stop();
    }
  });
  for (const btn of document.querySelectorAll(".example")) {
    btn.addEventListener("click", () => {
      promptBox.value = btn.dataset.prompt;
      promptBox.dispatchEvent(new Event("input"));
      promptBox.focus();
    });
  }
  const count = $("prompt-count");
  promptBox.addEventListener("input", () => {
    count.textContent = String(promptBox.value.length);
    count.classList.toggle("over", promptBox.value.length > limits.prompt_max_chars);
  });
  if (keyRequired) keyField.hidden = false;
  keyInput.value = sessionStorage.getItem(KEY_STORE) || "";

  setState("idle");
  checkHealth();
  setInterval(() => {
    if (!document.hidden) checkHealth();
  }, 15000);
})();
