// Draws an IP's metrics with uPlot from the JSON the page carries (#plot-data): CPU, memory
// against its limit, network and disk, with the machines that held the IP as shaded bands on
// the time axis. The charts stay reachable as window.consolePlots (the browser tests read
// their data from there), and #plots gets data-ready once they are drawn.
(function () {
  "use strict";
  var src = document.getElementById("plot-data");
  var box = document.getElementById("plots");
  if (!src || !box || !window.uPlot) return;
  var d = JSON.parse(src.textContent);
  var c = d.columns;
  var palette = ["#1f5fbf", "#d9480f", "#2b8a3e", "#862e9c"];
  var bands = ["rgba(31,95,191,0.07)", "rgba(217,72,15,0.08)", "rgba(43,138,62,0.08)"];

  function bytes(v) {
    if (v == null) return "";
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(v) >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (Math.round(v * 10) / 10) + " " + u[i];
  }

  // The holders of the IP: one band each, its machine id at the top.
  function owners() {
    return {
      hooks: {
        drawClear: function (u) {
          var ctx = u.ctx;
          d.owners.forEach(function (o, i) {
            var x0 = u.valToPos(o.from, "x", true), x1 = u.valToPos(o.until, "x", true);
            ctx.save();
            ctx.fillStyle = bands[i % bands.length];
            ctx.fillRect(x0, u.bbox.top, Math.max(1, x1 - x0), u.bbox.height);
            ctx.fillStyle = "#444";
            ctx.font = Math.round(11 * devicePixelRatio) + "px system-ui";
            ctx.fillText(o.machine_id.slice(0, 12), x0 + 4, u.bbox.top + 12 * devicePixelRatio);
            ctx.restore();
          });
        },
      },
    };
  }

  function chart(id, series, cols, axes) {
    var el = document.getElementById(id);
    var opts = {
      width: Math.max(280, el.clientWidth), height: 220,
      scales: { x: { time: true, range: [d.from, d.to] } },
      series: [{}].concat(series.map(function (s, i) {
        return Object.assign({ stroke: palette[i], width: 1.5, spanGaps: false }, s);
      })),
      axes: axes,
      plugins: [owners()],
    };
    return new uPlot(opts, [c.t].concat(cols), el);
  }

  var byteAxis = [{}, { values: function (u, vals) { return vals.map(bytes); }, size: 84 }];
  var plots = {
    cpu: chart("plot-cpu",
      [{ label: "CPU % of quota", scale: "%" }, { label: "cores", scale: "cores", dash: [4, 3] }],
      [c.cpu_percent, c.cpu_cores],
      [{}, { scale: "%", size: 60, values: function (u, v) { return v.map(function (x) { return x + "%"; }); } },
       { scale: "cores", side: 1, grid: { show: false } }]),
    mem: chart("plot-mem",
      [{ label: "working set", value: function (u, v) { return bytes(v); } },
       { label: "limit", dash: [6, 4], value: function (u, v) { return bytes(v); } }],
      [c.mem_working_set, c.mem_limit], byteAxis),
    net: chart("plot-net",
      [{ label: "rx/s", value: function (u, v) { return bytes(v); } },
       { label: "tx/s", value: function (u, v) { return bytes(v); } }],
      [c.net_rx, c.net_tx], byteAxis),
    disk: chart("plot-disk",
      [{ label: "read/s", value: function (u, v) { return bytes(v); } },
       { label: "write/s", value: function (u, v) { return bytes(v); } }],
      [c.disk_read, c.disk_write], byteAxis),
  };
  window.consolePlots = plots;
  window.addEventListener("resize", function () {
    Object.keys(plots).forEach(function (k) {
      var el = plots[k].root.parentNode;
      plots[k].setSize({ width: Math.max(280, el.clientWidth), height: 220 });
    });
  });
  box.setAttribute("data-ready", "true");
})();
