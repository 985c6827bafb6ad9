import { h } from "../ui.js";
export default function page(root) { root.append(h("h1", {}, "predict")); }
