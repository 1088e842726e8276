// fd viz HTML view. Zoom (wheel) and pan (drag) move the SVG viewBox; clicking a node shows its
// params, its type's docstring and its place in the spec from the embedded JSON; hovering an
// edge shows its port type and shape. No network: everything this needs is in the page.
(function () {
  const data = JSON.parse(document.getElementById("fd-data").textContent);
  const host = document.getElementById("graph");
  const svg = host.querySelector("svg");
  const side = document.getElementById("side");
  const hover = document.getElementById("hover");
  const [x0, y0, w0, h0] = svg.getAttribute("viewBox").split(" ").map(Number);
  let vb = { x: x0, y: y0, w: w0, h: h0 };
  window.fdResetView = () => {       // the ELK layer changes the drawing's extent after loading
    const [x, y, w, h] = svg.getAttribute("viewBox").split(" ").map(Number);
    vb = { x, y, w, h };
  };
  svg.removeAttribute("width"); svg.removeAttribute("height");
  const apply = () => svg.setAttribute("viewBox", `${vb.x} ${vb.y} ${vb.w} ${vb.h}`);
  host.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const r = svg.getBoundingClientRect(), k = ev.deltaY > 0 ? 1.15 : 1 / 1.15;
    const mx = vb.x + (ev.clientX - r.left) / r.width * vb.w, my = vb.y + (ev.clientY - r.top) / r.height * vb.h;
    vb = { x: mx - (mx - vb.x) * k, y: my - (my - vb.y) * k, w: vb.w * k, h: vb.h * k };
    apply();
  }, { passive: false });
  let drag = null;
  host.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, vb: { ...vb }, moved: false }; });
  window.addEventListener("mouseup", () => { drag = null; host.classList.remove("dragging"); });
  window.addEventListener("mousemove", (ev) => {
    if (drag) {
      const r = svg.getBoundingClientRect(), s = Math.max(vb.w / r.width, vb.h / r.height);
      if (Math.abs(ev.clientX - drag.x) + Math.abs(ev.clientY - drag.y) > 3) { drag.moved = true; host.classList.add("dragging"); }
      vb = { ...drag.vb, x: drag.vb.x - (ev.clientX - drag.x) * s, y: drag.vb.y - (ev.clientY - drag.y) * s };
      apply();
    }
    hover.style.left = ev.clientX + 14 + "px"; hover.style.top = ev.clientY + 14 + "px";
  });
  const esc = (s) => String(s).replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" }[c]));
  function show(name) {
    const n = data.nodes[name];
    svg.querySelectorAll("g.node.selected").forEach((g) => g.classList.remove("selected"));
    const g = svg.querySelector(`g.node[data-node="${CSS.escape(name)}"]`);
    if (g) g.classList.add("selected");
    side.innerHTML = `<h2 id="side-name">${esc(name)}</h2><div>${esc(n.type_name)}</div>` +
      `<div class="where" id="side-where">${esc(n.where)}</div>` +
      (n.facts.length ? `<h3>plan</h3><pre id="side-facts">${esc(n.facts.join("\n"))}</pre>` : "") +
      `<h3>params</h3><pre id="side-params">${esc(JSON.stringify(n.params, null, 2))}</pre>` +
      (n.doc ? `<h3>type</h3><pre id="side-doc">${esc(n.doc)}</pre>` : "");
  }
  svg.querySelectorAll("g.node").forEach((g) => g.addEventListener("click", () => { if (!drag || !drag.moved) show(g.dataset.node); }));
  svg.querySelectorAll("g.edge").forEach((g) => {
    const e = data.edges[Number(g.dataset.edge)];
    const t = g.querySelector("title"); if (t) t.remove();          // our tooltip replaces the native one
    g.addEventListener("mouseenter", () => {
      hover.textContent = `${e.src}.${e.src_port} → ${e.dst}.${e.dst_port}\ntype: ${e.type}` + (e.doc ? `\n${e.doc}` : "");
      hover.style.display = "block"; g.classList.add("hot");
    });
    g.addEventListener("mouseleave", () => { hover.style.display = "none"; g.classList.remove("hot"); });
  });
})();
