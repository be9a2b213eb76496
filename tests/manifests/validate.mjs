// Reads a JSON array of Istio resources on stdin and validates each against the schema
// generated from Istio's CRD definitions (@kubernetes-models/istio). Prints one line per
// resource and exits 1 when any is invalid or of a kind this checker does not know.
import { WasmPlugin } from "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin";
import { DestinationRule as DestinationRuleV1 } from "@kubernetes-models/istio/networking.istio.io/v1/DestinationRule";
import { DestinationRule as DestinationRuleV1beta1 } from "@kubernetes-models/istio/networking.istio.io/v1beta1/DestinationRule";
import { ServiceEntry as ServiceEntryV1 } from "@kubernetes-models/istio/networking.istio.io/v1/ServiceEntry";
import { ServiceEntry as ServiceEntryV1beta1 } from "@kubernetes-models/istio/networking.istio.io/v1beta1/ServiceEntry";
import { Sidecar as SidecarV1 } from "@kubernetes-models/istio/networking.istio.io/v1/Sidecar";
import { RequestAuthentication } from "@kubernetes-models/istio/security.istio.io/v1/RequestAuthentication";
import { AuthorizationPolicy } from "@kubernetes-models/istio/security.istio.io/v1/AuthorizationPolicy";
import { readFileSync } from "node:fs";

const models = [WasmPlugin, DestinationRuleV1, DestinationRuleV1beta1, ServiceEntryV1,
  ServiceEntryV1beta1, SidecarV1, RequestAuthentication, AuthorizationPolicy];

const resources = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const resource of resources) {
  const label = `${resource.apiVersion}/${resource.kind} ${resource.metadata?.name}`;
  const model = models.find((m) => m.apiVersion === resource.apiVersion && m.kind === resource.kind);
  if (!model) {
    console.log(`INVALID ${label}: no Istio schema known for this apiVersion and kind`);
    failed++;
    continue;
  }
  try {
    new model(resource).validate();
    console.log(`VALID ${label}`);
  } catch (err) {
    console.log(`INVALID ${label}: ${err.message}`);
    failed++;
  }
}
process.exit(failed === 0 ? 0 : 1);
