"""The Helm chart (deploy/helm/semipd), its examples and the Grafana dashboard, without `helm`.

Values are checked against values.schema.json; templates are rendered by tests/helm_render.py
(the subset of Go templates the chart may use); the RayService is validated against
KubeRay's CRD schema, read from ../shared/k8s beside the repository.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from helm_render import Chart, TemplateError, load_chart, merge_values, render_chart, render_text

REPO = Path(__file__).resolve().parents[1]
CHART_DIR = REPO / "deploy" / "helm" / "semipd"
EXAMPLES = REPO / "deploy" / "examples"
DASHBOARD = REPO / "deploy" / "grafana" / "semipd-dashboard.json"
CRD_PATH = Path(__file__).resolve().parents[2] / "shared" / "k8s" / "ray.io_rayservices.yaml"

ARG_KEYS = {  # build_app(args) of cluster/serve_app.py
    "model", "served_model_name", "ttft_slo_ms", "tpot_slo_ms", "prefill_order", "admission", "admission_slack",
    "mode", "prefill_sm_min", "prefill_sm_max",
    "router_policy", "num_actors", "redis_url", "api_key_env", "grpc_port", "page_size", "max_prefill_tokens",
    "stream_interval", "tool_call_parser", "reasoning_parser",
}
ENGINE_ARGS = {  # semipd.<key> -> build_app arg, rendered only when the key is set (else the app's default)
    "maxModelLen": "max_model_len", "maxDecodeSeqs": "max_decode_seqs", "memoryFraction": "memory_fraction",
    "numPages": "num_pages", "enablePrefixCaching": "enable_prefix_caching", "dtype": "dtype", "seed": "seed",
    "loadFormat": "load_format",
    # semipd's own engine settings (`semipd serve` flags vLLM lacks)
    "prefillSms": "prefill_sms", "overlapDecode": "overlap_decode", "overlapPrefill": "overlap_prefill",
    "decodePaceMs": "decode_pace_ms", "prefillLayersAhead": "prefill_layers_ahead",
    "switchIntervalMs": "switch_interval_ms", "decodeAttention": "decode_attention",
}
CONTROLLER_ARGS = {  # semipd.<key> -> build_app arg of the SLO controller, rendered only when the key is set
    "controllerPolicy": "controller_policy", "latencyProfile": "latency_profile", "profileGrid": "profile_grid",
}
CLUSTER_FIELDS = {"controller_policy": "policy"}  # build_app arg -> ClusterConfig field, where the names differ
FRONTEND_ARGS = {  # frontend.<key> -> build_app arg, rendered only when the key is set (else the app's default)
    "numReplicas": "num_replicas", "maxOngoingRequests": "max_ongoing_requests", "numCpus": "replica_num_cpus",
}


# --------------------------------------------------------------------------- helpers


class _NoDuplicatesLoader(yaml.SafeLoader):
    """SafeLoader that fails on a repeated mapping key (PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_NoDuplicatesLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_manifests(text: str) -> list[dict[str, Any]]:
    """The YAML documents of one rendered template, empty ones dropped, duplicate keys refused."""
    return [doc for doc in yaml.load_all(text, Loader=_NoDuplicatesLoader) if doc is not None]


@dataclass(frozen=True)
class Scenario:
    """One `helm template` invocation: values files applied in order, and a release name."""

    name: str
    overrides: tuple[dict[str, Any], ...] = ()
    release: str = "semipd"
    fullname: str = "semipd"


@dataclass
class Rendered:
    scenario: Scenario
    values: dict[str, Any]
    files: dict[str, str]
    docs: list[dict[str, Any]] = field(default_factory=list)

    def one(self, kind: str) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)


def small_values() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "values-small.yaml").read_text())


EXTERNAL_REDIS = {
    "redis": {
        "enabled": False,
        "external": {"address": "redis-master.infra.svc:6380", "db": 2, "tls": True,
                     "passwordSecret": {"name": "semipd-redis", "key": "redis-password"}},
    },
}
MANY_OPTIONS = {
    "apiKey": {"secretName": "semipd-api", "key": "token"},
    "grpc": {"enabled": False},
    "upgradeStrategy": "None",
    "imagePullSecrets": [{"name": "regcred"}],
    "common": {"containerEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}]},
    "head": {"labels": {"team": "llm"}, "annotations": {"note": "x"}, "rayStartParams": {"num-cpus": 0},
             "nodeSelector": {"pool": "cpu"}},
    "worker": {"containerEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}], "nodeSelector": {"pool": "h100"},
               "initContainers": [{"name": "fetch-model", "image": "busybox:1.36", "command": ["sh", "-c", "true"],
                                   "volumeMounts": [{"name": "model", "mountPath": "/models"}]}],
               "volumes": [{"name": "cache", "emptyDir": {}}], "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]},
    "model": {"source": {"type": "emptyDir", "emptyDir": {"sizeLimit": "40Gi"}},
              "reasoningParser": "qwen3"},
    "semipd": {"mode": "unified", "maxPrefillTokens": 1048576},
}
# vLLM's engine flags, falsy ones (seed 0, prefix caching off) included: set is not the same as truthy
ENGINE_SETTINGS = {
    "semipd": {"maxModelLen": 2048, "maxDecodeSeqs": 64, "memoryFraction": 0.9, "numPages": 4096,
               "enablePrefixCaching": False, "dtype": "float16", "seed": 0, "loadFormat": "dummy", "pageSize": 32},
}

# semipd's own settings, a value each unlike the app's default (overlaps off: false is set, not unset)
SEMIPD_SETTINGS = {
    "prefillSms": 66, "overlapDecode": False, "overlapPrefill": False, "decodePaceMs": 0.5, "prefillLayersAhead": 6,
    "switchIntervalMs": 1, "decodeAttention": "cuda-cores", "controllerPolicy": "fixed",
    "latencyProfile": "/profiles/latency.json", "profileGrid": "full",
}
assert set(SEMIPD_SETTINGS) == set(ENGINE_ARGS) - set(ENGINE_SETTINGS["semipd"]) | set(CONTROLLER_ARGS)

FIXED_FRONTEND = {"frontend": {"numReplicas": 3, "maxOngoingRequests": 512, "numCpus": 0.5}}
AUTOSCALED_FRONTEND = {
    "frontend": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetOngoingRequests": 256}, "numCpus": 2},
}

SCENARIOS = [
    Scenario("default"),
    Scenario("values-small", (small_values(),)),
    Scenario("external-redis", (EXTERNAL_REDIS,), release="prod", fullname="prod-semipd"),
    Scenario("many-options", (MANY_OPTIONS,), release="staging", fullname="staging-semipd"),
    Scenario("engine-settings", (ENGINE_SETTINGS,)),
    Scenario("semipd-settings", ({"semipd": SEMIPD_SETTINGS},)),
    Scenario("fixed-frontend", (FIXED_FRONTEND,)),
    Scenario("autoscaled-frontend", (AUTOSCALED_FRONTEND,)),
]


@pytest.fixture(scope="module")
def chart() -> Chart:
    return load_chart(CHART_DIR)


@pytest.fixture(scope="module")
def values_schema() -> dict[str, Any]:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def merged_values(chart: Chart, overrides: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    values = chart.values
    for override in overrides:
        values = merge_values(values, override)
    return values


def render(chart: Chart, scenario: Scenario) -> Rendered:
    files = render_chart(chart, list(scenario.overrides), release_name=scenario.release)
    out = Rendered(scenario, merged_values(chart, scenario.overrides), files)
    for path, text in files.items():
        if path.endswith(".yaml"):
            out.docs.extend(parse_manifests(text))
    return out


@pytest.fixture(scope="module", params=SCENARIOS, ids=lambda s: s.name)
def rendered(request: pytest.FixtureRequest, chart: Chart) -> Rendered:
    return render(chart, request.param)


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    config = yaml.load(rayservice["spec"]["serveConfigV2"], Loader=_NoDuplicatesLoader)
    assert isinstance(config, dict)
    return config


def head_container(rayservice: dict[str, Any]) -> dict[str, Any]:
    return rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def worker_group(rayservice: dict[str, Any]) -> dict[str, Any]:
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert len(groups) == 1
    return groups[0]


def worker_container(rayservice: dict[str, Any]) -> dict[str, Any]:
    return worker_group(rayservice)["template"]["spec"]["containers"][0]


def env_by_name(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def expected_redis_url(values: dict[str, Any], fullname: str, password: str = "") -> str:
    """The Redis URL for these values, with `password` (e.g. a `$(VAR)` reference) if given."""
    redis = values["redis"]
    auth = f":{password}@" if password else ""
    if redis["enabled"]:
        return f"redis://{auth}{fullname}-redis:{redis['port']}/0"
    external = redis["external"]
    return f"{'rediss' if external['tls'] else 'redis'}://{auth}{external['address']}/{external['db']}"


def redis_password_secret(values: dict[str, Any]) -> dict[str, str] | None:
    redis = values["redis"]
    return None if redis["enabled"] or not redis["external"]["passwordSecret"]["name"] else redis["external"]["passwordSecret"]


def expected_args(values: dict[str, Any], fullname: str) -> dict[str, Any]:
    """What build_app must receive for these values."""
    return {
        "model": values["model"]["path"],
        "served_model_name": values["model"]["servedName"],
        "tool_call_parser": values["model"]["toolCallParser"],
        "reasoning_parser": values["model"]["reasoningParser"] or None,
        "ttft_slo_ms": values["slo"]["ttftMs"],
        "tpot_slo_ms": values["slo"]["tpotMs"],
        "prefill_order": values["slo"]["prefillOrder"],
        "admission": values["slo"]["admission"],
        "admission_slack": values["slo"]["admissionSlack"],
        "mode": values["semipd"]["mode"],
        "prefill_sm_min": values["semipd"]["prefillSmMin"],
        "prefill_sm_max": values["semipd"]["prefillSmMax"],
        "router_policy": values["router"]["policy"],
        "num_actors": values["semipd"]["numActors"],
        "redis_url": None if redis_password_secret(values) else expected_redis_url(values, fullname),
        "api_key_env": values["apiKey"]["env"] if values["apiKey"]["secretName"] else None,
        "grpc_port": values["grpc"]["port"] if values["grpc"]["enabled"] else None,
        "page_size": values["semipd"]["pageSize"],
        "max_prefill_tokens": values["semipd"]["maxPrefillTokens"],
        "stream_interval": values["semipd"]["streamInterval"],
        **{arg: values["semipd"][key] for key, arg in {**ENGINE_ARGS, **CONTROLLER_ARGS}.items() if key in values["semipd"]},
        **{arg: values["frontend"][key] for key, arg in FRONTEND_ARGS.items() if key in values["frontend"]},
    }


# --------------------------------------------------------------------------- KubeRay CRD schema


def _kube_schema_to_json_schema(node: Any) -> Any:
    """OpenAPI v3 schema of a CRD -> JSON Schema with the Kubernetes extensions made explicit.

    - x-kubernetes-int-or-string: anyOf integer/string (when the CRD does not spell it out);
    - nullable: null added to the type;
    - objects with properties and no additionalProperties refuse unknown fields, as the API
      server does with strict field validation (kubectl's default), unless
      x-kubernetes-preserve-unknown-fields;
    - x-kubernetes-list-type / -list-map-keys / -validations stay, checked by the keywords
      of `crd_validator_class`.
    """
    if isinstance(node, list):
        return [_kube_schema_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _kube_schema_to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = _kube_schema_to_json_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """x-kubernetes-list-type: `set` items are unique; `map` items are unique by their keys."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema["x-kubernetes-list-map-keys"]
        item_props = schema.get("items", {}).get("properties", {})
        seen_keys: set[tuple[Any, ...]] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            values = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
            if None in values:
                yield jsonschema.ValidationError(f"list map item {item!r} lacks a key of {keys}")
            elif values in seen_keys:
                yield jsonschema.ValidationError(f"duplicate entry for keys {dict(zip(keys, values))}")
            seen_keys.add(values)


def _cel_rules(validator: Any, rules: list[dict[str, str]], instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """The CEL rules the CRD uses: `self == oldSelf` (a transition rule: only on update, so
    never on a create) and `self in [...]`. Any other rule fails loudly, not silently."""
    for rule in rules:
        text = rule["rule"]
        if text == "self == oldSelf":
            continue
        match = re.fullmatch(r"self in (\[.*\])", text)
        if match is None:
            yield jsonschema.ValidationError(f"CEL rule not understood by the test, extend _cel_rules: {text}")
        elif instance not in ast.literal_eval(match.group(1)):
            yield jsonschema.ValidationError(rule.get("message", text))


def crd_validator_class() -> Any:
    return jsonschema.validators.extend(
        jsonschema.Draft7Validator,
        {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
    )


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
    checker.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
    return checker


@pytest.fixture(scope="module")
def crd_validator() -> Any:
    if not CRD_PATH.is_file():
        pytest.skip(f"KubeRay's RayService CRD is absent at {CRD_PATH} (shared/ must sit beside the repository)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD_PATH.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _kube_schema_to_json_schema(version["schema"]["openAPIV3Schema"])
    return crd_validator_class()(schema, format_checker=_format_checker())


def crd_errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------- values and schema


def test_chart_metadata(chart: Chart) -> None:
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.metadata["name"] == "semipd"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart.metadata["version"])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_values_match_schema(chart: Chart, values_schema: dict[str, Any], scenario: Scenario) -> None:
    errors = list(jsonschema.Draft7Validator(values_schema).iter_errors(merged_values(chart, scenario.overrides)))
    assert errors == []


BAD_VALUES = [
    ("mode-not-in-enum", {"semipd": {"mode": "disaggregated"}}, "semipd/mode"),
    ("negative-ttft", {"slo": {"ttftMs": -5}}, "slo/ttftMs"),
    ("zero-tpot", {"slo": {"tpotMs": 0}}, "slo/tpotMs"),
    ("admission-not-in-enum", {"slo": {"admission": "maybe"}}, "slo/admission"),
    ("zero-admission-slack", {"slo": {"admissionSlack": 0}}, "slo/admissionSlack"),
    ("prefill-min-above-1", {"semipd": {"prefillSmMin": 1.5}}, "semipd/prefillSmMin"),
    ("prefill-max-is-whole-gpu", {"semipd": {"prefillSmMax": 1.0}}, "semipd/prefillSmMax"),
    ("missing-image-repository", {"image": {"repository": None}}, "image"),
    ("empty-image-repository", {"image": {"repository": ""}}, "image/repository"),
    ("unknown-router-policy", {"router": {"policy": "random"}}, "router/policy"),
    ("router-policy-the-app-lacks", {"router": {"policy": "round-robin"}}, "router/policy"),
    ("worker-without-gpu", {"worker": {"resources": {"limits": {"nvidia.com/gpu": None}}}}, "worker/resources/limits"),
    ("fractional-gpu", {"worker": {"resources": {"limits": {"nvidia.com/gpu": 0.5}}}}, "worker/resources/limits/nvidia.com/gpu"),
    ("float-cpu-quantity", {"head": {"resources": {"limits": {"cpu": 0.5}}}}, "head/resources/limits/cpu"),
    ("external-redis-without-address", {"redis": {"enabled": False}}, "redis/external/address"),
    ("redis-address-with-scheme", {"redis": {"enabled": False, "external": {"address": "redis://r:6379"}}}, "redis/external/address"),
    ("typo-in-top-level-key", {"sloo": {"ttftMs": 100}}, ""),
    ("typo-in-block", {"semipd": {"pagesize": 32}}, "semipd"),
    ("ray-param-owned-by-chart", {"head": {"rayStartParams": {"dashboard-port": "9000"}}}, "head/rayStartParams"),
    ("unknown-model-source", {"model": {"source": {"type": "s3"}}}, "model/source/type"),
    ("unknown-reasoning-parser", {"model": {"reasoningParser": "granite"}}, "model/reasoningParser"),
    ("pvc-without-claim", {"model": {"source": {"type": "pvc", "pvc": {"claimName": ""}}}}, "model/source/pvc/claimName"),
    ("relative-model-path", {"model": {"path": "models/llama"}}, "model/path"),
    ("port-out-of-range", {"grpc": {"port": 70000}}, "grpc/port"),
    ("zero-actors", {"semipd": {"numActors": 0}}, "semipd/numActors"),
    ("bad-upgrade-strategy", {"upgradeStrategy": "Rolling"}, "upgradeStrategy"),
    ("disagg-on-one-gpu-pods", {"semipd": {"mode": "disagg"}}, "worker/resources/limits/nvidia.com/gpu"),
    ("page-size-not-a-power-of-two", {"semipd": {"pageSize": 24}}, "semipd/pageSize"),
    ("max-model-len-1", {"semipd": {"maxModelLen": 1}}, "semipd/maxModelLen"),
    ("max-model-len-in-vllm-k-form", {"semipd": {"maxModelLen": "32k"}}, "semipd/maxModelLen"),
    ("zero-decode-seqs", {"semipd": {"maxDecodeSeqs": 0}}, "semipd/maxDecodeSeqs"),
    ("memory-fraction-above-0.98", {"semipd": {"memoryFraction": 0.99}}, "semipd/memoryFraction"),
    ("zero-memory-fraction", {"semipd": {"memoryFraction": 0}}, "semipd/memoryFraction"),
    ("one-page", {"semipd": {"numPages": 1}}, "semipd/numPages"),
    ("prefix-caching-as-text", {"semipd": {"enablePrefixCaching": "yes"}}, "semipd/enablePrefixCaching"),
    ("float32-on-gpu-workers", {"semipd": {"dtype": "float32"}}, "semipd/dtype"),
    ("unknown-dtype", {"semipd": {"dtype": "int8"}}, "semipd/dtype"),
    ("fractional-seed", {"semipd": {"seed": 1.5}}, "semipd/seed"),
    ("unknown-load-format", {"semipd": {"loadFormat": "pt"}}, "semipd/loadFormat"),
    ("zero-prefill-sms", {"semipd": {"prefillSms": 0}}, "semipd/prefillSms"),
    ("fractional-prefill-sms", {"semipd": {"prefillSms": 1.5}}, "semipd/prefillSms"),
    ("overlap-decode-as-text", {"semipd": {"overlapDecode": "no"}}, "semipd/overlapDecode"),
    ("overlap-prefill-as-text", {"semipd": {"overlapPrefill": "no"}}, "semipd/overlapPrefill"),
    ("zero-decode-pace", {"semipd": {"decodePaceMs": 0}}, "semipd/decodePaceMs"),
    ("decode-pace-above-1s", {"semipd": {"decodePaceMs": 1001}}, "semipd/decodePaceMs"),
    ("negative-prefill-layers-ahead", {"semipd": {"prefillLayersAhead": -1}}, "semipd/prefillLayersAhead"),
    ("fractional-prefill-layers-ahead", {"semipd": {"prefillLayersAhead": 2.5}}, "semipd/prefillLayersAhead"),
    ("negative-switch-interval", {"semipd": {"switchIntervalMs": -1}}, "semipd/switchIntervalMs"),
    ("switch-interval-above-1s", {"semipd": {"switchIntervalMs": 1000.5}}, "semipd/switchIntervalMs"),
    ("unknown-decode-attention", {"semipd": {"decodeAttention": "bogus"}}, "semipd/decodeAttention"),
    ("unknown-controller-policy", {"semipd": {"controllerPolicy": "bogus"}}, "semipd/controllerPolicy"),
    ("policy-class-without-module", {"semipd": {"controllerPolicy": ":ReactivePolicy"}}, "semipd/controllerPolicy"),
    ("empty-latency-profile", {"semipd": {"latencyProfile": ""}}, "semipd/latencyProfile"),
    ("unknown-profile-grid", {"semipd": {"profileGrid": "medium"}}, "semipd/profileGrid"),
    ("zero-replicas", {"frontend": {"numReplicas": 0}}, "frontend/numReplicas"),
    ("replicas-as-text", {"frontend": {"numReplicas": "2"}}, "frontend/numReplicas"),
    ("replicas-and-autoscaling", {"frontend": {"numReplicas": 2, **AUTOSCALED_FRONTEND["frontend"]}}, "frontend"),
    ("autoscaling-to-zero", {"frontend": {"autoscaling": {"minReplicas": 0, "maxReplicas": 2,
                                                          "targetOngoingRequests": 8}}}, "frontend/autoscaling/minReplicas"),
    ("autoscaling-without-target", {"frontend": {"autoscaling": {"minReplicas": 1, "maxReplicas": 2}}},
     "frontend/autoscaling"),
    ("autoscaling-zero-target", {"frontend": {"autoscaling": {"minReplicas": 1, "maxReplicas": 2,
                                                              "targetOngoingRequests": 0}}},
     "frontend/autoscaling/targetOngoingRequests"),
    ("autoscaling-typo", {"frontend": {"autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targetOngoingRequests": 8,
                                                       "upscaleDelayS": 5}}}, "frontend/autoscaling"),
    ("zero-ongoing-requests", {"frontend": {"maxOngoingRequests": 0}}, "frontend/maxOngoingRequests"),
    ("negative-cpus", {"frontend": {"numCpus": -1}}, "frontend/numCpus"),
    ("ray-actor-options-as-is", {"frontend": {"rayActorOptions": {"num_cpus": 1}}}, "frontend"),
]
# Refused by the app's own checks too (ServeArgs, the engine configs), not only by the schema
APP_REFUSES_TOO = ["page-size-not-a-power-of-two", "max-model-len-1", "max-model-len-in-vllm-k-form", "zero-decode-seqs",
                   "memory-fraction-above-0.98", "zero-memory-fraction", "one-page", "unknown-dtype", "fractional-seed",
                   "unknown-load-format", "zero-replicas", "zero-ongoing-requests", "negative-cpus",
                   "zero-prefill-sms", "fractional-prefill-sms", "zero-decode-pace", "decode-pace-above-1s",
                   "negative-switch-interval", "switch-interval-above-1s", "unknown-decode-attention",
                   "unknown-controller-policy", "policy-class-without-module", "empty-latency-profile",
                   "unknown-profile-grid"]


@pytest.mark.parametrize(("override", "where"), [(o, w) for _, o, w in BAD_VALUES], ids=[n for n, _, _ in BAD_VALUES])
def test_schema_rejects_bad_values(chart: Chart, values_schema: dict[str, Any], override: dict[str, Any], where: str) -> None:
    values = merge_values(chart.values, override)
    errors = list(jsonschema.Draft7Validator(values_schema).iter_errors(values))
    paths = ["/".join(map(str, e.absolute_path)) for e in errors]
    assert errors, f"schema accepted {override}"
    assert any(p.startswith(where) for p in paths), f"errors at {paths}, expected under {where!r}"


def test_schema_takes_disagg_on_pods_of_an_even_gpu_count(chart: Chart, values_schema: dict[str, Any]) -> None:
    for gpus in (2, "4"):
        gpu = {"nvidia.com/gpu": gpus}
        values = merge_values(chart.values, {"semipd": {"mode": "disagg", "numActors": 1},
                                             "worker": {"resources": {"limits": gpu, "requests": gpu}}})
        assert not list(jsonschema.Draft7Validator(values_schema).iter_errors(values)), gpus


def test_examples_keep_one_actor_per_gpu(chart: Chart) -> None:
    for overrides in ((), (small_values(),)):
        values = merged_values(chart, overrides)
        gpus = int(values["worker"]["resources"]["limits"]["nvidia.com/gpu"])
        assert values["semipd"]["numActors"] == values["worker"]["replicas"] * gpus
        assert values["worker"]["minReplicas"] <= values["worker"]["replicas"] <= values["worker"]["maxReplicas"]
        assert values["semipd"]["prefillSmMin"] <= values["semipd"]["prefillSmMax"]
        assert values["drainSeconds"] < values["terminationGracePeriodSeconds"]
        assert values["model"]["path"].startswith(values["model"]["mountPath"].rstrip("/") + "/")


# --------------------------------------------------------------------------- rendering


def test_templates_render_to_expected_objects(rendered: Rendered) -> None:
    redis_kinds = ["Deployment", "Service"] if rendered.values["redis"]["enabled"] else []
    assert rendered.kinds() == sorted(["RayService", *redis_kinds])
    assert set(rendered.files) == {"templates/rayservice.yaml", "templates/redis.yaml", "templates/NOTES.txt"}
    for doc in rendered.docs:
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == rendered.scenario.release
    assert rendered.one("RayService")["metadata"]["name"] == rendered.scenario.fullname


def test_notes_name_the_services(rendered: Rendered) -> None:
    notes = rendered.files["templates/NOTES.txt"]
    assert f"svc/{rendered.scenario.fullname}-serve-svc" in notes
    assert f"svc/{rendered.scenario.fullname}-head-svc" in notes
    assert expected_redis_url(rendered.values, rendered.scenario.fullname) in notes
    max_model_len = rendered.values["semipd"].get("maxModelLen")
    assert ("Longest request" in notes) == (max_model_len is not None)
    assert max_model_len is None or f": {max_model_len} tokens." in notes


def test_rayservice_matches_kuberay_crd(rendered: Rendered, crd_validator: Any) -> None:
    assert crd_errors(crd_validator, rendered.one("RayService")) == []


@pytest.mark.parametrize(
    ("mistake", "message"),
    [("unknown-field", "'readinesProbe' was unexpected"), ("float-quantity", "0.5 is not valid"),
     ("duplicate-port", "duplicate entry"), ("bad-managed-by", "managedBy field value must be"),
     ("int32-overflow", "is not a 'int32'"), ("missing-group-name", "'groupName' is a required property")],
)
def test_crd_validation_catches_mistakes(chart: Chart, crd_validator: Any, mistake: str, message: str) -> None:
    """The CRD check is not vacuous: each of these broken RayServices is refused."""
    doc = copy.deepcopy(render(chart, SCENARIOS[0]).one("RayService"))
    worker = worker_container(doc)
    if mistake == "unknown-field":
        worker["readinesProbe"] = worker.pop("readinessProbe")
    elif mistake == "float-quantity":
        worker["resources"]["limits"]["cpu"] = 0.5
    elif mistake == "duplicate-port":
        worker["ports"].append({"name": "serve2", "containerPort": worker["ports"][0]["containerPort"]})
    elif mistake == "bad-managed-by":
        doc["spec"]["managedBy"] = "someone-else"
    elif mistake == "int32-overflow":
        worker_group(doc)["replicas"] = 2**31
    elif mistake == "missing-group-name":
        del worker_group(doc)["groupName"]
    errors = crd_errors(crd_validator, doc)
    assert len(errors) == 1 and message in errors[0], errors


def test_serve_config_names_app_and_args(rendered: Rendered) -> None:
    config = serve_config(rendered.one("RayService"))
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.serve_app:build_app"
    assert app["route_prefix"] == "/"
    optional = set(ENGINE_ARGS.values()) | set(CONTROLLER_ARGS.values()) | set(FRONTEND_ARGS.values())
    assert ARG_KEYS <= set(app["args"]) <= ARG_KEYS | optional
    assert app["args"] == expected_args(rendered.values, rendered.scenario.fullname)
    assert config["http_options"]["port"] == rendered.values["service"]["ports"]["serve"]


def test_serve_args_are_accepted_by_the_app(rendered: Rendered, tiny_llama: Path) -> None:
    """build_app's own argument model (extra keys forbidden) takes the chart's args."""
    serve_app = pytest.importorskip("cluster.serve_app", reason="cluster/serve_app.py is not in this checkout")
    args = serve_config(rendered.one("RayService"))["applications"][0]["args"]
    parsed = serve_app.ServeArgs.parse(args)
    assert parsed.model == rendered.values["model"]["path"] and parsed.num_actors == rendered.values["semipd"]["numActors"]
    semipd = rendered.values["semipd"]
    cfg = serve_app.cluster_config(parsed.model_copy(update={"model": str(tiny_llama)}), None)
    assert cfg.prefill_sm_fraction == (semipd.get("prefillSmMin") or 0.0, semipd.get("prefillSmMax") or 1.0)
    defaults = pytest.importorskip("cluster.bootstrap").EngineOptions()
    for key, option in {"pageSize": "page_size", "maxPrefillTokens": "max_prefill_tokens", **ENGINE_ARGS}.items():
        assert getattr(cfg.engine, option) == semipd.get(key, getattr(defaults, option)), key
    cluster_defaults = cluster_config_defaults()
    for key, arg in CONTROLLER_ARGS.items():
        field_name = CLUSTER_FIELDS.get(arg, arg)
        assert getattr(cfg, field_name) == semipd.get(key, cluster_defaults[field_name]), key


def cluster_config_defaults() -> dict[str, Any]:
    """ClusterConfig's field defaults (those with a plain default)."""
    bootstrap = pytest.importorskip("cluster.bootstrap")
    return {f.name: f.default for f in dataclasses.fields(bootstrap.ClusterConfig)}


def app_args(chart: Chart, overrides: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """The build_app args the chart renders with these values files."""
    return serve_config(render(chart, Scenario("args", overrides)).one("RayService"))["applications"][0]["args"]


def cluster_setting(cfg: Any, arg: str) -> Any:
    """What the app's ClusterConfig made of build_app arg `arg`: an engine option, or one of its own fields."""
    if arg in CONTROLLER_ARGS.values():
        return getattr(cfg, CLUSTER_FIELDS.get(arg, arg))
    return getattr(cfg.engine, arg)


@pytest.mark.parametrize("key", sorted(SEMIPD_SETTINGS))
def test_each_semipd_setting_becomes_its_arg(chart: Chart, tiny_llama: Path, key: str) -> None:
    """semipd's own settings, set one at a time: each adds just its build_app arg, which the app takes into its
    engines' options or its cluster's controller settings (the value is not the app's default, so it got there)."""
    serve_app = pytest.importorskip("cluster.serve_app", reason="cluster/serve_app.py is not in this checkout")
    arg, value = {**ENGINE_ARGS, **CONTROLLER_ARGS}[key], SEMIPD_SETTINGS[key]
    default_args = app_args(chart)
    args = app_args(chart, ({"semipd": {key: value}},))
    assert args == {**default_args, arg: value}
    local = {"model": str(tiny_llama)}
    cfg = serve_app.cluster_config(serve_app.ServeArgs.parse({**args, **local}), None)
    default_cfg = serve_app.cluster_config(serve_app.ServeArgs.parse({**default_args, **local}), None)
    assert cluster_setting(cfg, arg) == value != cluster_setting(default_cfg, arg)


def test_semipd_settings_left_out_are_not_args(chart: Chart, tiny_llama: Path) -> None:
    """values.yaml leaves semipd's own settings out, so the app's defaults apply: no arg, ServeArgs' None, and the
    EngineOptions / ClusterConfig defaults."""
    serve_app = pytest.importorskip("cluster.serve_app", reason="cluster/serve_app.py is not in this checkout")
    assert not set(SEMIPD_SETTINGS) & set(chart.values["semipd"])
    args = app_args(chart)
    new_args = {arg for key, arg in {**ENGINE_ARGS, **CONTROLLER_ARGS}.items() if key in SEMIPD_SETTINGS}
    assert not new_args & set(args)
    parsed = serve_app.ServeArgs.parse({**args, "model": str(tiny_llama)})
    assert all(getattr(parsed, arg) is None for arg in new_args)
    cfg = serve_app.cluster_config(parsed, None)
    engine_defaults = pytest.importorskip("cluster.bootstrap").EngineOptions()
    cluster_defaults = cluster_config_defaults()
    for arg in new_args:
        default = (cluster_defaults[CLUSTER_FIELDS.get(arg, arg)] if arg in CONTROLLER_ARGS.values()
                   else getattr(engine_defaults, arg))
        assert cluster_setting(cfg, arg) == default, arg


def test_schema_controller_policies_are_the_built_in_ones(values_schema: dict[str, Any]) -> None:
    """The names semipd.controllerPolicy takes are semipd's built-in policies (its other form, module:Class, names
    any other; a name registered at run time, as some tests do, is no chart value)."""
    from actors.slo.policy import POLICIES

    names, _import_path = values_schema["properties"]["semipd"]["properties"]["controllerPolicy"]["anyOf"]
    assert set(names["enum"]) == set(POLICIES)


def test_policy_class_path_is_taken_by_schema_and_app(chart: Chart, values_schema: dict[str, Any],
                                                      tiny_llama: Path) -> None:
    """A policy given as module:Class (a class in the image) passes the schema and the app's controller check
    (which imports it)."""
    serve_app = pytest.importorskip("cluster.serve_app", reason="cluster/serve_app.py is not in this checkout")
    override = {"semipd": {"controllerPolicy": "actors.slo.types:ReactivePolicy"}}
    assert not list(jsonschema.Draft7Validator(values_schema).iter_errors(merge_values(chart.values, override)))
    args = app_args(chart, (override,))
    cfg = serve_app.cluster_config(serve_app.ServeArgs.parse({**args, "model": str(tiny_llama)}), None)
    assert cfg.policy == "actors.slo.types:ReactivePolicy"


@pytest.mark.parametrize("override", [pytest.param(o, id=n) for n, o, _ in BAD_VALUES if n in APP_REFUSES_TOO])
def test_app_refuses_the_engine_values_the_schema_refuses(chart: Chart, tiny_llama: Path, override: dict[str, Any]) -> None:
    """The schema refuses what the app would: rendered anyway, these engine values fail build_app's own checks."""
    serve_app = pytest.importorskip("cluster.serve_app", reason="cluster/serve_app.py is not in this checkout")
    args = serve_config(render(chart, Scenario("bad", (override,))).one("RayService"))["applications"][0]["args"]
    with pytest.raises(serve_app.ConfigError):
        serve_app.cluster_config(serve_app.ServeArgs.parse({**args, "model": str(tiny_llama)}), None)


def test_serve_config_is_valid_for_ray_serve(rendered: Rendered) -> None:
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.parse_obj(serve_config(rendered.one("RayService")))


def built_deployments(app_config: dict[str, Any], model: Path) -> dict[str, Any]:
    """The Serve deployments, by name, that build_app makes from a rendered application's args (on `model`),
    each with the application's `deployments` entry for it applied the way Serve applies one over the code's
    settings; an entry naming no deployment of the app fails, as it fails Serve's deploy."""
    serve_app = pytest.importorskip("cluster.serve_app", reason="cluster/serve_app.py is not in this checkout")
    from ray.serve._private.build_app import build_app as build_deployments

    app = serve_app.build_app({**app_config["args"], "model": str(model)})
    built = {d.name: d for d in build_deployments(app, name=app_config["name"]).deployments}
    for entry in app_config.get("deployments", []):
        options = {k: v for k, v in entry.items() if k != "name"}
        assert entry["name"] in built, f"deployments entry {entry['name']!r}, the app builds {sorted(built)}"
        built[entry["name"]] = built[entry["name"]].options(**options)
    return built


def test_frontend_settings_size_the_app_deployment(rendered: Rendered, tiny_llama: Path) -> None:
    """frontend.* reach the one deployment the app builds: as its args, or autoscaling as its deployments entry."""
    (app_config,) = serve_config(rendered.one("RayService"))["applications"]
    (deployment,) = built_deployments(app_config, tiny_llama).values()
    frontend = rendered.values["frontend"]
    config = deployment._deployment_config
    assert config.max_ongoing_requests == frontend.get("maxOngoingRequests", 4096)
    assert deployment.ray_actor_options["num_cpus"] == frontend.get("numCpus", 1)
    autoscaling = frontend.get("autoscaling")
    if autoscaling is None:
        assert config.autoscaling_config is None and config.num_replicas == frontend.get("numReplicas", 1)
        return
    got = config.autoscaling_config
    assert (got.min_replicas, got.max_replicas, got.target_ongoing_requests) == (
        autoscaling["minReplicas"], autoscaling["maxReplicas"], autoscaling["targetOngoingRequests"])


def test_ray_refuses_autoscaling_min_above_max(chart: Chart, values_schema: dict[str, Any], tiny_llama: Path) -> None:
    """The one frontend check the schema cannot make (draft 7 compares no two fields) is Ray Serve's own."""
    override = {"frontend": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2, "targetOngoingRequests": 8}}}
    assert not list(jsonschema.Draft7Validator(values_schema).iter_errors(merge_values(chart.values, override)))
    (app_config,) = serve_config(render(chart, Scenario("min-above-max", (override,))).one("RayService"))["applications"]
    with pytest.raises(ValueError, match=r"max_replicas \(2\) must be greater than or equal to min_replicas \(3\)"):
        built_deployments(app_config, tiny_llama)


def test_example_serve_config_is_the_chart_application(chart: Chart) -> None:
    example = yaml.safe_load((EXAMPLES / "serve_config.yaml").read_text())
    chart_config = serve_config(render(chart, SCENARIOS[0]).one("RayService"))
    (example_app,), (chart_app,) = example["applications"], chart_config["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert example_app[key] == chart_app[key]
    assert set(example_app["args"]) == set(chart_app["args"])
    assert example["proxy_location"] == chart_config["proxy_location"]
    assert example["http_options"] == chart_config["http_options"]
    pytest.importorskip("ray.serve.schema").ServeDeploySchema.parse_obj(example)
    serve_app = pytest.importorskip("cluster.serve_app", reason="cluster/serve_app.py is not in this checkout")
    serve_app.ServeArgs.parse(example_app["args"])


def test_gpu_worker_requests_gpus(rendered: Rendered) -> None:
    rayservice = rendered.one("RayService")
    limits = worker_container(rayservice)["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert limits["nvidia.com/gpu"] == rendered.values["worker"]["resources"]["limits"]["nvidia.com/gpu"]
    requests = worker_container(rayservice)["resources"].get("requests", {})
    assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in head_container(rayservice)["resources"].get("limits", {})
    group = worker_group(rayservice)
    assert group["replicas"] == rendered.values["worker"]["replicas"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_probes_and_draining(rendered: Rendered) -> None:
    rayservice = rendered.one("RayService")
    worker, head = worker_container(rayservice), head_container(rayservice)
    readiness = worker["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/health"
    port_names = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert port_names[readiness["port"]] == rendered.values["service"]["ports"]["serve"]
    assert worker["livenessProbe"]["httpGet"]["path"].startswith("/")
    # The head keeps KubeRay's probes: it must become ready before the Serve app exists.
    assert "readinessProbe" not in head and "livenessProbe" not in head
    grace = rendered.values["terminationGracePeriodSeconds"]
    for group in (rayservice["spec"]["rayClusterConfig"]["headGroupSpec"], worker_group(rayservice)):
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] == grace
    drain = " ".join(worker["lifecycle"]["preStop"]["exec"]["command"])
    assert "ray drain-node" in drain and f"sleep {rendered.values['drainSeconds']}" in drain
    assert f"sleep {rendered.values['drainSeconds']}" in " ".join(head["lifecycle"]["preStop"]["exec"]["command"])


def test_ports_and_serve_service(rendered: Rendered) -> None:
    rayservice = rendered.one("RayService")
    values = rendered.values
    head_ports = {p["name"]: p["containerPort"] for p in head_container(rayservice)["ports"]}
    assert head_ports["dashboard"] == values["service"]["ports"]["dashboard"]
    assert head_ports["serve"] == values["service"]["ports"]["serve"]
    assert head_ports["metrics"] == values["service"]["ports"]["metrics"]
    params = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert params["dashboard-port"] == str(values["service"]["ports"]["dashboard"])
    assert params["metrics-export-port"] == str(values["service"]["ports"]["metrics"])
    service_ports = {p["name"]: p for p in rayservice["spec"]["serveService"]["spec"]["ports"]}
    assert rayservice["spec"]["serveService"]["metadata"]["name"] == f"{rendered.scenario.fullname}-serve-svc"
    if values["grpc"]["enabled"]:
        assert head_ports["grpc"] == values["grpc"]["port"] == service_ports["grpc"]["port"]
        assert service_ports["grpc"]["targetPort"] == "grpc"
    else:
        assert "grpc" not in head_ports and "grpc" not in service_ports
    assert service_ports["serve"]["targetPort"] == "serve"


def test_serve_traffic_goes_to_workers(rendered: Rendered) -> None:
    """Serve replicas (and so their gRPC servers) run on workers: the head has no CPUs for
    them and is left out of the serve Service."""
    rayservice = rendered.one("RayService")
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True
    assert rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "num-cpus" not in worker_group(rayservice)["rayStartParams"]


def test_model_volume(rendered: Rendered) -> None:
    rayservice = rendered.one("RayService")
    model = rendered.values["model"]
    for spec in (rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"],
                 worker_group(rayservice)["template"]["spec"]):
        volume = {v["name"]: v for v in spec["volumes"]}["model"]
        mount = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}["model"]
        assert mount["mountPath"] == model["mountPath"] and mount["readOnly"] is True
        source = model["source"]["type"]
        expected_key = {"pvc": "persistentVolumeClaim", "hostPath": "hostPath", "emptyDir": "emptyDir"}[source]
        assert set(volume) == {"name", expected_key}
        if source == "pvc":
            assert volume["persistentVolumeClaim"]["claimName"] == model["source"]["pvc"]["claimName"]
        elif source == "hostPath":
            assert volume["hostPath"]["path"] == model["source"]["hostPath"]["path"]


def test_redis_wiring(rendered: Rendered) -> None:
    rayservice = rendered.one("RayService")
    values, fullname = rendered.values, rendered.scenario.fullname
    containers = (head_container(rayservice), worker_container(rayservice))
    if values["redis"]["enabled"]:
        deployment, service = rendered.one("Deployment"), rendered.one("Service")
        assert service["metadata"]["name"] == f"{fullname}-redis"
        selector = service["spec"]["selector"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert selector == deployment["spec"]["selector"]["matchLabels"]
        ray_pod_labels = worker_group(rayservice)["template"]["metadata"]["labels"]
        assert not selector.items() <= ray_pod_labels.items(), "the Redis Service would select Ray pods"
        assert service["spec"]["ports"][0]["port"] == values["redis"]["port"]
        assert all("SEMIPD_REDIS_PASSWORD" not in env_by_name(c) for c in containers)
    secret = redis_password_secret(values)
    url = serve_config(rayservice)["applications"][0]["args"]["redis_url"]
    if secret is None:
        assert url == expected_redis_url(values, fullname)
        assert all("SEMIPD_REDIS_URL" not in env_by_name(c) for c in containers)
        return
    assert url is None, "with a password the app must take SEMIPD_REDIS_URL, not a URL in serveConfigV2"
    for container in containers:
        names = [e["name"] for e in container["env"]]
        env = env_by_name(container)
        assert env["SEMIPD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": secret["name"], "key": secret["key"]}
        # $(VAR) expands only variables defined earlier in the same list.
        assert names.index("SEMIPD_REDIS_PASSWORD") < names.index("SEMIPD_REDIS_URL")
        assert env["SEMIPD_REDIS_URL"]["value"] == expected_redis_url(values, fullname, "$(SEMIPD_REDIS_PASSWORD)")
    assert "SEMIPD_REDIS_PASSWORD)" not in rayservice["spec"]["serveConfigV2"]


def test_external_redis_without_password_has_no_secret_env(chart: Chart) -> None:
    override = {"redis": {"enabled": False, "external": {"address": "10.0.0.5:6379"}}}
    rayservice = render(chart, Scenario("no-password", (override,))).one("RayService")
    assert "SEMIPD_REDIS_PASSWORD" not in env_by_name(worker_container(rayservice))
    assert serve_config(rayservice)["applications"][0]["args"]["redis_url"] == "redis://10.0.0.5:6379/0"


def test_external_redis_without_address_fails_to_render(chart: Chart) -> None:
    with pytest.raises(TemplateError, match="redis.external.address is required"):
        render_chart(chart, [{"redis": {"enabled": False}}])


def test_api_key_from_secret(rendered: Rendered) -> None:
    rayservice = rendered.one("RayService")
    api_key = rendered.values["apiKey"]
    args = serve_config(rayservice)["applications"][0]["args"]
    for container in (head_container(rayservice), worker_container(rayservice)):
        env = env_by_name(container)
        if api_key["secretName"]:
            assert env[api_key["env"]]["valueFrom"]["secretKeyRef"] == {"name": api_key["secretName"], "key": api_key["key"]}
            assert args["api_key_env"] == api_key["env"]
        else:
            assert api_key["env"] not in env
            assert args["api_key_env"] is None
        for entry in env.values():
            assert "value" in entry or "valueFrom" in entry


def test_extra_env_and_pod_settings_pass_through(chart: Chart) -> None:
    rayservice = render(chart, SCENARIOS[3]).one("RayService")
    worker_spec = worker_group(rayservice)["template"]["spec"]
    assert env_by_name(worker_container(rayservice))["NCCL_DEBUG"]["value"] == "WARN"
    assert env_by_name(worker_container(rayservice))["HF_HUB_OFFLINE"]["value"] == "1"
    assert env_by_name(head_container(rayservice))["HF_HUB_OFFLINE"]["value"] == "1"
    assert "NCCL_DEBUG" not in env_by_name(head_container(rayservice))
    assert worker_spec["initContainers"][0]["name"] == "fetch-model"
    assert worker_spec["nodeSelector"] == {"pool": "h100"}
    assert worker_spec["imagePullSecrets"] == [{"name": "regcred"}]
    head_group = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head_group["rayStartParams"]["num-cpus"] == "0"
    assert head_group["template"]["metadata"]["labels"]["team"] == "llm"
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "None"


def test_large_numbers_stay_integers(chart: Chart) -> None:
    """Helm reads values numbers as float64; a plain `{{ }}` would print 1048576 as 1.048576e+06."""
    rayservice = render(chart, SCENARIOS[3]).one("RayService")
    assert serve_config(rayservice)["applications"][0]["args"]["max_prefill_tokens"] == 1048576


# --------------------------------------------------------------------------- the renderer itself


def _render_text(src: str, values: dict[str, Any] | None = None, strict: bool = True) -> str:
    return render_text(src, values, strict)


@pytest.mark.parametrize(
    "src",
    ["{{ upper .Values.x }}", "{{ if false }}{{ lookup \"v1\" \"Secret\" \"ns\" \"n\" }}{{ end }}",
     "{{ template \"x\" . }}", "{{ block \"x\" . }}{{ end }}", "{{ range .Values.l }}{{ break }}{{ end }}",
     "{{ if .Values.a }}", "{{ else with .Values.a }}", "{{ 'c' }}", "{{ .Values.a | .Values.b }}"],
)
def test_renderer_refuses_unsupported_templates(src: str) -> None:
    with pytest.raises(TemplateError):
        _render_text(src, {"a": 1, "b": 2, "l": [1], "x": "y"})


def test_renderer_semantics() -> None:
    assert _render_text("a  {{- 1 -}}  b\n{{/* c */}}x") == "a1b\nx"
    assert _render_text("{{ range $k, $v := .Values.m }}{{ $k }}={{ $v }};{{ end }}", {"m": {"b": 2, "a": 1}}) == "a=1;b=2;"
    assert _render_text("{{ .Values.n }} {{ .Values.big }} {{ .Values.f }}", {"n": 3, "big": 1000000, "f": 0.25}) == "3 1e+06 0.25"
    assert _render_text("{{ .Values.m | toYaml | nindent 2 }}", {"m": {"k": [1, "x"]}}) == "\n  k:\n  - 1\n  - x"
    assert _render_text('{{ .Values.s | quote }} {{ .Values.m | toJson }}', {"s": 'a"b', "m": {"x": "<"}}) == '"a\\"b" {"x":"\\u003c"}'
    assert _render_text('{{ define "d" }}[{{ . }}]{{ end }}{{ include "d" .Values.s }}', {"s": "v"}) == "[v]"
    assert _render_text("{{ if and .Values.a (not .Values.b) }}y{{ else if .Values.b }}b{{ else }}n{{ end }}", {"a": 1, "b": 0}) == "y"
    assert _render_text('{{ with .Values.e }}x{{ else }}{{ .Values.s | default "d" }}{{ end }}', {"e": [], "s": ""}) == "d"
    assert _render_text('{{ .Values.s | b64enc }} {{ eq .Values.s "k" "v" }}', {"s": "v"}) == "dg== true"
    assert _render_text("{{ .Values.missing }}", strict=False) == ""
    has = '{{ if hasKey .Values.m "k" }}k{{ end }}{{ if hasKey .Values.m "z" }}z{{ end }}{{ hasKey .Values.n "k" }}'
    assert _render_text(has, {"m": {"k": 0}, "n": None}) == "kfalse"


@pytest.mark.parametrize(
    ("src", "values", "message"),
    [("{{ .Values.nope }}", {}, "no entry"), ("{{ .Values.m }}", {"m": {"a": 1}}, "toYaml"),
     ("{{ eq .Values.n 1 }}", {"n": 1}, "incompatible"), ('{{ required "need x" .Values.x }}', {"x": ""}, "need x"),
     ("{{ .Values.a.b }}", {"a": None}, "nil pointer"), ('{{ include "nope" . }}', {}, "no template"),
     ("{{ nindent 2 .Values.m }}", {"m": {"a": 1}}, "expected string"),
     ('{{ hasKey .Values.s "a" }}', {"s": "a"}, "expected map"), ('{{ hasKey .Release "Name" }}', {}, "expected map")],
)
def test_renderer_errors(src: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        _render_text(src, values)


# --------------------------------------------------------------------------- Grafana dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in board["panels"] if p["type"] != "row" for t in p["targets"]]


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    assert "model_name" in variables["model_name"]["definition"]
    assert variables["model_name"]["datasource"]["uid"] == "${datasource}"


def test_dashboard_panels_cover_the_metrics() -> None:
    board = dashboard()
    exprs = dashboard_exprs(board)
    text = "\n".join(exprs)
    for metric in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "semipd:prefill_sm_fraction",
                   "semipd:sm_repartitions_total", "semipd:queue_depth"):
        assert metric + "{" in text, metric
    for histogram, quantiles in (("vllm:time_to_first_token_seconds", ("0.5", "0.9", "0.99")),
                                 ("vllm:inter_token_latency_seconds", ("0.5", "0.9", "0.99")),
                                 ("vllm:e2e_request_latency_seconds", ("0.5", "0.9", "0.99")),
                                 ("semipd:kv_transfer_seconds", ("0.9",)), ("semipd:kv_handoff_seconds", ("0.9",)),
                                 ("semipd:admission_ttft_ratio", ("0.5", "0.9"))):
        for q in quantiles:
            assert any(e.startswith(f"histogram_quantile({q}, sum by (le") and f"{histogram}_bucket{{" in e for e in exprs), (histogram, q)
    # cluster/metrics.py exports the switch stall as a summary: no buckets, a mean from _sum/_count.
    assert "semipd:sm_switch_stall_seconds_bucket" not in text
    assert re.search(r"rate\(semipd:sm_switch_stall_seconds_sum\{.*\) / .*rate\(semipd:sm_switch_stall_seconds_count\{", text)
    assert re.search(r"by \([^)]*worker\) \(rate\(semipd:worker_iteration_seconds_sum\{.*\) / "
                     r".*rate\(semipd:worker_iteration_seconds_count\{", text)
    assert re.search(r"by \([^)]*phase", text), "queue depth must be split by phase"
    for counter in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "semipd:sm_repartitions_total",
                    "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
        assert re.search(rf"rate\({re.escape(counter)}\{{", text), counter


def test_dashboard_queries_and_layout() -> None:
    board = dashboard()
    for expr in dashboard_exprs(board):
        assert 'model_name=~"$model_name"' in expr, expr
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        cover = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & cover, f"panel {p['title']} overlaps another"
        cells |= cover
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
