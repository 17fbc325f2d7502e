"""The process node ``proc-0``: does for the pods bound to it what a kubelet does, with processes.

``python -m devcluster.node CONFIG.json`` (started by the cluster). Its parts, one job each:

- ``agent``: watches the node's pods, runs a ``PodWorker`` per pod, keeps the Node's status fresh,
  forwards the apiserver into the node's network namespace (``forward``);
- ``pod``: one pod's state and status (patched only when it changed);
- ``env``: env (``value``, Secret/ConfigMap keys, ``fieldRef``, ``envFrom``, ``KUBERNETES_SERVICE_*``);
- ``volumes``: hostPath (through the node's host-path map), emptyDir, Secret/ConfigMap/downwardAPI and
  projected volumes with service-account tokens (TokenRequest, renewed), the pod's resolv.conf; a
  missing Secret/ConfigMap → ``CreateContainerConfigError``, retried;
- ``container`` + ``launch``: a container's run, as a process in the pod's network namespace with its
  own mount namespace and root (``launch.py``: chroot, ``runAsUser``/``runAsGroup``); logs go to
  ``<state>/logs/<ns>_<pod>_<uid>/<container>/<restart>.log``; an unknown image → ``ErrImagePull``;
- ``probes``: startup, readiness and liveness (``httpGet``, ``tcpSocket``, ``exec``);
- ``lifecycle``: init containers, then containers, restarts per ``restartPolicy`` with the kubelet's
  back-off (10 s doubling, 5 min cap);
- ``termination``: ``preStop`` (``sleep``, ``httpGet``, ``exec``), SIGTERM, grace period, SIGKILL,
  the pod's network namespace removed, the deletion finished.

Only the standard library is used, so the node runs without the project's virtual environment.
"""
