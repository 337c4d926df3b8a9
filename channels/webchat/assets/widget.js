// patchbay web chat widget. No framework. Speaks Botkit's web-client frames with patchbay's
// signed user token and watermark; replays what it missed when the socket comes back.
(function () {
  "use strict";
  var base = document.body.dataset.base;
  var storeKey = "patchbay-webchat:" + base;
  var log = document.getElementById("log");
  var statusEl = document.getElementById("status");
  var typingEl = document.getElementById("typing");
  var quick = document.getElementById("quick");
  var form = document.getElementById("form");
  var text = document.getElementById("text");
  var sendBtn = document.getElementById("send");
  var saved = load();
  var ws = null;
  var attempt = 0;
  var timer = null;
  var typingTimer = null;
  var seen = {}; // seq -> true: nothing is shown twice

  function load() {
    try { return JSON.parse(localStorage.getItem(storeKey)) || {}; } catch (e) { return {}; }
  }
  function save() {
    try { localStorage.setItem(storeKey, JSON.stringify(saved)); } catch (e) { /* private mode */ }
  }
  function setState(state, message) {
    document.body.dataset.state = state;
    statusEl.textContent = message;
    var usable = state === "connected";
    sendBtn.disabled = !usable;
  }

  // ---- rendering ----
  function linkify(parent, s) {
    var re = /\bhttps?:\/\/[^\s<>"']+/g, last = 0, m;
    while ((m = re.exec(s))) {
      var url = m[0].replace(/[.,;:!?)]+$/, "");
      parent.appendChild(document.createTextNode(s.slice(last, m.index)));
      var a = document.createElement("a");
      a.href = url; a.textContent = url; a.target = "_blank"; a.rel = "noopener noreferrer";
      parent.appendChild(a);
      last = m.index + url.length;
      re.lastIndex = last;
    }
    parent.appendChild(document.createTextNode(s.slice(last)));
  }
  function add(kind, msg) {
    var li = document.createElement("li");
    li.className = "msg " + kind;
    if (msg.seq) li.dataset.seq = msg.seq;
    linkify(li, msg.text || "");
    (msg.files || []).forEach(function (f) {
      if (!/^https?:\/\//.test(f.url)) return;
      if (f.image) {
        var img = document.createElement("img");
        img.src = f.url; img.alt = f.name || "image"; img.loading = "lazy";
        li.appendChild(img);
      } else {
        var a = document.createElement("a");
        a.className = "file"; a.href = f.url; a.textContent = f.name || f.url;
        a.target = "_blank"; a.rel = "noopener noreferrer";
        li.appendChild(a);
      }
    });
    log.appendChild(li);
    log.scrollTop = log.scrollHeight;
    return li;
  }
  function note(s) { add("note", { text: s }); }
  function showQuickReplies(list) {
    quick.textContent = "";
    (list || []).forEach(function (q) {
      var b = document.createElement("button");
      b.type = "button";
      b.textContent = q.title;
      b.addEventListener("click", function () { send(q.payload, q.title); });
      quick.appendChild(b);
    });
  }
  function showTyping(on) {
    typingEl.hidden = !on;
    clearTimeout(typingTimer);
    if (on) typingTimer = setTimeout(function () { typingEl.hidden = true; }, 10000);
  }
  function bot(msg) {
    if (msg.seq) {
      if (seen[msg.seq]) return;
      seen[msg.seq] = true;
      if (!saved.watermark || msg.seq > saved.watermark) { saved.watermark = msg.seq; save(); }
    }
    showTyping(false);
    add("bot", msg);
    showQuickReplies(msg.quick_replies);
  }

  // ---- session and history ----
  function post(path, body) {
    return fetch(base + path, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body)
    }).then(function (r) { return r.json().then(function (j) { return { status: r.status, body: j }; }); });
  }
  function session() {
    return post("/session", saved.token ? { token: saved.token } : {}).then(function (r) {
      if (r.status === 401 && saved.token) { saved = {}; save(); return session(); }
      if (r.status === 503) throw { off: true };
      if (r.status !== 200) throw new Error(r.body.error ? r.body.error.message : "status " + r.status);
      if (r.body.new) { saved = {}; }
      saved.token = r.body.token; save();
      return r.body;
    });
  }
  function history() {
    return fetch(base + "/history?limit=50", { headers: { authorization: "Bearer " + saved.token } })
      .then(function (r) { return r.ok ? r.json() : { messages: [] }; })
      .then(function (h) {
        h.messages.forEach(function (m) {
          if (m.type === "message_received") { seen[m.seq] = true; add("user", m); }
          else if (m.type === "message") bot(m);
        });
        if (h.messages.length) {
          var top = h.messages[h.messages.length - 1].seq;
          if (!saved.watermark || top > saved.watermark) { saved.watermark = top; save(); }
        }
      });
  }

  // ---- socket ----
  function connect() {
    clearTimeout(timer);
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + base + "/ws";
    ws = new WebSocket(url);
    ws.onopen = function () {
      ws.send(JSON.stringify({
        type: saved.token ? "welcome_back" : "hello", token: saved.token, watermark: saved.watermark || 0,
        channel: "websocket"
      }));
    };
    ws.onmessage = function (e) {
      var m;
      try { m = JSON.parse(e.data); } catch (err) { return; }
      switch (m.type) {
        case "hello": case "welcome_back": case "reconnect":
          saved.token = m.token; save();
          attempt = 0;
          setState("connected", "Connected");
          break;
        case "message": bot(m); break;
        case "typing": showTyping(true); break;
        case "received": if (m.seq) seen[m.seq] = true; break;
        case "error": note("Not sent: " + m.message); break;
        case "disconnect":
          ws.onclose = null;
          if (m.reason === "collision") {
            setState("collision", "Open in another window");
            note("This chat was opened in another window. Press Send to continue here.");
            sendBtn.disabled = false;
          } else {
            setState("off", "Chat switched off");
            retry(10000);
          }
          break;
      }
    };
    ws.onclose = function () {
      if (document.body.dataset.state !== "off") setState("reconnecting", "Reconnecting…");
      retry(Math.min(15000, 500 * Math.pow(2, attempt++)));
    };
  }
  function retry(ms) {
    clearTimeout(timer);
    timer = setTimeout(start, ms);
  }
  function start() {
    session().then(function () {
      connect();
    }, function (e) {
      if (e && e.off) { setState("off", "Chat switched off"); retry(10000); }
      else { setState("reconnecting", "Reconnecting…"); retry(Math.min(15000, 500 * Math.pow(2, attempt++))); }
    });
  }

  function send(s, shown) {
    s = (s || "").trim();
    if (document.body.dataset.state === "collision") { start(); return; }
    if (!s || !ws || ws.readyState !== 1) return;
    var id = "w" + Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
    ws.send(JSON.stringify({ type: "message", text: s, id: id, channel: "websocket" }));
    add("user", { text: shown || s });
    showQuickReplies([]);
  }
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    send(text.value);
    text.value = "";
    text.focus();
  });
  text.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
  });

  setState("connecting", "Connecting…");
  session().then(history).then(connect, function (e) {
    if (e && e.off) { setState("off", "Chat switched off"); retry(10000); }
    else retry(1000);
  });
  text.focus();
})();
