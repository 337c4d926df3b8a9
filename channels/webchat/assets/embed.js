// patchbay web chat embed: <script src="…/hooks/webchat/{hook_id}/embed.js" async></script>
// Adds a chat button to the page that opens the chat in a frame. No framework, no cookies.
(function () {
  var script = document.currentScript;
  if (!script) return;
  var base = script.src.replace(/\/embed\.js(\?.*)?$/, "");
  var open = false;
  var button = document.createElement("button");
  button.type = "button";
  button.textContent = "Chat";
  button.setAttribute("aria-expanded", "false");
  button.setAttribute("aria-controls", "patchbay-chat-frame");
  button.style.cssText = "position:fixed;right:1rem;bottom:1rem;z-index:2147483646;padding:.75rem 1.2rem;border:0;border-radius:2rem;background:#2457c5;color:#fff;font:600 16px system-ui,sans-serif;box-shadow:0 2px 8px rgba(0,0,0,.25);cursor:pointer";
  var frame = document.createElement("iframe");
  frame.id = "patchbay-chat-frame";
  frame.title = "Chat";
  frame.src = base + "/chat";
  frame.hidden = true;
  frame.style.cssText = "position:fixed;right:1rem;bottom:4.5rem;z-index:2147483647;width:min(380px,calc(100vw - 2rem));height:min(560px,calc(100vh - 6rem));border:0;border-radius:.75rem;box-shadow:0 4px 24px rgba(0,0,0,.3);background:#fff";
  button.addEventListener("click", function () {
    open = !open;
    frame.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    button.textContent = open ? "Close chat" : "Chat";
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && open) { button.click(); button.focus(); }
  });
  function add() { document.body.appendChild(frame); document.body.appendChild(button); }
  if (document.body) add(); else document.addEventListener("DOMContentLoaded", add);
})();
