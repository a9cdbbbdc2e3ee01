// The console's small shared behaviour: arrow keys along a list, confirmations, and polling
// that waits while the user is in a part of the page.
(function () {
  "use strict";
  // htmx polls a region only while no control in it has focus (a refresh would drop it).
  window.consoleIdle = function (id) {
    var el = document.getElementById(id);
    return !(el && el.contains(document.activeElement) && document.activeElement !== document.body);
  };
  document.addEventListener("keydown", function (ev) {
    if (ev.key !== "ArrowDown" && ev.key !== "ArrowUp") return;
    var table = ev.target.closest && ev.target.closest("table[data-keynav]");
    if (!table) return;
    var links = Array.prototype.slice.call(table.querySelectorAll("tbody a.rowlink"));
    var i = links.indexOf(ev.target);
    if (i < 0) return;
    var next = links[ev.key === "ArrowDown" ? i + 1 : i - 1];
    if (next) { next.focus(); ev.preventDefault(); }
  });
  document.addEventListener("submit", function (ev) {
    var btn = ev.submitter;
    var msg = btn && btn.getAttribute("data-confirm");
    if (msg && !window.confirm(msg)) ev.preventDefault();
  });
})();
