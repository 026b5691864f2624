"""Images: overlaybd configs, OCI layouts and manifests, assembled into stacks and served as devices."""
