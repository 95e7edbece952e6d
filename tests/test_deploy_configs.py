"""deploy/serve_config*.yaml and deploy/kuberay/rayservice.yaml, checked with
the schemas their consumers use: Ray's ServeDeploySchema (plus a walk for keys
it would silently ignore), serve.config.AppConfig for the application's args,
Kubernetes' own JSON schemas (kubernetes-validate) for the pod templates, and
the field lists of KubeRay's ray.io/v1 and the Prometheus Operator's
monitoring.coreos.com/v1 types for the custom resources around them.

The CPU profile is also run for real: tests/test_deploy_live.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from deploy_helpers import DEPLOY, SERVE_CONFIGS, load_yaml, unknown_keys
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeDeploySchema
from ray.util import accelerators

from serve.app import model_deployment_options
from serve.config import AppConfig

# Kubernetes versions the pod templates are validated against: an older one
# still widely run and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29", "latest")

RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"

# Fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go).
# Unknown fields are pruned by the API server without an error, so a typo
# would deploy a cluster that silently lacks the setting.
KUBERAY_FIELDS = {
    "RayServiceSpec": {
        "serveConfigV2", "rayClusterConfig", "serveService", "excludeHeadPodFromServeSvc",
        "upgradeStrategy", "rayClusterDeletionDelaySeconds",
        "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
    },
    "RayClusterSpec": {
        "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
        "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
        "managedBy", "authOptions",
    },
    "HeadGroupSpec": {
        "serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels",
    },
    "WorkerGroupSpec": {
        "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
        "template", "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels",
    },
    "AutoscalerOptions": {
        "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
        "securityContext", "idleTimeoutSeconds", "upscalingMode", "version",
    },
    "GcsFaultToleranceOptions": {"redisUsername", "redisPassword", "externalStorageNamespace", "redisAddress"},
    "RedisCredential": {"valueFrom", "value"},
}
# monitoring.coreos.com/v1 PodMonitor (the fields this repository may use).
PODMONITOR_FIELDS = {
    "spec": {
        "jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "namespaceSelector",
        "sampleLimit", "targetLimit", "labelLimit", "attachMetadata",
    },
    "endpoint": {
        "port", "portNumber", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout",
        "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings", "enableHttp2",
        "followRedirects", "filterRunning",
    },
    "relabeling": {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"},
}


# ---------------------------------------------------------------- Serve config


@pytest.fixture(params=sorted(SERVE_CONFIGS), ids=lambda p: f"profile={p}")
def profile(request):
    return request.param


def _app(raw: dict) -> dict:
    (app,) = raw["applications"]
    return app


def _app_config(raw: dict) -> AppConfig:
    return AppConfig.model_validate(_app(raw)["args"])  # extra="forbid": typos fail here


def deployment_options(raw: dict) -> dict[str, dict]:
    """What build_app passes to Serve for each deployment (`api` and one per
    model), from the config's args, by the app's own function for models."""
    cfg = _app_config(raw)
    out = {m.name: model_deployment_options(m) for m in cfg.models}
    out["api"] = {"name": "api", **cfg.ingress.model_dump()}
    return out


def test_serve_config_validates_with_rays_schema(profile):
    raw = load_yaml(SERVE_CONFIGS[profile])
    schema = ServeDeploySchema.model_validate(raw)
    assert unknown_keys(ServeDeploySchema, raw) == [], "keys Ray would silently ignore"
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    # One place for deployment options: `bsbr-serve up --config` reads only
    # `args`, so `deployments:` overrides would apply under `serve deploy`
    # and silently not in the Docker image.
    assert "deployments" not in _app(raw)


def test_every_deployments_options_validate_with_rays_schema(profile):
    # The options live in `args`, where Ray's ServeDeploySchema does not look:
    # validate what build_app will hand to Serve with Serve's DeploymentSchema.
    for name, opts in deployment_options(load_yaml(SERVE_CONFIGS[profile])).items():
        plain = {k: v for k, v in opts.items() if k != "request_router_config"}
        DeploymentSchema.model_validate(opts)
        assert unknown_keys(DeploymentSchema, plain) == [], name
        if opts.get("autoscaling_config"):
            AutoscalingConfig(**opts["autoscaling_config"])
            assert unknown_keys(AutoscalingConfig, opts["autoscaling_config"]) == [], name
            assert "num_replicas" not in opts, "Serve rejects both at once"


def test_serve_config_args_are_the_apps_config(profile):
    cfg = _app_config(load_yaml(SERVE_CONFIGS[profile]))
    assert [m.name for m in cfg.models][:2] == ["bsbr", "standard"]
    # Sessions must survive replica loss (both); on GPU machines, the loss of every Ray process too.
    assert cfg.sessions.store == {"gpu": "redis", "cpu": "ray_actor"}[profile]
    assert next(m for m in cfg.models if m.name == "standard").max_tokens == 32768


def test_bsbr_autoscales_in_both_profiles(profile):
    bsbr = deployment_options(load_yaml(SERVE_CONFIGS[profile]))["bsbr"]
    auto = AutoscalingConfig(**bsbr["autoscaling_config"])
    assert 1 <= auto.min_replicas < auto.max_replicas


def test_gpu_profile_puts_each_model_replica_on_one_a100():
    raw = load_yaml(SERVE_CONFIGS["gpu"])
    opts = deployment_options(raw)
    for m in _app_config(raw).models:
        actor = opts[m.name]["ray_actor_options"]
        assert actor["num_gpus"] == 1
        assert actor["accelerator_type"] == accelerators.NVIDIA_A100
        assert m.device == "cuda"
        assert m.path.startswith("/app/models/"), "the image's models (Dockerfile)"
    assert "num_gpus" not in opts["api"]["ray_actor_options"]
    assert raw["http_options"]["host"] == "0.0.0.0"


def test_cpu_profile_needs_no_gpu_and_fits_two_cores():
    raw = load_yaml(SERVE_CONFIGS["cpu"])
    assert all(m.device == "cpu" for m in _app_config(raw).models)
    cpus = 0.0
    for name, d in deployment_options(raw).items():
        actor = d["ray_actor_options"]
        assert not actor.get("num_gpus") and "accelerator_type" not in actor, name
        low = d["autoscaling_config"]["min_replicas"] if d.get("autoscaling_config") else d["num_replicas"]
        cpus += low * actor.get("num_cpus", 1)
    assert cpus <= 2, f"the CPU profile's minimum needs {cpus} CPUs"


# -------------------------------------------------------------------- KubeRay


def _kuberay_docs() -> dict[str, dict]:
    with open(RAYSERVICE) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["PodMonitor", "RayService"], kinds
    return {d["kind"]: d for d in docs}


def _assert_known(obj: dict, allowed: set[str], what: str) -> None:
    extra = set(obj) - allowed
    assert not extra, f"{what}: fields KubeRay/Prometheus Operator do not define: {sorted(extra)}"


def _pod_templates(rs: dict) -> dict[str, dict]:
    rc = rs["spec"]["rayClusterConfig"]
    out = {"head": rc["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in rc["workerGroupSpecs"]})
    return out


def test_rayservice_structure_matches_kuberay_types():
    rs = _kuberay_docs()["RayService"]
    assert rs["apiVersion"] == "ray.io/v1"
    spec = rs["spec"]
    _assert_known(spec, KUBERAY_FIELDS["RayServiceSpec"], "spec")
    rc = spec["rayClusterConfig"]
    _assert_known(rc, KUBERAY_FIELDS["RayClusterSpec"], "rayClusterConfig")
    _assert_known(rc["headGroupSpec"], KUBERAY_FIELDS["HeadGroupSpec"], "headGroupSpec")
    _assert_known(rc.get("autoscalerOptions", {}), KUBERAY_FIELDS["AutoscalerOptions"], "autoscalerOptions")
    ft = rc["gcsFaultToleranceOptions"]
    _assert_known(ft, KUBERAY_FIELDS["GcsFaultToleranceOptions"], "gcsFaultToleranceOptions")
    assert ft["redisAddress"], "redisAddress is required"
    for key in ("redisUsername", "redisPassword"):
        if key in ft:
            _assert_known(ft[key], KUBERAY_FIELDS["RedisCredential"], f"gcsFaultToleranceOptions.{key}")
    for g in rc["workerGroupSpecs"]:
        _assert_known(g, KUBERAY_FIELDS["WorkerGroupSpec"], f"workerGroupSpecs[{g['groupName']}]")
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # rayStartParams is map[string]string: an unquoted number fails in the API server.
    for params in [rc["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in rc["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values()), params


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_rayservice_pod_templates_validate_against_kubernetes_schemas(k8s_version):
    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version() if k8s_version == "latest" else k8s_version
    for group, template in _pod_templates(_kuberay_docs()["RayService"]).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        try:
            kubernetes_validate.validate(pod_template, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{group} pod template, Kubernetes {version}: {e.message} at {list(e.path)}")


def test_rayservice_embeds_the_gpu_serve_config():
    rs = _kuberay_docs()["RayService"]
    inline = yaml.safe_load(rs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(inline)
    assert unknown_keys(ServeDeploySchema, inline) == []
    AppConfig.model_validate(_app(inline)["args"])
    assert inline == load_yaml(SERVE_CONFIGS["gpu"]), "serveConfigV2 drifted from deploy/serve_config.yaml"


def test_rayservice_gpu_group_gets_a100_nodes():
    rs = _kuberay_docs()["RayService"]
    (gpu,) = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if "gpu" in g["groupName"]]
    pod = gpu["template"]["spec"]
    (ray,) = pod["containers"]
    assert ray["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert "A100" in " ".join(pod["nodeSelector"].values())
    # Serve asks for accelerator_type A100; the group must offer it.
    assert "accelerator_type:A100" in gpu["rayStartParams"]["resources"]
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    gpus_per_replica = {n: d["ray_actor_options"].get("num_gpus", 0) for n, d in deployment_options(serve_cfg).items()}
    assert max(gpus_per_replica.values()) <= int(ray["resources"]["limits"]["nvidia.com/gpu"])
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_every_ray_pod_exports_metrics_where_the_podmonitor_looks():
    docs = _kuberay_docs()
    rs, pm = docs["RayService"], docs["PodMonitor"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    _assert_known(pm["spec"], PODMONITOR_FIELDS["spec"], "PodMonitor.spec")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    _assert_known(endpoint, PODMONITOR_FIELDS["endpoint"], "podMetricsEndpoints[0]")
    for r in endpoint.get("relabelings", []):
        _assert_known(r, PODMONITOR_FIELDS["relabeling"], "relabelings")
    selector = pm["spec"]["selector"]["matchLabels"]
    rc = rs["spec"]["rayClusterConfig"]
    groups = {"head": rc["headGroupSpec"]} | {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    images = set()
    for name, group in groups.items():
        template = group["template"]
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"PodMonitor does not select the {name} pods"
        port = int(group["rayStartParams"]["metrics-export-port"])
        (ray,) = template["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in ray["ports"]}
        assert named.get(endpoint["port"]) == port, f"{name}: port {endpoint['port']!r} is not Ray's metrics export"
        images.add(ray["image"])
    assert len(images) == 1, "head and workers must run the same image (same Ray, same code)"


def test_kuberay_manifests_are_in_sync_with_their_sources():
    # serveConfigV2 <- deploy/serve_config.yaml, prometheusrule.yaml <- the rule files.
    out = subprocess.run([sys.executable, str(DEPLOY / "kuberay" / "sync.py"), "--check"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_prometheusrule_wraps_the_rule_files():
    rule = load_yaml(DEPLOY / "kuberay" / "prometheusrule.yaml")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert set(rule["spec"]) == {"groups"}
    sources = sorted((DEPLOY / "prometheus" / "rules").glob("*.rules.yml"))
    assert rule["spec"]["groups"] == [g for f in sources for g in load_yaml(f)["groups"]]
    # The PodMonitor and the PrometheusRule must be picked up by the same Prometheus.
    assert rule["metadata"]["labels"]["release"] == _kuberay_docs()["PodMonitor"]["metadata"]["labels"]["release"]


def test_rayservice_starts_with_the_gpus_the_application_needs():
    # The workers KubeRay starts with hold every model's minimum replicas;
    # autoscaling adds pods beyond that, up to the GPUs bsbr can scale to.
    rs = _kuberay_docs()["RayService"]
    (gpu,) = [g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if "gpu" in g["groupName"]]
    (ray,) = gpu["template"]["spec"]["containers"]
    per_pod = int(ray["resources"]["limits"]["nvidia.com/gpu"])
    need_min = need_max = 0.0
    for d in deployment_options(yaml.safe_load(rs["spec"]["serveConfigV2"])).values():
        gpus = d["ray_actor_options"].get("num_gpus", 0)
        auto = d.get("autoscaling_config")
        need_min += gpus * (auto["min_replicas"] if auto else d["num_replicas"])
        need_max += gpus * (auto["max_replicas"] if auto else d["num_replicas"])
    assert gpu["replicas"] * per_pod >= need_min
    assert gpu["maxReplicas"] * per_pod >= need_max


# ---------------------------------------------------------------- Redis (KubeRay)

REDIS_MANIFEST = DEPLOY / "kuberay" / "redis.yaml"


def _redis_docs() -> dict[str, dict]:
    with open(REDIS_MANIFEST) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "NetworkPolicy", "Service", "StatefulSet"], kinds
    return {d["kind"]: d for d in docs}


def _redis_conf() -> str:
    return _redis_docs()["ConfigMap"]["data"]["redis.conf"]


def _conf_value(conf: str, key: str) -> str:
    (line,) = [ln for ln in conf.splitlines() if ln.split(" ", 1)[0] == key]
    return line.split(" ", 1)[1].strip().strip('"')


def _secret_ref(env: list[dict], name: str) -> tuple[str, str]:
    (var,) = [e for e in env if e["name"] == name]
    ref = var["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_redis_manifest_validates_against_kubernetes_schemas(k8s_version):
    import kubernetes_validate

    version = kubernetes_validate.utils.latest_version() if k8s_version == "latest" else k8s_version
    for kind, doc in _redis_docs().items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind}, Kubernetes {version}: {e.message} at {list(e.path)}")


def test_redis_keeps_its_data_on_a_volume_and_never_evicts():
    docs = _redis_docs()
    sts, svc, conf = docs["StatefulSet"], docs["Service"], _redis_conf()
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    pod = sts["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (redis,) = pod["spec"]["containers"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == _conf_value(conf, "dir"), "the AOF is written to the volume"
    assert _conf_value(conf, "appendonly") == "yes" and _conf_value(conf, "maxmemory-policy") == "noeviction"
    assert _conf_value(conf, "appendfsync") == "always", "an answered page is on disk"
    # The config file Redis is started with is the ConfigMap's.
    (config_volume,) = [v for v in pod["spec"]["volumes"] if v.get("configMap")]
    assert config_volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert redis["args"][0] == f"{mounts[config_volume['name']]}/redis.conf"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == int(_conf_value(conf, "port"))


def test_redis_conf_is_what_a_real_redis_runs(tmp_path):
    """The ConfigMap's redis.conf loads into Debian's redis-server (listening
    and writing where the test says) and gives AOF persistence without eviction."""
    from redis_helpers import running_config

    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "redis.conf"
    # Redis changes into `dir` as it reads the line, before any override: point it here.
    conf.write_text(_redis_conf().replace(f"dir {_conf_value(_redis_conf(), 'dir')}\n", f"dir {data}\n"))
    got = running_config([str(conf), "--requirepass", "pw"], data, password="pw")
    assert got["appendonly"] == "yes" and got["appendfsync"] == "always"
    assert got["maxmemory-policy"] == "noeviction" and int(got["maxmemory"]) == 12 << 30
    assert got["save"] == ""


def test_sessions_and_the_gcs_share_the_one_redis():
    rs = _kuberay_docs()["RayService"]
    docs = _redis_docs()
    rc = rs["spec"]["rayClusterConfig"]
    service = docs["Service"]["metadata"]["name"]
    (port,) = docs["Service"]["spec"]["ports"]
    ft = rc["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == f"{service}:{port['port']}"

    from urllib.parse import urlsplit

    sessions = AppConfig.model_validate(_app(yaml.safe_load(rs["spec"]["serveConfigV2"]))["args"]).sessions
    url = urlsplit(sessions.redis_url)
    assert sessions.store == "redis" and (url.hostname, url.port) == (service, port["port"])
    assert url.path not in ("", "/", "/0"), "database 0 is the GCS's: sessions use another"

    # One password: the Secret the Redis pod requires, the GCS logs in with,
    # and every Ray pod's replicas put in sessions.redis_url.
    (redis,) = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    secret = _secret_ref(redis["env"], "BSBR_REDIS_PASSWORD")
    assert "$(BSBR_REDIS_PASSWORD)" in redis["args"]
    assert (ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"],
            ft["redisPassword"]["valueFrom"]["secretKeyRef"]["key"]) == secret
    assert url.password == "${BSBR_REDIS_PASSWORD}"
    for group, template in _pod_templates(rs).items():
        (ray,) = template["spec"]["containers"]
        assert _secret_ref(ray.get("env", []), "BSBR_REDIS_PASSWORD") == secret, group


def test_every_ray_pod_gets_the_ray_settings_bsbr_serve_up_sets():
    from serve.cli import RAY_ENV_DEFAULTS

    rs = _kuberay_docs()["RayService"]
    for group, template in _pod_templates(rs).items():
        (ray,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in ray.get("env", [])}
        assert {k: env.get(k) for k in RAY_ENV_DEFAULTS} == RAY_ENV_DEFAULTS, group


def test_gcs_fault_tolerance_is_set_the_way_kuberay_accepts():
    # KubeRay's ValidateRayClusterSpec refuses the older ways next to gcsFaultToleranceOptions.
    rs = _kuberay_docs()["RayService"]
    rc = rs["spec"]["rayClusterConfig"]
    assert "ray.io/ft-enabled" not in rs["metadata"].get("annotations", {})
    assert "ray.io/external-storage-namespace" not in rs["metadata"].get("annotations", {})
    head = rc["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    names = {e["name"] for e in container.get("env", [])}
    assert not names & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"}
    assert not {"redis-password", "redis-username"} & set(head["rayStartParams"])


def test_only_the_ray_pods_reach_redis():
    rs = _kuberay_docs()["RayService"]
    docs = _redis_docs()
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= \
        docs["StatefulSet"]["spec"]["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    for group, template in _pod_templates(rs).items():
        assert source["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items(), group
    assert [p["port"] for p in rule["ports"]] == [docs["Service"]["spec"]["ports"][0]["port"]]
