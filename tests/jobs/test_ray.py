"""The Ray Data executor: the same rows as the local executor, on a local Ray started for the job and on a real
two-node cluster on this machine with a worker actor killed mid-job. Every test is bounded by a deadline."""
import os
import signal

import pytest

import vitx_fast as vx
from vitx_fast.jobs import JobSpec, check_store, run

ray = pytest.importorskip("ray")
from jobutils import assert_same_rows, deadline

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def spec(inputs, store, **kw):
    return JobSpec(inputs=[str(i) for i in inputs], store=str(store),
                   **{"methods": ["rollout", "reciprocam"], "batch_size": 4, "target": "top2", **kw})


@pytest.fixture(scope="module")
def local_store(scenes, tmp_path_factory):
    root, keys = scenes
    store = tmp_path_factory.mktemp("local") / "s"
    run(spec([root], store), progress=False)
    return store


def test_local_ray_equals_local_executor(scenes, local_store, tmp_path):
    root, keys = scenes
    with deadline(240, "ray job"):
        result = run(spec([root], tmp_path / "s", executor="ray", actors=2, ray_cpus=2), progress=False)
    assert not ray.is_initialized()  # the job started its Ray and shut it down
    assert (result.explained, result.failed) == (len(keys), 0)
    assert check_store(tmp_path / "s") == []
    assert_same_rows(vx.read_results(local_store), vx.read_results(tmp_path / "s"))


def test_two_node_cluster_survives_a_killed_actor(scenes, local_store, tmp_path):
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from vitx_fast.jobs.ray_executor import loopback_only

    root, keys = scenes
    killed = []

    def kill_one_actor(done, total):
        if killed or done >= total:
            return
        # only a live actor process of this job, by its own pid (never 0, which would mean our process group)
        actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                  if "RayExplainer" in a.class_name and (a.pid or 0) > 1 and a.pid != os.getpid()]
        if not actors:
            return  # still starting: try again after the next batch
        os.kill(actors[0].pid, signal.SIGKILL)  # a worker crash, mid-job
        killed.append((actors[0].actor_id, actors[0].node_id))

    with deadline(600, "two-node ray job"), loopback_only():
        # two nodes of two logical CPUs; an actor takes 1.5, so the pool needs both nodes, and Ray Data's decode
        # tasks (half a CPU each) keep room beside it: actors that took every CPU would starve them
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        try:
            cluster.add_node(num_cpus=2)
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
            cluster.wait_for_nodes()
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            result = run(spec([root], tmp_path / "s", executor="ray", actors=2, cpus_per_actor=1.5,
                              address=cluster.address, batch_size=2), progress=False,
                         on_progress=kill_one_actor)
            restarted = {a.actor_id: a for a in list_actors(detail=True)}
            nodes = {a.node_id for a in restarted.values() if "RayExplainer" in a.class_name}
        finally:
            ray.shutdown()
            cluster.shutdown()
    assert killed, "the test killed no actor"
    assert restarted[killed[0][0]].num_restarts >= 1  # Ray restarted the killed actor, its batch re-ran
    assert len(nodes) == 2  # the pool spread over both nodes
    assert (result.explained, result.failed) == (len(keys), 0)
    assert check_store(tmp_path / "s") == []  # every unit once, no duplicate from the re-run batch
    assert_same_rows(vx.read_results(local_store), vx.read_results(tmp_path / "s"))
