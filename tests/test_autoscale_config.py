"""The serve config's per-role `autoscaling` section and the Serve deployment options it becomes."""
import pytest

from rayinfer.actors.deployments import DRAIN_S_FIXED, ingress_env, rank_gang
from rayinfer.config import ConfigError, ServeConfig


def _cfg(**autoscaling) -> ServeConfig:
    return ServeConfig.from_dict({"decode": {"ep_size": 4, "num_gangs": 2, "autoscaling": autoscaling}})


def test_gang_counts_become_replica_counts_in_whole_gangs():
    cfg = _cfg(min_gangs=1, max_gangs=3, target_ongoing_requests=8, upscale_delay_s=5, downscale_delay_s=60,
               look_back_s=12, drain_timeout_s=90)
    app = rank_gang(cfg.engine_config("decode"), "decode", role="decode", num_gangs=cfg.decode.num_gangs,
                    autoscaling=cfg.decode.autoscaling)
    dc = app._bound_deployment._deployment_config
    a = dc.autoscaling_config
    assert (a.min_replicas, a.initial_replicas, a.max_replicas) == (4, 8, 12)  # gangs of 4 ranks; starts at num_gangs
    assert (a.target_ongoing_requests, a.upscale_delay_s, a.downscale_delay_s, a.look_back_period_s) == (8, 5, 60, 12)
    assert dc.gang_scheduling_config.gang_size == 4
    assert dc.graceful_shutdown_timeout_s == 90  # Serve's kill deadline is the drain bound
    assert app._bound_deployment.init_args[-1] == 90  # ... and the rank's own drain stops waiting then
    assert float(ingress_env(cfg)["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"]) == 3.0  # 4 per window


def test_start_is_kept_within_min_and_max():
    assert _cfg(min_gangs=3, max_gangs=4).decode.autoscaling.replicas(4, 2)["initial_replicas"] == 12
    assert _cfg(min_gangs=1, max_gangs=1).decode.autoscaling.replicas(4, 2)["initial_replicas"] == 4


def test_fixed_roles_keep_a_fixed_gang_count():
    cfg = ServeConfig.from_dict({"decode": {"ep_size": 2, "num_gangs": 3}})
    dc = rank_gang(cfg.engine_config("decode"), "decode", num_gangs=3)._bound_deployment._deployment_config
    assert dc.autoscaling_config is None and dc.num_replicas == 6
    assert dc.graceful_shutdown_timeout_s == DRAIN_S_FIXED
    assert "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S" not in ingress_env(cfg)


@pytest.mark.parametrize("section, named", [
    ({"max_gangs": 0}, "'max_gangs'=0"),
    ({"min_gangs": 3, "max_gangs": 2}, "'max_gangs'=2"),
    ({"min_gangs": 0}, "'min_gangs'=0"),
    ({"target_ongoing_requests": "many"}, "'target_ongoing_requests'='many'"),
    ({"downscale_delay_s": -1}, "'downscale_delay_s'=-1"),
    ({"look_back_s": 0}, "'look_back_s'=0"),
    ({"max_replicas": 4}, "max_replicas in serve config section 'decode.autoscaling'"),
])
def test_bad_values_are_named(section, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        _cfg(**section)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="decode.autoscaling' must be a mapping"):
        ServeConfig.from_dict({"decode": {"autoscaling": 3}})


def test_max_ranks_counts_autoscaled_roles_at_their_max():
    cfg = _cfg(min_gangs=1, max_gangs=3)
    assert (cfg.num_ranks, cfg.max_ranks) == (2 + 4 * 2, 2 + 4 * 3)  # prefill: 1 gang of 2; decode: gangs of 4


def test_rank_threads_follow_the_cpu_share_and_the_cores_left_over(monkeypatch):
    from rayinfer.actors import deployments

    monkeypatch.setattr(deployments.os, "cpu_count", lambda: 8)
    spare = 8 - deployments.SERVING_CORES
    assert deployments.rank_threads(0.5, 1, gpu=False) == spare  # a lone CPU rank uses the cores left over
    assert deployments.rank_threads(0.5, 2, gpu=False) == spare // 2 and deployments.rank_threads(0.5, 16, False) == 1
    assert deployments.rank_threads(3.0, 4, gpu=False) == 3  # never below its share
    assert deployments.rank_threads(1.0, 1, gpu=True) == 1  # a GPU rank's threads only feed its device
    app = deployments.build_app(ServeConfig(disaggregated=False).with_ep(decode=1))
    mixed = app._bound_deployment.init_kwargs["mixed"]._bound_deployment
    assert mixed.init_args[2] == spare  # RankReplica(config, role, threads, ...)
    monkeypatch.setattr(deployments.os, "cpu_count", lambda: 2)
    assert deployments.rank_threads(0.5, 1, gpu=False) == 1  # nothing to spare beside the serving path
