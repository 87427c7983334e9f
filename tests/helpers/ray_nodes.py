"""A Ray cluster of several nodes on this machine's loopback, for the join tests: Ray's own
``ray.cluster_utils.Cluster`` in a process of its own (the test process then joins it as ComfyUI
would). Every node is on 127.0.0.1 (Ray binds a node at another loopback address to every interface),
told apart by its Ray node id, with ``--cpus`` CPU slots; Ray's temp files and its address file stay
in ``--temp`` (RAY_TMPDIR); its token settings come from the environment.

Run: python tests/helpers/ray_nodes.py --nodes 2 --cpus 1 --temp DIR; it prints the head's GCS address
on one line, then serves until its standard input closes (or SIGTERM), and stops every node.
"""
import argparse
import os
import signal
import sys
import threading


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--temp", required=True)
    args = parser.parse_args()
    os.environ["RAY_TMPDIR"] = args.temp  # ray_current_cluster and session folders stay in the test's folder
    os.makedirs(os.path.join(args.temp, "ray"), exist_ok=True)
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # loopback addresses stay loopback (nothing on other interfaces)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=args.cpus, node_ip_address="127.0.0.1", include_dashboard=False, temp_dir=args.temp))
    for _ in range(1, args.nodes):
        cluster.add_node(num_cpus=args.cpus, node_ip_address="127.0.0.1", temp_dir=args.temp)
    print(cluster.address, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    cluster.shutdown()


if __name__ == "__main__":
    main()
