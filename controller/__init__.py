"""The loom controller: configuration sources -> translation -> delta xDS to node proxies, and the CA."""
