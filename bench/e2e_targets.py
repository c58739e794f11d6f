"""``pdbench e2e``: one configuration started (engines, sidecars, pods) or connected
to, as a :class:`Target` the load generator talks to."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.e2e_plan import Plan, mps_pipe_dir


@dataclass
class Target:
    name: str
    url: str                              # where the client sends requests
    model: str
    label: str = ""
    connector: str = "-"
    sidecar_url: str | None = None        # decode sidecar (pd_* metrics)
    prefill_sidecar_url: str | None = None
    engine_kv_url: str | None = None      # decode engine (KV figures)
    engine_url: str | None = None         # agg-sc: the engine behind the sidecar (vLLM metrics, no KV)
    prefill_engine_url: str | None = None  # prefill engine (its vLLM metrics, bench.e2e_breakdown)
    kv_url: str | None = None             # where the KV figures are read when not the decode engine
    layerwise_push: bool = False          # our push: both legs at once, WRITEs during the prefill
    cores: dict[str, str] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None
    netns: str | None = None              # network namespace the client must run in (pods)


def start_pods_target(name: str, plan: Plan) -> Target:
    """``pd-ours-pods``: the rendered dev-cpu overlay as pods (pdsidecar.dev.pods)."""
    from pdsidecar.dev.local_pods import served_model
    from pdsidecar.dev.netns import NetnsError, can_create
    from pdsidecar.dev.pods import PodCluster, PodError
    from pdsidecar.dev.podspec import PodSpecError

    why = can_create()
    if why:
        raise RuntimeError(why)
    cluster = PodCluster(log_dir=plan.log_dir, startup_timeout_s=plan.startup_timeout)
    try:
        p, d = cluster.start_many(["prefill", "decode"])
    except (PodError, PodSpecError, NetnsError) as e:
        cluster.close()
        raise RuntimeError(str(e)) from None
    except BaseException:
        cluster.close()
        raise
    engine = f"http://{d.ip}:{d.engine.ports['vllm-http']}"
    return Target(name, d.url("http"), served_model(d), f"P/D across pods {p.ip} -> {d.ip} (dev-cpu overlay)",
                  "PdConnector", sidecar_url=d.url("http"), prefill_sidecar_url=p.url("http"),
                  engine_kv_url=engine, prefill_engine_url=f"http://{p.ip}:{p.engine.ports['vllm-http']}", cores={"prefill": ",".join(map(str, sorted(p.cpus or []))),
                                               "decode": ",".join(map(str, sorted(d.cpus or [])))},
                  logs=[str(cluster.log_dir)], stop=cluster.close, netns=cluster.outer)


def _engine_configs(roles: tuple[str, ...], model: str, kv_cfg: dict | None, plan: Plan, stock: bool,
                    common: dict[str, Any]) -> list[Any]:
    """One EngineConfig per role: CPU engines pinned to their own cores, or GPU engines
    sharing the GPU (``--gpu-util``). Each engine gets its own control / side-channel port."""
    import copy

    from pdsidecar.dev.engines import EngineConfig
    from pdsidecar.dev.procs import cpu_slices, free_port

    binds = cpu_slices(len(roles))
    out = []
    for role, bind in zip(roles, binds):
        cfg = copy.deepcopy(kv_cfg)
        if cfg and "kv_connector_extra_config" in cfg and not stock:
            cfg["kv_connector_extra_config"]["control_port"] = free_port()
        env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())} if stock else {}
        if plan.sm_share is not None:  # an MPS client, limited to its share of the SMs
            share = dict(zip(("prefill", "decode"), plan.sm_share)).get(role, 100)
            env.update(CUDA_MPS_PIPE_DIRECTORY=mps_pipe_dir(), CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(share))
        if plan.gpu_util is None:
            out.append(EngineConfig(model=model, name=role, kv_transfer_config=cfg, cpu_bind=bind, env=env,
                                    log_dir=plan.log_dir, **common))
        else:
            out.append(EngineConfig(model=model, name=role, kv_transfer_config=cfg, cpu_bind=None,
                                    pin_process=False, env=env, log_dir=plan.log_dir,
                                    extra_args=["--gpu-memory-utilization", str(plan.gpu_util)], **common))
    return out


def _start(configs: list[Any], plan: Plan) -> list[Any]:
    from pdsidecar.dev.engines import start_engines

    return start_engines(configs, sequential=plan.gpu_util is not None)


def _behind_sidecar(name: str, e: Any, plan: Plan) -> Target:
    """``agg-sc``: the aggregated engine `e` behind a decode sidecar with no prefill peer,
    the hop a sidecar deployment adds to a request it serves without disaggregating."""
    from pdsidecar.dev.local_sidecars import start_local_sidecar

    try:
        sc = start_local_sidecar(e, list(plan.sidecar_args))
    except BaseException:
        e.stop()
        raise

    def stop() -> None:
        sc.stop()
        e.stop()

    return Target(name, sc.url, e.model_name, "aggregated (one engine) behind a decode sidecar, local path", "-",
                  sidecar_url=sc.url, engine_url=e.url, cores={"engine": e.config.cpu_bind or "gpu"},
                  logs=[str(e.log_path), str(sc.log_path)], stop=stop)


def start_target(name: str, plan: Plan, model: str) -> Target:
    from pdsidecar.dev.engines import stock_nixl_config

    if name == "pd-ours-pods":
        return start_pods_target(name, plan)
    common = dict(startup_timeout_s=plan.startup_timeout, max_model_len=plan.max_model_len)
    if name in ("agg", "agg-sc"):
        (e,) = _start(_engine_configs(("agg",), model, None, plan, False, common), plan)
        if name == "agg-sc":
            return _behind_sidecar(name, e, plan)
        return Target(name, e.url, e.model_name, "aggregated (one engine)", "-",
                      cores={"engine": e.config.cpu_bind or "gpu"}, logs=[str(e.log_path)], stop=e.stop)
    from pdsidecar.dev.local_sidecars import start_sidecars

    push = name.endswith("-push")
    if name.startswith("pd-ours"):
        from pdsidecar.dev.local import connector_config

        label, kv_cfg = connector_config("ours")
        if push:
            kv_cfg["kv_connector_extra_config"]["transfer_mode"] = "push"
            label = "PdConnector push (ours)"
        stock = False
    else:
        kv_cfg, stock = stock_nixl_config(), True
        if plan.gpu_util is not None:
            kv_cfg.pop("kv_buffer_device", None)  # GPU: KV stays in VRAM
        if push:
            kv_cfg["kv_connector"] = "NixlPushConnector"
        label = f"{kv_cfg['kv_connector']} (stock vLLM)"
    prefill, decode = _start(_engine_configs(("prefill", "decode"), model, kv_cfg, plan, stock, common), plan)
    extra = list(plan.sidecar_args)
    if name == "pd-ours-ft" and not any(a.startswith("--first-token-from-prefill") for a in extra):
        extra += ["--first-token-from-prefill", "all"]
        label += ", first token from the prefill leg"
    if push and not stock:
        port = decode.config.kv_transfer_config["kv_connector_extra_config"]["control_port"]
        extra += ["--transfer-mode", "push", "--push-target", f"127.0.0.1:{port}"]
    try:
        sc = start_sidecars(prefill, decode, extra_decode_args=extra)
    except BaseException:
        prefill.stop()
        decode.stop()
        raise

    def stop() -> None:
        sc.stop()
        prefill.stop()
        decode.stop()

    return Target(name, sc.decode_url, decode.model_name, f"P/D, {label}, sidecars", label.split(" ")[0],
                  sidecar_url=sc.decode_url, prefill_sidecar_url=sc.prefill_url, engine_kv_url=decode.url,
                  prefill_engine_url=prefill.url,
                  # vLLM's NixlPushConnector: the prefill engine owns the WRITEs and their stats
                  kv_url=prefill.url if push and stock else None, layerwise_push=push and not stock,
                  cores={"prefill": prefill.config.cpu_bind or "gpu", "decode": decode.config.cpu_bind or "gpu"},
                  logs=[str(prefill.log_path), str(decode.log_path), str(sc.decode.log_path),
                        str(sc.prefill.log_path)], stop=stop)


def connect_target(name: str, spec: dict[str, Any], plan: Plan) -> Target:
    url = spec["url"]
    model = plan.model_name
    if model is None:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
                model = json.loads(r.read())["data"][0]["id"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as e:
            raise RuntimeError(f"cannot ask {url}/v1/models for the model name ({e}); pass --model-name") from None
    if name == "agg":
        return Target(name, url, model, "aggregated (connected)")
    return Target(name, url, model, "P/D (connected)", sidecar_url=url, prefill_sidecar_url=spec.get("prefill_url"),
                  engine_kv_url=spec.get("engine_url"), prefill_engine_url=spec.get("prefill_engine_url"))
