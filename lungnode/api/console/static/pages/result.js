// One result: scores as a bar chart, every key-slice heatmap, the model, the PDF,
// and (for admins) where each result object was delivered.
import * as api from "../api.js";
import { chart } from "../charts.js";
import { h, table, when, percent, errorText, stateClass, sopClassName, say } from "../ui.js";

export default function result(root, { user, params }) {
  const id = Number(params[0]);
  let alive = true;
  let scores = null;
  const urls = [];
  root.append(h("p", {}, "Loading…"));

  function modelSection(model) {
    const notice =
      model.synthetic === true
        ? "This model was trained on synthetic CT phantoms. Its results demonstrate the node; they are not findings."
        : model.synthetic === null || model.synthetic === undefined
          ? "Model identity not recorded: this result may come from a model trained on synthetic phantoms."
          : null;
    return h(
      "section",
      { "aria-labelledby": "h-model", id: "model" },
      h("h2", { id: "h-model" }, "Model"),
      h("p", {}, `${model.name} ${model.version}`, h("br"), h("span", { class: "uid" }, `sha256 ${model.sha256 || "–"}`)),
      model.trained_on ? h("p", {}, `Trained on: ${model.trained_on}`) : null,
      model.intended_use ? h("p", {}, `Intended use: ${model.intended_use}`) : null,
      notice ? h("p", { class: "synthetic", id: "synthetic-notice" }, notice) : null,
    );
  }

  async function heatmap(url, index, figure) {
    try {
      const objectUrl = await api.blobUrl(url);
      if (!alive) return URL.revokeObjectURL(objectUrl);
      urls.push(objectUrl);
      figure.prepend(h("img", { src: objectUrl, alt: `Heatmap ${index + 1} of result ${id}`, class: "heatmap" }));
    } catch (error) {
      figure.prepend(h("p", { class: "error" }, errorText(error)));
    }
  }

  async function downloadReport(event) {
    const link = event.currentTarget;
    link.disabled = true;
    try {
      const response = await api.request(link.dataset.url);
      link.dataset.status = String(response.status);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const url = URL.createObjectURL(await response.blob());
      urls.push(url);
      const anchor = h("a", { href: url, download: `lungnode-result-${id}.pdf`, hidden: true });
      document.body.append(anchor);
      anchor.click();
      anchor.remove();
      say("Report downloaded.");
    } catch (error) {
      say(`Report: ${errorText(error)}`, true);
    } finally {
      link.disabled = false;
    }
  }

  async function deliveries(detail, box) {
    try {
      const answer = await api.get(`/deliveries?job_id=${detail.job_id}&per_page=100`);
      const rows = answer.items.map((d) =>
        h(
          "tr",
          { "data-delivery": d.id },
          h("td", {}, sopClassName(d.sop_class_uid)),
          h("td", {}, d.destination),
          h("td", { class: stateClass(d.state) }, d.state),
          h("td", {}, d.attempts),
          h("td", {}, d.last_status === null ? "–" : `0x${d.last_status.toString(16).toUpperCase().padStart(4, "0")}`),
          h("td", {}, d.last_error || ""),
          h("td", {}, when(d.updated_at)),
        ),
      );
      box.replaceChildren(table("Result objects sent back", ["object", "destination", "state", "attempts", "last status", "last error", "updated"], rows, { id: "result-deliveries" }));
    } catch (error) {
      box.replaceChildren(h("p", { class: "error" }, errorText(error)));
    }
  }

  api
    .get(`/history/${id}`)
    .then((detail) => {
      if (!alive) return;
      const canvas = h("canvas", { id: "scores-chart", role: "img", "aria-label": "Class scores" });
      const entries = Object.entries(detail.confidence_scores || {});
      const figures = detail.heatmap_urls.map((url, i) => {
        const figure = h("figure", {}, h("figcaption", {}, i === 0 ? "Key slice 1 (most suspicious)" : `Key slice ${i + 1}`));
        heatmap(url, i, figure);
        return figure;
      });
      const deliveryBox = h("div", { id: "deliveries-box" }, "Loading…");
      root.replaceChildren(
        h("h1", {}, `Result #${detail.id}`),
        h("p", { class: "verdict", id: "verdict" }, detail.prediction || "Not analysed", detail.confidence !== null ? ` (${percent(detail.confidence)})` : ""),
        h(
          "dl",
          { class: "counts" },
          h("div", {}, h("dt", {}, "source"), h("dd", {}, detail.source)),
          h("div", {}, h("dt", {}, "time"), h("dd", {}, when(detail.timestamp))),
          h("div", {}, h("dt", {}, "processing"), h("dd", {}, detail.processing_time ? `${detail.processing_time.toFixed(2)} s` : "–")),
          detail.analysis_version ? h("div", {}, h("dt", {}, "analysis"), h("dd", {}, `v${detail.analysis_version}${detail.current ? "" : " (superseded)"}`)) : null,
        ),
        detail.study_instance_uid ? h("p", { class: "uid" }, `Study ${detail.study_instance_uid}`, h("br"), `Series ${detail.series_instance_uid}`) : null,
        h("p", {}, h("button", { type: "button", id: "report-link", "data-url": detail.report_url, onclick: downloadReport }, "Download the PDF report")),
        h("div", { class: "grid" },
          h("section", { class: "card", "aria-labelledby": "h-scores" }, h("h2", { id: "h-scores" }, "Class scores"), h("div", { class: "chart" }, canvas),
            h("p", { class: "muted" }, entries.map(([label, value]) => `${label}: ${percent(value)}`).join(", "))),
          h("section", { class: "card" }, modelSection(detail.model)),
        ),
        h("section", { "aria-labelledby": "h-heatmaps" }, h("h2", { id: "h-heatmaps" }, "Key-slice heatmaps"), h("div", { class: "heatmaps", id: "heatmaps" }, figures.length ? figures : h("p", { class: "muted" }, "No heatmap."))),
        detail.job_id && user.role === "admin"
          ? h("section", { "aria-labelledby": "h-deliveries" }, h("h2", { id: "h-deliveries" }, "Deliveries"), deliveryBox)
          : null,
      );
      if (entries.length) {
        scores = chart(canvas, "bar", entries.map(([label]) => label), [{ label: "score", data: entries.map(([, value]) => value) }], {
          indexAxis: "y",
          scales: { x: { min: 0, max: 1 } },
          plugins: { legend: { display: false } },
        });
      }
      if (detail.job_id && user.role === "admin") deliveries(detail, deliveryBox);
    })
    .catch((error) => {
      if (alive) root.replaceChildren(h("h1", {}, `Result #${id}`), h("p", { class: "error" }, errorText(error)));
    });

  return () => {
    alive = false;
    if (scores) scores.destroy();
    urls.forEach((url) => URL.revokeObjectURL(url));
  };
}
