"""What the recipes (and eval) share. See README.md."""
