// Small DOM helpers. Text always goes in through textContent, never as HTML.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function table(caption, headers, rows, attributes = {}) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      attributes,
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, headers.map((text) => h("th", { scope: "col" }, text)))),
      h(
        "tbody",
        {},
        rows.length
          ? rows
          : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "None.")),
      ),
    ),
  );
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

export function percent(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)} %`;
}

export function say(message, isError = false) {
  const status = document.getElementById("status");
  const line = h("p", { class: isError ? "error-line" : "" }, message);
  status.replaceChildren(line);
  setTimeout(() => line.remove(), 6000);
}

export function errorText(error) {
  return error && error.message ? error.message : String(error);
}

export function stateClass(state) {
  if (["done", "committed", "complete", "ok"].includes(state)) return "ok";
  if (["dead", "failed"].includes(state)) return "bad";
  return "warn";
}

// SOP classes of the node's result objects (PS3.4 B.5), by name.
const SOP_CLASSES = {
  "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture (heatmap)",
  "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF (report)",
  "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
  "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
  "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
  "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
};

export function sopClassName(uid) {
  return SOP_CLASSES[uid] || uid;
}
