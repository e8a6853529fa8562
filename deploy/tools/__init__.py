"""Tools the container image runs, each as `python -m deploy.tools.<name> --help`.

* `build_cni_bundle`: at image build time, packs the loom-cni plugin with its own Python runtime so the
  container runtime can run it on a node that has no Python;
* `install_cni`: in the node agent's pod, copies that bundle into the node's CNI bin directory and chains
  loom-cni into the node's CNI network configuration (and takes both out again on uninstall);
* `make_cacerts`: creates a root and an intermediate CA in Istio's `cacerts` layout for the controller.

`build_cni_bundle` and `install_cni` use only the standard library and none of loom's packages: what
they handle (interpreters, node directories) must not depend on the project's own imports working.
"""
