// Peers and settings (admin, read-only): the configured peers, which receive results,
// and the effective settings with secrets masked.
import * as api from "../api.js";
import { h, table, errorText } from "../ui.js";

export default function peers(root) {
  const box = h("div", { id: "peers" }, "Loading…");
  const settingsBox = h("div", { id: "settings" }, "Loading…");
  root.append(
    h("h1", {}, "Peers and settings"),
    h("p", { class: "muted" }, "Read-only: set in the node's configuration (config/lungnode.toml or LUNGNODE_* variables)."),
    box,
    h("h2", {}, "Effective settings"),
    settingsBox,
  );
  api
    .get("/peers")
    .then((answer) => {
      const rows = answer.items.map((p) =>
        h("tr", { "data-peer": p.name },
          h("td", {}, p.name), h("td", {}, p.ae_title), h("td", {}, `${p.host}:${p.port}`),
          h("td", {}, p.result_destination ? "yes" : "no"), h("td", {}, p.storage_commitment ? "yes" : "no")),
      );
      const web = answer.dicomweb_peers.map((text) => h("tr", {}, h("td", {}, text)));
      const destinations = answer.result_destinations.length ? answer.result_destinations.join(", ") : "the peer that sent each series";
      box.replaceChildren(
        table("DICOM peers", ["name", "AE title", "address", "receives results", "storage commitment"], rows, { id: "peers-table" }),
        table("DICOMweb destinations", ["destination (secrets masked)"], web, { id: "dicomweb-table" }),
        h("p", {}, `Results go to: ${destinations}.`),
      );
    })
    .catch((error) => box.replaceChildren(h("p", { class: "error" }, errorText(error))));
  api
    .get("/settings")
    .then((answer) => {
      const rows = Object.entries(answer.settings)
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([name, value]) => h("tr", { "data-setting": name }, h("td", {}, name), h("td", {}, value)));
      settingsBox.replaceChildren(table("Settings (secrets masked)", ["setting", "value"], rows, { id: "settings-table" }));
    })
    .catch((error) => settingsBox.replaceChildren(h("p", { class: "error" }, errorText(error))));
}
