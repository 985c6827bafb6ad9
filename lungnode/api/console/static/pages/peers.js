// Peers (admin, read-only): the configured DICOM peers and which receive results.
import * as api from "../api.js";
import { h, table, errorText } from "../ui.js";

export default function peers(root) {
  const box = h("div", { id: "peers" }, "Loading…");
  root.append(
    h("h1", {}, "Peers"),
    h("p", { class: "muted" }, "Read-only: peers are set in the node's configuration (peers, result_destinations, commit_peers)."),
    box,
  );
  api
    .get("/peers")
    .then((answer) => {
      const rows = answer.items.map((p) =>
        h("tr", { "data-peer": p.name },
          h("td", {}, p.name), h("td", {}, p.ae_title), h("td", {}, `${p.host}:${p.port}`),
          h("td", {}, p.result_destination ? "yes" : "no"), h("td", {}, p.storage_commitment ? "yes" : "no")),
      );
      const destinations = answer.result_destinations.length ? answer.result_destinations.join(", ") : "the peer that sent each series";
      box.replaceChildren(
        table("DICOM peers", ["name", "AE title", "address", "receives results", "storage commitment"], rows, { id: "peers-table" }),
        h("p", {}, `Results go to: ${destinations}.`),
      );
    })
    .catch((error) => box.replaceChildren(h("p", { class: "error" }, errorText(error))));
}
