// fd viz HTML view, ELK layer: re-lays the page's graph with elkjs (ELK layered, ports fixed where
// fd draws them, orthogonal wires) and moves the server-drawn boxes, wires, labels and frames to
// ELK's positions. If ELK is missing or fails, the page keeps the Python layout it was written with.
// window.fdLayout exposes the final geometry (boxes, wire polylines, label boxes) for tests.
(function () {
  const data = JSON.parse(document.getElementById("fd-data").textContent);
  const svg = document.querySelector("#graph svg");
  const done = (how) => { document.body.dataset.layout = how; };
  if (typeof ELK === "undefined" || !data.elk) { done("python"); return; }
  new ELK().layout(data.elk).then((res) => {
    const boxes = {}, edges = [], labels = [];
    for (const n of res.children) {
      const old = data.boxes[n.id];
      const g = svg.querySelector(`g.node[data-node="${CSS.escape(n.id)}"]`);
      g.setAttribute("transform", `translate(${n.x - old.x},${n.y - old.y})`);
      boxes[n.id] = { x: n.x, y: n.y, w: n.width, h: n.height };
    }
    for (const e of res.edges) {
      const i = Number(e.id.slice(1));
      const pts = [];
      for (const s of e.sections || []) {
        pts.push([s.startPoint.x, s.startPoint.y]);
        for (const b of s.bendPoints || []) pts.push([b.x, b.y]);
        pts.push([s.endPoint.x, s.endPoint.y]);
      }
      const d = pts.map((p, k) => (k ? "L" : "M") + p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" ");
      svg.querySelectorAll(`g.edge[data-edge="${i}"] path`).forEach((p) => p.setAttribute("d", d));
      const lab = (e.labels || [])[0], t = svg.querySelectorAll("text.edge-label")[i];
      if (lab && t) {
        t.setAttribute("x", (lab.x + lab.width).toFixed(1));
        t.setAttribute("y", (lab.y + lab.height - 2).toFixed(1));
        labels.push({ edge: i, x: lab.x, y: lab.y, w: lab.width, h: lab.height });
      }
      edges.push({ edge: i, points: pts });
    }
    svg.querySelectorAll("g.frame").forEach((f) => {
      const ms = JSON.parse(f.dataset.members || "[]").map((m) => boxes[m]).filter(Boolean);
      if (!ms.length) return;
      const x = Math.min(...ms.map((b) => b.x)) - 7, y = Math.min(...ms.map((b) => b.y)) - 7;
      const r = f.querySelector("rect"), t = f.querySelector("text");
      r.setAttribute("x", x); r.setAttribute("y", y);
      r.setAttribute("width", Math.max(...ms.map((b) => b.x + b.w)) - x + 7);
      r.setAttribute("height", Math.max(...ms.map((b) => b.y + b.h)) - y + 7);
      t.setAttribute("x", x + 4); t.setAttribute("y", y - 4);
    });
    const legend = svg.querySelector("g.legend"), lb = legend.getBBox();
    legend.setAttribute("transform", `translate(24,${res.height + 20})`);
    const w = Math.max(res.width, lb.width + 48), h = res.height + lb.height + 40;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    window.fdResetView && window.fdResetView();
    window.fdLayout = { boxes, edges, labels };
    done("elk");
  }).catch((err) => { console.warn("ELK layout failed, keeping the Python layout:", err); done("python"); });
})();
