// Predict: upload a PNG, JPEG or DICOM image (or up to 10 as a batch) and see the
// verdict and heatmap of each.
import * as api from "../api.js";
import { h, percent, errorText } from "../ui.js";

const MAX_FILES = 10;

export default function predict(root) {
  let alive = true;
  const urls = [];
  const input = h("input", { type: "file", id: "predict-files", name: "file", multiple: true, accept: ".png,.jpg,.jpeg,.dcm,image/png,image/jpeg,application/dicom" });
  const submit = h("button", { type: "submit", id: "predict-submit" }, "Predict");
  const out = h("div", { id: "predict-results", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "inline", id: "predict-form" },
    h("label", {}, `Image(s): PNG, JPEG or DICOM, up to ${MAX_FILES}`, input),
    submit,
  );
  root.append(
    h("h1", {}, "Predict"),
    h("p", { class: "muted" }, "A PNG or JPEG is read as a lung-window picture; DICOM must be a CT image. Each result is kept in the history."),
    form,
    out,
  );

  async function card(result, name) {
    const figure = h("figure", {});
    const box = h(
      "section",
      { class: "card", "data-prediction": result.prediction_id },
      h("h2", {}, name),
      h("p", { class: "verdict" }, result.prediction, result.confidence !== null ? ` (${percent(result.confidence)})` : ""),
      h("p", {}, Object.entries(result.confidence_scores).map(([label, value]) => `${label}: ${percent(value)}`).join(", ")),
      result.model.synthetic ? h("p", { class: "synthetic" }, "Model trained on synthetic phantoms: a demonstration, not a finding.") : null,
      figure,
      h("p", {}, h("a", { href: `#/results/${result.prediction_id}` }, `Open result #${result.prediction_id}`)),
    );
    if (result.heatmap_url) {
      try {
        const url = await api.blobUrl(result.heatmap_url);
        if (!alive) return URL.revokeObjectURL(url);
        urls.push(url);
        figure.append(h("img", { src: url, alt: `Heatmap of ${name}`, class: "heatmap" }));
      } catch (error) {
        figure.append(h("p", { class: "error" }, errorText(error)));
      }
    }
    return box;
  }

  function failure(name, error) {
    return h("section", { class: "card" }, h("h2", {}, name), h("p", { class: "error" }, error.message || error.code || String(error)));
  }

  async function poll(url) {
    for (;;) {
      const batch = await api.get(url);
      if (!["pending", "running"].includes(batch.status) || !alive) return batch;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const files = [...input.files];
    if (!files.length || files.length > MAX_FILES) {
      out.replaceChildren(h("p", { class: "error", role: "alert" }, `Choose 1 to ${MAX_FILES} files.`));
      return;
    }
    submit.disabled = true;
    out.replaceChildren(h("p", {}, "Predicting…"));
    const body = new FormData();
    files.forEach((file) => body.append("file", file));
    try {
      if (files.length === 1) {
        const result = await api.post("/predict", body);
        out.replaceChildren(h("div", { class: "grid" }, await card(result, files[0].name)));
      } else {
        let batch = await api.post("/batch-predict", body);
        if (["pending", "running"].includes(batch.status)) batch = await poll(batch.poll_url);
        const cards = await Promise.all(
          batch.items.map((item) => (item.result ? card(item.result, files[item.index].name) : failure(files[item.index].name, item.error || { message: item.state }))),
        );
        out.replaceChildren(h("p", {}, `Batch ${batch.batch_id}: ${batch.status}`), h("div", { class: "grid" }, cards));
      }
    } catch (error) {
      out.replaceChildren(h("p", { class: "error", role: "alert" }, errorText(error)));
    } finally {
      submit.disabled = false;
    }
  });
  return () => {
    alive = false;
    urls.forEach((url) => URL.revokeObjectURL(url));
  };
}
