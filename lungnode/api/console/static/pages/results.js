// Results: the history with filters and paging, a heatmap thumbnail per row.
import * as api from "../api.js";
import { h, table, when, percent, errorText } from "../ui.js";

const PER_PAGE = 20;

export default function results(root) {
  let alive = true;
  let page = 1;
  const urls = [];
  const classes = h("datalist", { id: "class-options" });
  const form = h(
    "form",
    { class: "inline", id: "results-filter", role: "search", "aria-label": "Filter results" },
    h("label", {}, "Class", h("input", { name: "class", id: "filter-class", list: "class-options" })),
    classes,
    h(
      "label",
      {},
      "Source",
      h("select", { name: "source", id: "filter-source" }, h("option", { value: "" }, "any"), h("option", { value: "dicom" }, "DICOM"), h("option", { value: "upload" }, "upload")),
    ),
    h("label", {}, "From (UTC)", h("input", { name: "date_from", id: "filter-from", type: "date" })),
    h("label", {}, "To (UTC, inclusive)", h("input", { name: "date_to", id: "filter-to", type: "date" })),
    h("label", {}, "Study Instance UID", h("input", { name: "study_uid", id: "filter-study", size: 30 })),
    h("button", { type: "submit" }, "Filter"),
    h("button", { type: "reset", class: "secondary" }, "Clear"),
  );
  const list = h("div", { id: "results-list" }, "Loading…");
  const previous = h("button", { type: "button", class: "secondary", id: "page-previous" }, "Previous page");
  const next = h("button", { type: "button", class: "secondary", id: "page-next" }, "Next page");
  const position = h("span", { id: "page-position" });
  root.append(h("h1", {}, "Results"), form, list, h("div", { class: "pager" }, previous, position, next));

  function query() {
    const data = new FormData(form);
    const params = new URLSearchParams({ page, per_page: PER_PAGE });
    for (const name of ["class", "source", "study_uid"]) {
      const value = String(data.get(name) || "").trim();
      if (value) params.set(name, value);
    }
    if (data.get("date_from")) params.set("date_from", `${data.get("date_from")}T00:00:00Z`);
    if (data.get("date_to")) {
      const end = new Date(`${data.get("date_to")}T00:00:00Z`);
      end.setUTCDate(end.getUTCDate() + 1); // the API's date_to is exclusive
      params.set("date_to", end.toISOString());
    }
    return params;
  }

  async function thumbnail(item, cell) {
    if (!item.heatmap_url) return;
    try {
      const url = await api.blobUrl(item.heatmap_url);
      if (!alive) return URL.revokeObjectURL(url);
      urls.push(url);
      cell.replaceChildren(h("img", { class: "thumb", src: url, alt: `Heatmap of result ${item.id}` }));
    } catch {
      cell.textContent = "–";
    }
  }

  async function load() {
    let answer;
    try {
      answer = await api.get(`/history?${query()}`);
    } catch (error) {
      list.replaceChildren(h("p", { class: "error" }, errorText(error)));
      return;
    }
    if (!alive) return;
    urls.splice(0).forEach((url) => URL.revokeObjectURL(url));
    const rows = answer.items.map((item) => {
      const cell = h("td", {}, "…");
      thumbnail(item, cell);
      return h(
        "tr",
        { "data-result": item.id, "data-study": item.study_instance_uid || "" },
        cell,
        h("td", {}, h("a", { href: `#/results/${item.id}` }, `#${item.id}`)),
        h("td", {}, item.prediction || "not analysed"),
        h("td", {}, percent(item.confidence)),
        h("td", {}, item.source),
        h("td", { class: "uid" }, item.study_instance_uid || "–"),
        h("td", {}, `${item.model.name} ${item.model.version}`),
        h("td", {}, when(item.timestamp)),
      );
    });
    list.replaceChildren(table(`${answer.total} result(s)`, ["heatmap", "result", "verdict", "confidence", "source", "study", "model", "time"], rows, { id: "results-table" }));
    position.textContent = `Page ${answer.page} of ${Math.max(answer.pages, 1)}`;
    previous.disabled = answer.page <= 1;
    next.disabled = answer.page >= answer.pages;
  }

  api.get("/stats").then((stats) => {
    const names = new Set([...Object.keys(stats.class_distribution), "Indeterminate"]);
    classes.replaceChildren(...[...names].map((name) => h("option", { value: name })));
  }).catch(() => {});
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    page = 1;
    load();
  });
  form.addEventListener("reset", () => {
    page = 1;
    setTimeout(load); // after the form has cleared its fields
  });
  previous.addEventListener("click", () => { page -= 1; load(); });
  next.addEventListener("click", () => { page += 1; load(); });
  load();
  return () => {
    alive = false;
    urls.forEach((url) => URL.revokeObjectURL(url));
  };
}
