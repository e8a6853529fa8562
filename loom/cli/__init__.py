"""loomctl, the user's command line."""
