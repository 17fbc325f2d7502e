"""The control plane's pieces: certificates (``pki``), kubeconfigs (``kubeconfig``), the components'
command lines (``components``) and the Node objects (``nodes``). Pure functions and files; the
cluster (``devcluster.cluster``) starts the processes."""
