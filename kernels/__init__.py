"""Fast ops, each in its own folder beside its plain torch reference (torch + triton only)."""
