"""Installing loom on Kubernetes: the image, the manifests and the tools they run (`deploy.tools`)."""
