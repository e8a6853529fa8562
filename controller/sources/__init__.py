"""Configuration sources behind one interface (see `base.ConfigSource`)."""
