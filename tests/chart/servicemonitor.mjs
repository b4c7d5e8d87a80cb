// Validates every ServiceMonitor in a JSON list of documents against prometheus-operator's CRD
// schema (as shipped by @kubernetes-models/prometheus-operator). Run from the directory that
// holds node_modules, reading this file from stdin (so the package resolves from there):
//   cd target/tools/npm-models && DOCS=/path/docs.json node --input-type=module < servicemonitor.mjs
// Exits non-zero, naming the object and the error, when one is invalid or none is found.
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const docs = JSON.parse(readFileSync(process.env.DOCS, "utf8")).filter(
  (d) => d && d.kind === "ServiceMonitor",
);
if (docs.length === 0) {
  console.error("servicemonitor: no ServiceMonitor to validate");
  process.exit(1);
}
let bad = 0;
for (const doc of docs) {
  try {
    new ServiceMonitor(doc).validate();
    console.log(`servicemonitor: ${doc.metadata.name} valid`);
  } catch (e) {
    bad++;
    console.error(`servicemonitor: ${doc.metadata.name}: ${e.message}`);
  }
}
process.exit(bad);
