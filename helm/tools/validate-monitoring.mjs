// Validates Prometheus Operator objects (ServiceMonitor, PodMonitor, PrometheusRule, ...)
// against the schemas of @kubernetes-models/prometheus-operator, generated from the
// operator's CRDs. Reads a JSON array of objects on stdin; prints a JSON array with one
// entry per object: {kind, name, error} (error null when valid). Installed beside its
// node_modules in .tools/helm/ by `make ops-tools`; used by tests/ops/test_chart.py.
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((object) => {
  const kind = object.kind, name = object.metadata?.name;
  const Model = object.apiVersion === "monitoring.coreos.com/v1" ? monitoring[kind] : undefined;
  if (typeof Model !== "function") return { kind, name, error: `no schema for ${object.apiVersion} ${kind}` };
  try {
    new Model(object).validate();
    return { kind, name, error: null };
  } catch (error) {
    return { kind, name, error: error.message };
  }
});
process.stdout.write(JSON.stringify(results));
