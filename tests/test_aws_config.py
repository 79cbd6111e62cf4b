"""The IoT Core documents shipped in config/aws/ agree with what the gateway does: the template
takes what `enroll` sends, the claim policy allows the topics awsiotsdk uses for that template and
nothing more, and the device policy allows the gateway's own topics only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.config.settings import IotCoreCloud
from gateway.enroll import EnrollRequest

AWS = Path(__file__).resolve().parent.parent / "config" / "aws"
THING = "${iot:Connection.Thing.ThingName}"
TENANT = "${iot:Connection.Thing.Attributes[tenant]}"
SITE = "${iot:Connection.Thing.Attributes[site]}"


def document(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((AWS / name).read_text())
    return loaded


def allowed(policy: dict[str, Any], action: str) -> set[str]:
    """The resources a policy allows for one action (every statement of these policies allows)."""
    resources: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        if statement["Action"] == action:
            value = statement["Resource"]
            resources.update([value] if isinstance(value, str) else value)
    return resources


def test_the_template_takes_exactly_the_parameters_enroll_sends() -> None:
    """RegisterThing's parameters are the template's own (besides the certificate id IoT Core
    fills in), and the thing is named by ThingName, with tenant and site attributes."""
    template = document("provisioning-template.json")
    request = EnrollRequest("e", 8883, Path("ca"), Path("c"), Path("k"), "t", "gw", "acme", "leeds", Path(), Path())
    assert set(template["Parameters"]) - {"AWS::IoT::Certificate::Id"} == set(request.parameters)
    thing = template["Resources"]["thing"]["Properties"]
    assert thing["ThingName"] == {"Ref": "ThingName"}
    assert thing["AttributePayload"] == {"tenant": {"Ref": "TenantId"}, "site": {"Ref": "SiteId"}}
    assert template["Resources"]["policy"]["Properties"]["PolicyName"] == "hub-gateway-device"


def test_the_claim_policy_allows_the_provisioning_topics_only() -> None:
    """The claim may publish the two requests of the hub-gateway template (CSR, not
    CreateKeysAndCertificate) and subscribe to and receive their accepted and rejected answers."""
    policy = document("claim-policy.json")
    arn = "arn:aws:iot:REGION:ACCOUNT"
    requests = {"$aws/certificates/create-from-csr/json", "$aws/provisioning-templates/hub-gateway/provision/json"}
    answers = {f"{r}/{outcome}" for r in requests for outcome in ("accepted", "rejected")}
    assert allowed(policy, "iot:Publish") == {f"{arn}:topic/{t}" for t in requests}
    assert allowed(policy, "iot:Subscribe") == {f"{arn}:topicfilter/{t}" for t in answers}
    assert allowed(policy, "iot:Receive") == {f"{arn}:topic/{t}" for t in answers}


def test_the_device_policy_allows_the_gateways_own_client_id_and_topics_only() -> None:
    """Connect as its own thing name; publish its default readings topic and the health topic
    (retained), with tenant and site from the thing's attributes."""
    policy = document("device-policy.json")
    arn = "arn:aws:iot:REGION:ACCOUNT"
    readings = IotCoreCloud.model_fields["topic"].default.format(tenant_id=TENANT, site_id=SITE, gateway_id=THING)
    health = readings.removesuffix("/readings") + "/health"
    assert allowed(policy, "iot:Connect") == {f"{arn}:client/{THING}"}
    assert allowed(policy, "iot:Publish") == {f"{arn}:topic/{readings}", f"{arn}:topic/{health}"}
    assert allowed(policy, "iot:RetainPublish") == {f"{arn}:topic/{health}"}
    assert {s["Action"] for s in policy["Statement"]} == {"iot:Connect", "iot:Publish", "iot:RetainPublish"}
