// Replays a session's asciicast (fetched from the console, same origin) with asciinema-player.
(function () {
  "use strict";
  var el = document.getElementById("player");
  if (!el || !window.AsciinemaPlayer) return;
  window.consolePlayer = AsciinemaPlayer.create(el.getAttribute("data-src"), el, {
    fit: "width", autoPlay: true, speed: 2, idleTimeLimit: 1, preload: true,
  });
})();
